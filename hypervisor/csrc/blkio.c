#define _GNU_SOURCE
#include "blkio.h"
#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#define SEGMENTS 11
#define SECTOR 512
#define PAGE 4096
#define BATCH 64
#define OP_READ 0
#define OP_WRITE 1
#define RSP_OKAY 0
#define RSP_ERROR (-1)

/* The x86_64 blkif request and response (asserted against Xen's headers in the tests). */
struct blk_segment {
    uint32_t gref;
    uint8_t first_sect, last_sect;
    uint16_t pad;
};
struct blk_request {
    uint8_t operation, nr_segments;
    uint16_t handle;
    uint32_t pad;
    uint64_t id, sector_number;
    struct blk_segment seg[SEGMENTS];
};
struct blk_response {
    uint64_t id;
    uint8_t operation, pad;
    int16_t status;
    uint32_t pad2;
};
_Static_assert(sizeof(struct blk_request) == RF_BLK_REQUEST_SIZE, "blkif request");
_Static_assert(sizeof(struct blk_response) == RF_BLK_RESPONSE_SIZE, "blkif response");

/* Plan a request into iovecs, or return 0 when Python must see it. */
static int plan(const rf_blk_backend *b, const struct blk_request *q, struct iovec *iov,
                uint64_t *offset, uint64_t *length)
{
    if (q->operation != OP_READ && q->operation != OP_WRITE)
        return 0;
    if (q->operation == OP_WRITE && b->read_only)
        return 0;
    if (q->nr_segments < 1 || q->nr_segments > SEGMENTS)
        return 0;
    uint64_t total = 0;
    for (unsigned i = 0; i < q->nr_segments; i++) {
        const struct blk_segment *s = &q->seg[i];
        if (s->first_sect > s->last_sect || s->last_sect > PAGE / SECTOR - 1)
            return 0;
        if (s->gref >= b->ngrants || !b->pages[s->gref])
            return 0;
        if (q->operation == OP_READ && !b->writable[s->gref])
            return 0; /* the disk writes into this page */
        iov[i].iov_base = b->pages[s->gref] + (size_t)s->first_sect * SECTOR;
        iov[i].iov_len = (size_t)(s->last_sect - s->first_sect + 1) * SECTOR;
        total += iov[i].iov_len;
    }
    uint64_t end = q->sector_number + total / SECTOR;
    if (end < q->sector_number || end > b->sectors)
        return 0;
    *offset = q->sector_number * SECTOR;
    *length = total;
    return 1;
}

static int do_read(const rf_blk_backend *b, struct iovec *iov, int n, uint64_t offset, uint64_t length)
{
    uint64_t done = 0;
    while (done < length) {
        ssize_t got = preadv(b->disk_fd, iov, n, (off_t)(offset + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            break; /* past the end of a file that shrank under us: zeroes */
        done += (uint64_t)got;
        while (n && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++, n--;
        }
        if (n) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    for (int i = 0; i < n; i++)
        memset(iov[i].iov_base, 0, iov[i].iov_len);
    return 0;
}

static int do_write(const rf_blk_backend *b, struct iovec *iov, int n, uint64_t offset, uint64_t length)
{
    uint64_t done = 0;
    while (done < length) {
        ssize_t put = pwritev(b->disk_fd, iov, n, (off_t)(offset + done));
        if (put < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (put == 0)
            return -EIO;
        done += (uint64_t)put;
        while (n && (size_t)put >= iov->iov_len) {
            put -= (ssize_t)iov->iov_len;
            iov++, n--;
        }
        if (n) {
            iov->iov_base = (uint8_t *)iov->iov_base + put;
            iov->iov_len -= (size_t)put;
        }
    }
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
    struct iovec iov[SEGMENTS];
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
            if (!b->enabled || !plan(b, q, iov, &offset, &length)) {
                memcpy(handed_back + (size_t)back * RF_BLK_REQUEST_SIZE, q, RF_BLK_REQUEST_SIZE);
                back++;
                b->handed_back++;
                continue;
            }
            int err;
            if (q->operation == OP_READ) {
                err = do_read(b, iov, q->nr_segments, offset, length);
                if (!err)
                    b->reads++, b->bytes_read += length;
            } else {
                err = do_write(b, iov, q->nr_segments, offset, length);
                if (!err)
                    b->writes++, b->bytes_written += length;
            }
            if (err)
                b->io_errors++;
            b->served++;
            struct blk_response *r = &rsp[answered++];
            memset(r, 0, sizeof *r);
            r->id = q->id;
            r->operation = q->operation;
            r->status = err ? RSP_ERROR : RSP_OKAY;
        }
        if (answered) {
            rf_back_put_responses(ring, rsp, answered);
            if (rf_back_push_responses(ring, -1))
                *notify = 1;
        }
    }
    return (int)back;
}
