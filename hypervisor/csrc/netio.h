/* netback's transmit fast path: the guest's packets from the tx ring to the vif's TAP in one
 * C call per batch.
 *
 * A packet is served here when its slot chain is the common one (a first slot, at most one
 * GSO extra, data slots while more_data, at most XEN_NETIF_NR_SLOTS_MIN), every check of
 * Python's TxParser passes, every page is mapped already and its protocol headers lie in its
 * first slot. The first slot is copied to private memory once and the headers are parsed from
 * that copy only (XSA-423: the kernel reads the headers we checked); the rest goes to the TAP
 * straight from the mapped pages. At the first packet that is anything else, the rest of the
 * batch is handed back untouched, and Python parses, refuses and counts it: the fast path
 * never refuses. Requests are copied out of the ring once (rf_back_take_requests). */
#ifndef RF_NETIO_H
#define RF_NETIO_H
#include <stdint.h>
#include "ring.h"

#define RF_NET_TX_REQUEST_SIZE 12

typedef struct rf_net_tx {
    int tap_fd;
    uint32_t enabled;            /* 0: everything goes to Python */
    uint32_t ngrants;            /* mapped pages are looked up by gref below this */
    uint8_t **pages;             /* [ngrants]: the mapped page, or NULL */
    uint64_t packets, bytes, dropped, handed_back, batches;
} rf_net_tx;

/* Serve the ring until it is empty (after the final check) or a packet needs Python; the
 * requests from that packet on are copied to handed_back (room for a whole ring). Returns
 * how many, or -EOVERFLOW for a frontend that overflowed the ring. *notify: whether the
 * responses pushed need an event. */
int rf_net_tx_serve(rf_net_tx *t, rf_ring *ring, uint8_t *handed_back, int *notify);
#endif
