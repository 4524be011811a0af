#define _GNU_SOURCE
#include "blkio.h"
#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#define INDIRECT_SEGMENTS 256      /* feature-max-indirect-segments blkback advertises */
#define BATCH 64

static uint8_t *mapped(const rf_blk_backend *b, uint32_t gref)
{
    return gref < b->ngrants ? b->pages[gref] : NULL;
}

/* Plan segments (already private copies) into iovecs, or return 0 when Python must see the
 * request: Python validates it again, answers or refuses it, and counts the refusal. */
static int plan_segments(const rf_blk_backend *b, uint8_t op, const struct blk_segment *seg,
                         unsigned n, uint64_t sector, struct iovec *iov, uint64_t *offset,
                         uint64_t *length)
{
    if (op == BLK_OP_WRITE && b->read_only)
        return 0;
    uint64_t total = 0;
    for (unsigned i = 0; i < n; i++) {
        const struct blk_segment *s = &seg[i];
        if (s->first_sect > s->last_sect || s->last_sect > BLK_PAGE / BLK_SECTOR - 1)
            return 0;
        uint8_t *page = mapped(b, s->gref);
        if (!page)
            return 0;
        if (op == BLK_OP_READ && !b->writable[s->gref])
            return 0; /* the disk writes into this page */
        iov[i].iov_base = page + (size_t)s->first_sect * BLK_SECTOR;
        iov[i].iov_len = (size_t)(s->last_sect - s->first_sect + 1) * BLK_SECTOR;
        total += iov[i].iov_len;
    }
    uint64_t end = sector + total / BLK_SECTOR;
    if (end < sector || end > b->sectors)
        return 0;
    *offset = sector * BLK_SECTOR;
    *length = total;
    return 1;
}

/* A request, direct or indirect, planned: its operation and segment count, or 0. Indirect
 * segments are copied out of their (persistently mapped) page once, into seg. */
static int plan(const rf_blk_backend *b, const struct blk_request *q, struct blk_segment *seg,
                struct iovec *iov, uint8_t *op, unsigned *n, uint64_t *offset, uint64_t *length)
{
    if (q->operation == BLK_OP_READ || q->operation == BLK_OP_WRITE) {
        if (q->nr_segments < 1 || q->nr_segments > BLK_SEGMENTS)
            return 0;
        *op = q->operation;
        *n = q->nr_segments;
        memcpy(seg, q->seg, sizeof q->seg);
    } else if (q->operation == BLK_OP_INDIRECT) {
        const struct blk_indirect_request *ind = (const struct blk_indirect_request *)q;
        if (ind->indirect_op != BLK_OP_READ && ind->indirect_op != BLK_OP_WRITE)
            return 0;
        if (ind->nr_segments < 1 || ind->nr_segments > INDIRECT_SEGMENTS)
            return 0;
        const uint8_t *page = mapped(b, ind->indirect_grefs[0]); /* 256 segments: one page */
        if (!page)
            return 0;
        *op = ind->indirect_op;
        *n = ind->nr_segments;
        memcpy(seg, page, *n * sizeof *seg);
    } else {
        return 0;
    }
    return plan_segments(b, *op, seg, *n, q->sector_number, iov, offset, length);
}

/* Preadv or pwritev the whole range, resuming after short transfers. A read past the end
 * of a file that shrank under us leaves zeroes; a write that makes no progress is EIO. */
static int transfer(const rf_blk_backend *b, int writing, struct iovec *iov, int n,
                    uint64_t offset, uint64_t length)
{
    uint64_t done = 0;
    while (done < length) {
        ssize_t moved = writing ? pwritev(b->disk_fd, iov, n, (off_t)(offset + done))
                                : preadv(b->disk_fd, iov, n, (off_t)(offset + done));
        if (moved < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (moved == 0) {
            if (writing)
                return -EIO;
            break;
        }
        done += (uint64_t)moved;
        while (n && (size_t)moved >= iov->iov_len) {
            moved -= (ssize_t)iov->iov_len;
            iov++, n--;
        }
        if (n) {
            iov->iov_base = (uint8_t *)iov->iov_base + moved;
            iov->iov_len -= (size_t)moved;
        }
    }
    for (int i = 0; i < n; i++)
        memset(iov[i].iov_base, 0, iov[i].iov_len);
    return 0;
}

/* Serve what is on the ring until it is empty (after the final check) or max_back requests
 * wait for Python in handed_back. Returns how many were handed back, -EOVERFLOW for a
 * frontend that overflowed the ring. *notify says whether pushed responses need an event. */
int rf_blk_serve(rf_blk_backend *b, rf_ring *ring, uint8_t *handed_back, uint32_t max_back,
                 int *notify)
{
    struct blk_request batch[BATCH];
    struct blk_response rsp[BATCH];
    struct iovec iov[INDIRECT_SEGMENTS];
    struct blk_segment seg[INDIRECT_SEGMENTS];
    uint32_t back = 0;
    *notify = 0;
    for (;;) {
        uint32_t room = max_back - back;
        if (room == 0)
            break;
        int n = rf_back_take_requests(ring, batch, room < BATCH ? room : BATCH);
        if (n < 0)
            return n;
        if (n == 0) {
            if (rf_back_final_check_for_requests(ring))
                continue;
            break;
        }
        b->batches++;
        uint32_t answered = 0;
        for (int i = 0; i < n; i++) {
            const struct blk_request *q = &batch[i];
            uint64_t offset, length;
            uint8_t op;
            unsigned n_seg;
            if (!b->enabled || !plan(b, q, seg, iov, &op, &n_seg, &offset, &length)) {
                memcpy(handed_back + (size_t)back * RF_BLK_REQUEST_SIZE, q, RF_BLK_REQUEST_SIZE);
                back++;
                b->handed_back++;
                continue;
            }
            int err;
            err = transfer(b, op == BLK_OP_WRITE, iov, (int)n_seg, offset, length);
            if (!err && op == BLK_OP_READ)
                b->reads++, b->bytes_read += length;
            else if (!err)
                b->writes++, b->bytes_written += length;
            if (err)
                b->io_errors++;
            b->served++;
            struct blk_response *r = &rsp[answered++];
            memset(r, 0, sizeof *r);
            r->id = q->id;
            r->operation = q->operation;
            r->status = err ? BLK_RSP_ERROR : BLK_RSP_OKAY;
        }
        if (answered) {
            rf_back_put_responses(ring, rsp, answered);
            if (rf_back_push_responses(ring, -1))
                *notify = 1;
        }
    }
    return (int)back;
}
