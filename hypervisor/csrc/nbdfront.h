/* blkfront's NBD fast path: an NBD client's requests go from its socket to the rings, and
 * the backend's responses from the rings back to the socket, in one C call per batch.
 *
 * rf_nbd_conn is one NBD connection in its transmission phase: it reads and parses the
 * client's requests itself and owns every byte written back (replies of Python-served
 * requests are queued through it too, so replies never interleave). rf_bf_device is the
 * device side: the pool of granted pages (its free list lives here, Python takes pages
 * from it too), the rings, and the table of fast requests in flight. A fast request is a
 * READ or WRITE without FUA, sector-aligned, inside the disk and no larger than one blkif
 * request; anything else is handed back to Python whole. Fast requests keep their pages
 * and their place in the table until answered, so that after a backend restart they are
 * replayed (rf_bf_replay) like Python's: nothing acknowledged is lost.
 *
 * Single-threaded: every function runs on the caller's (trio's) thread. Ring events are
 * left to the caller: notify_mask says which queues' pushed requests need one. */
#ifndef RF_NBDFRONT_H
#define RF_NBDFRONT_H
#include <stdint.h>
#include <stddef.h>
#include "ring.h"

#define RF_BF_MAX_QUEUES 4
#define RF_BF_SLOTS 1024             /* fast requests in flight, over all queues */
#define RF_BF_FAST_ID (1ULL << 63)   /* ids of fast requests; Python's count up from 1 */

/* rf_nbd_pump results */
#define RF_NBD_WAIT 0        /* the socket has nothing more: wait until it is readable */
#define RF_NBD_ROOM 1        /* a fast request waits for ring slots or pages (or a connection) */
#define RF_NBD_FULL 2        /* too many replies wait for the client to read them */
#define RF_NBD_BUDGET 3      /* budget requests started: let others run, then call again */
#define RF_NBD_HANDBACK 4    /* *out holds a request for Python */
#define RF_NBD_EOF 5
#define RF_NBD_DISC 6
#define RF_NBD_BAD_MAGIC 7
#define RF_NBD_TOO_BIG 8     /* a write larger than we take: its data cannot be skipped */

typedef struct rf_bf_slot rf_bf_slot;
typedef struct rf_nbd_reply rf_nbd_reply;

typedef struct rf_bf_device {
    /* Python sets these (rings and grefs anew on each connection to a backend) */
    uint8_t *pool;
    uint32_t *grefs;                 /* [pool_pages], the current backend's */
    rf_ring *rings[RF_BF_MAX_QUEUES];
    uint32_t nqueues;
    uint32_t connected;              /* new fast requests may go on the rings */
    uint32_t failed;                 /* no backend will come: hand every request back */
    uint32_t connection;             /* which connection the rings belong to */
    uint32_t max_segments;           /* pages in one request: 11, or more with indirect */
    uint32_t read_only;
    uint64_t size;                   /* bytes */
    uint16_t handle;                 /* the vbd's devid */
    /* Python reads these */
    uint32_t pool_pages, nfree;
    uint32_t in_flight;              /* fast requests sent or to be replayed */
    uint32_t notify_mask;
    uint64_t requests, replayed, bad_responses, errors, bytes_read, bytes_written, batches;
    /* private */
    uint16_t *free_pages;
    rf_bf_slot *slots;
    uint32_t free_slots[RF_BF_SLOTS];
    uint32_t nfree_slots, next_queue;
    uint64_t next_seq;
    struct rf_nbd_conn *touched;     /* connections with replies to send (rf_bf_complete) */
} rf_bf_device;

typedef struct rf_nbd_request {
    uint16_t flags, type;
    uint64_t offset;
    uint32_t length;
    uint8_t cookie[8];
    const uint8_t *data;             /* a write's data: valid until the next pump */
} rf_nbd_request;

typedef struct rf_nbd_conn {
    int fd;
    uint32_t broken;                 /* sending failed: replies are dropped */
    uint64_t reads, writes, bytes_read, bytes_written, errors, handed_back;
    size_t queued_bytes;             /* replies the client has not taken yet */
    uint32_t outstanding;            /* its fast requests on the device */
    /* private */
    rf_bf_device *dev;
    uint8_t *in;
    size_t in_cap, in_start, in_end;
    rf_nbd_reply *out_head, *out_tail;
    uint32_t pinned;                 /* pool pages its queued replies hold */
    struct rf_nbd_conn *next_touched;
    uint32_t closed, is_touched;
} rf_nbd_conn;

rf_bf_device *rf_bf_new(uint8_t *pool, uint32_t pool_pages);
void rf_bf_free(rf_bf_device *d);
/* Pages for Python's own requests: 1 and count page indexes in out, or 0 (not enough). */
int rf_bf_take_pages(rf_bf_device *d, uint32_t count, uint16_t *out);
void rf_bf_release_pages(rf_bf_device *d, const uint16_t *pages, uint32_t count);
/* Take the responses on queue q: fast ones are answered here (their replies sent, or
 * queued), the others are copied to handback for Python, up to max_back. Returns how many
 * were handed back, or -EOVERFLOW for a backend that answered more than was asked. */
int rf_bf_complete(rf_bf_device *d, uint32_t q, uint8_t *handback, uint32_t max_back);
/* Put the fast requests not on the current rings on them, oldest first. Returns how many
 * still wait for a free slot. */
uint32_t rf_bf_replay(rf_bf_device *d);
/* No backend will come: every fast request in flight is answered with EIO. */
void rf_bf_fail_all(rf_bf_device *d);

rf_nbd_conn *rf_nbd_open(rf_bf_device *d, int fd);
/* The connection is done with: queued replies are dropped; it is freed once its last
 * fast request is answered. */
void rf_nbd_close(rf_nbd_conn *c);
/* Bytes the negotiation read past its end: the first of the transmission phase. 0 or
 * -ENOMEM. */
int rf_nbd_feed(rf_nbd_conn *c, const uint8_t *data, size_t len);
int rf_nbd_pump(rf_nbd_conn *c, rf_nbd_request *out, uint32_t budget);
/* Queue a reply (header and payload) for a request Python served. 1: some of it waits for
 * the socket (call rf_nbd_flush when writable), 0: sent. */
int rf_nbd_queue_reply(rf_nbd_conn *c, const uint8_t *data, size_t len);
/* Send what is queued: 0 all sent, 1 the socket is full, -1 the client is gone. */
int rf_nbd_flush(rf_nbd_conn *c);
#endif
