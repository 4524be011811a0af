#ifndef RF_VERSION_H
#define RF_VERSION_H
const char *rf_core_version(void);
#endif
