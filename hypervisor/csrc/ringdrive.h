/* A ring driven from C at both ends, for measuring the ring and its notifications without
 * an interpreter in the loop (``ringfence bench ring``, toolstack/ringpair.py), the way the
 * net data path drives its rings (netloop.c). Built on the ring API drivers use. */
#ifndef RF_RINGDRIVE_H
#define RF_RINGDRIVE_H
#include <stdint.h>
#include "ring.h"

/* The front: count copies of the request, depth in flight (1: the synchronous-request loop),
 * each exchange gathering half the depth. Returns the responses taken, or -errno. */
long long rf_drive_front(rf_ring *r, const void *request, uint64_t count, uint32_t depth,
                         int notify_fd, int wait_fd, long long spin_ns);
/* The back: answers every request with the response until a request whose first byte is
 * stop_byte (answered too), taking at most budget a call. Returns the requests answered, or
 * -errno. */
long long rf_drive_back(rf_ring *r, const void *response, uint8_t stop_byte, uint32_t budget,
                        int notify_fd, int wait_fd, long long spin_ns);
#endif
