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

/* netback's receive side: packets read from the vif's TAP go into the buffers the guest
 * posted (mapped writable), a piece a page with a GSO extra after the first, answered in the
 * order posted, pushed once a batch. With a largest packet's worth of buffers posted, the
 * TAP is read straight into them (no copy of ours); otherwise into private memory, and the
 * packet waits there for enough buffers; the rest wait in the TAP's own queue (bounded,
 * counted by the kernel). */
#define RF_NETBACK_TAP_EMPTY 0    /* wait until the TAP is readable */
#define RF_NETBACK_NO_BUFFERS 1   /* wait until the guest posts buffers */
#define RF_NETBACK_BUDGET 2

typedef struct rf_net_rx {
    int tap_fd;
    uint32_t sg;                 /* the guest takes a packet over several buffers */
    uint32_t ngrants;
    uint8_t **pages;             /* [ngrants] mapped pages, rf_net_tx's table */
    uint8_t *writable;           /* [ngrants] */
    uint16_t *posted_ids;        /* [posted_cap] ring of posted buffers, oldest first */
    uint32_t *posted_grefs;
    uint32_t posted_cap, posted_head, posted_count;
    uint8_t *packet;             /* [RF_NET_RX_PACKET] read, waiting for buffers */
    uint32_t packet_len, have_packet;
    uint32_t expect_gso;         /* the last packet read into the buffers was a GSO one */
    uint64_t packets, dropped, bad_grants, batches, direct, moved;
} rf_net_rx;
#define RF_NET_RX_PACKET (12 + 65536 + 64)

/* The page C may write for gref (mapped writable), or NULL. */
static inline uint8_t *rf_net_rx_writable_page(const rf_net_rx *r, uint32_t gref)
{
    return gref < r->ngrants && r->writable[gref] ? r->pages[gref] : NULL;
}

/* Buffers the guest posted (copied out of the ring already): how many were taken (not
 * more than the ring holds). */
uint32_t rf_net_rx_post(rf_net_rx *r, const uint16_t *ids, const uint32_t *grefs, uint32_t n);
/* A result above or -errno from the TAP (gone). *notify: whether the push needs an event. */
int rf_net_rx_serve(rf_net_rx *r, rf_ring *ring, uint32_t budget, int *notify);

/* netfront's transmit side: packets read from the guest's TAP straight into free tx buffer
 * pages (room for the largest first), put on the ring a slot a page with a GSO extra after
 * the first, pushed once a batch. The buffers' free list and which are on the ring live here. */
#define RF_NETFRONT_TAP_EMPTY 0   /* wait until the TAP is readable */
#define RF_NETFRONT_NO_ROOM 1     /* wait for the backend's responses */
#define RF_NETFRONT_BUDGET 2      /* budget packets sent: let others run */

typedef struct rf_netfront_tx {
    int tap_fd;
    uint32_t sg;                 /* the backend takes packets over several slots */
    uint8_t *pages;              /* [buffers] pages */
    uint32_t *grefs;             /* [buffers] their grants to the current backend */
    uint16_t *free;              /* [buffers] stack of free buffers */
    uint8_t *on_ring;            /* [buffers] */
    uint16_t *dirty;             /* [buffers] bytes from the page's start that may not be zero */
    uint32_t buffers, nfree;
    uint64_t packets, dropped, bad_responses, batches;
} rf_netfront_tx;

/* netfront's receive side: each response answers the oldest buffer posted; a packet's
 * pieces (and its GSO extra) are put together and written to eth0 with the virtio-net header
 * their flags call for, the first piece from a private copy (its headers are what the kernel
 * trusts), the others from the pages; the buffers go back on the ring once their packet is
 * done, one push a batch. */
#define MAX_RX_PIECES 24         /* a packet's buffers: 17 pieces, extras, and then some */
typedef struct rf_netfront_rx {
    int tap_fd;
    uint8_t *pages;              /* [buffers] rx pages */
    uint32_t *grefs;             /* [buffers] their grants to the current backend */
    uint32_t buffers;
    uint16_t *posted;            /* [buffers] ring of posted buffers, oldest first */
    uint32_t posted_head, posted_count;
    uint16_t held[MAX_RX_PIECES];   /* buffers of the packet being put together */
    uint16_t piece_ids[MAX_RX_PIECES], offsets[MAX_RX_PIECES], lengths[MAX_RX_PIECES];
    uint32_t nheld, npieces, in_packet, extras_expected, bad;
    uint16_t flags, gso_type, gso_size;
    uint64_t packets, dropped, bad_responses, batches;
} rf_netfront_rx;

/* Post every buffer (a new connection). */
void rf_netfront_rx_start(rf_netfront_rx *f, rf_ring *ring);
/* Take the rx responses: packets to eth0, buffers back on the ring. Returns how many
 * responses, or -EOVERFLOW. *notify: whether the push needs an event. */
int rf_netfront_rx_serve(rf_netfront_rx *f, rf_ring *ring, int *notify);

/* A result above, or -errno from the TAP. *notify: whether the push needs an event. */
int rf_netfront_tx_pump(rf_netfront_tx *f, rf_ring *ring, uint32_t budget, int *notify);
/* Take the tx responses, giving their buffers back (an id not on the ring counts as a bad
 * response). Returns how many buffers came back, or -EOVERFLOW. */
int rf_netfront_tx_complete(rf_netfront_tx *f, rf_ring *ring);
#endif
