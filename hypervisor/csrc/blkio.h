/* blkback's fast path: READ and WRITE requests whose pages are all persistently mapped,
 * served from the ring to the disk and back in one C call per batch.
 *
 * Everything else (a grant not mapped yet, flush, discard, indirect, anything invalid) is
 * handed back to Python untouched, which validates it again and answers or refuses it: the
 * fast path never rejects, so the counters of refused requests have one owner. Each request
 * is copied out of the ring once (by rf_back_take_requests) before any field is read. */
#ifndef RF_BLKIO_H
#define RF_BLKIO_H
#include <stdint.h>
#include "ring.h"
#include "blkif_abi.h"

typedef struct rf_blk_backend {
    int disk_fd;
    uint32_t read_only;
    uint32_t enabled;            /* 0: everything goes to Python (fault injection, no cache) */
    uint64_t sectors;            /* the disk's size in 512-byte units */
    uint32_t ngrants;            /* persistent grants are looked up by gref below this */
    uint8_t **pages;             /* [ngrants]: the mapped page, or NULL */
    uint8_t *writable;           /* [ngrants] */
    uint64_t reads, writes, bytes_read, bytes_written, io_errors, served, handed_back, batches;
} rf_blk_backend;

int rf_blk_serve(rf_blk_backend *b, rf_ring *ring, uint8_t *handed_back, uint32_t max_back,
                 int *notify);
#endif
