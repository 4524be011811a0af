#include "version.h"
const char *rf_core_version(void) { return "ringfence-core 1"; }
