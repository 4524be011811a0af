/* The net data paths' loops in C: one thread per connected vif on each side, so that a
 * packet costs no Python and no trio wake-up (netio.c does the work; this waits for it).
 *
 * A loop runs until it is stopped or needs Python, and says which (RF_NETLOOP_*):
 * netback hands back transmit requests its fast path does not take (Python parses, refuses
 * and counts them) and receive buffers whose pages are not mapped yet (Python maps them);
 * either side stops on a peer that overflows a ring or on a TAP error. Python calls run
 * again after doing its part. While a loop runs, only it touches its rings, pumps and TAP.
 *
 * Waiting is one poll() of the event channel's eventfd, the TAP (when there is room for what
 * it holds) and the stop eventfd. A peer that notifies without giving work is backed off as
 * xenbus/storm.py does: after RF_STORM_RUN such wake-ups in a row, each further one waits
 * a delay that doubles from 0.5 ms to 50 ms. */
#ifndef RF_NETLOOP_H
#define RF_NETLOOP_H
#include <stdint.h>
#include "netio.h"
#include "ring.h"

#define RF_NETLOOP_STOPPED 0
#define RF_NETLOOP_HANDED_BACK 1   /* netback: nhanded tx requests in handed_back */
#define RF_NETLOOP_NEW_BUFFERS 2   /* netback: nnew rx buffers with pages not mapped yet */
#define RF_NETLOOP_OVERFLOW 3      /* the peer broke a ring's indices */
#define RF_NETLOOP_TAP_ERROR 4     /* errno in error */
#define RF_NETLOOP_NEW_MAX 256     /* rx requests handed back at once: a ring's worth */

typedef struct rf_netloop {
    struct rf_ring *tx_ring, *rx_ring;
    int wait_fd, notify_fd, stop_fd;
    int stop;                      /* set (then stop_fd written) by Python to stop the loop */
    int error;
    uint64_t wakeups, spurious, notifications, backoffs;
    uint32_t in_a_row;             /* event wake-ups in a row that brought no work */
    uint32_t awaiting_work;        /* woken by an event, no work seen since */
} rf_netloop;

typedef struct rf_netback_loop {
    rf_netloop base;
    rf_net_tx *tx;
    rf_net_rx *rx;
    uint8_t *handed_back;          /* [256 * 12] */
    uint32_t nhanded;
    uint16_t new_ids[RF_NETLOOP_NEW_MAX];
    uint32_t new_grefs[RF_NETLOOP_NEW_MAX];
    uint32_t nnew;
    uint32_t rx_waits_for_buffers;
} rf_netback_loop;

typedef struct rf_netfront_loop {
    rf_netloop base;
    rf_netfront_tx *tx;
    rf_netfront_rx *rx;
    uint32_t tx_waits_for_room;
} rf_netfront_loop;

/* RF_NETLOOP_*; both release nothing and may be called again after Python's part. */
int rf_netback_loop_run(rf_netback_loop *l);
int rf_netfront_loop_run(rf_netfront_loop *l);
#endif
