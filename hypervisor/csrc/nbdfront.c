#define _GNU_SOURCE
#include "nbdfront.h"
#include "blkif_abi.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_REPLY_MAGIC 0x67446698u
#define NBD_HEADER 28
#define NBD_REPLY 16
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_FLAG_FUA 1
#define NBD_EIO 5
#define MAX_REQUEST (32u << 20)      /* as nbd.py's MAX_REQUEST */
#define IN_BUFFER (256u << 10)
#define MAX_QUEUED (8u << 20)        /* replies held for a client that does not read */
#define MAX_PAGES 256                /* data pages of one request (indirect) */
#define NO_PAGE 0xFFFF
#define IOV_BATCH 512
#define SLOT_BITS 10
_Static_assert((1u << SLOT_BITS) == RF_BF_SLOTS, "slot index bits");

enum { SLOT_FREE, SLOT_ON_RING, SLOT_DONE };

/* A reply waiting for the socket: bytes of its own, or a fast read's header and the granted
 * pages it read into (held until sent: no copy). */
struct rf_nbd_reply {
    rf_nbd_reply *next;
    rf_bf_slot *slot;                /* NULL: data */
    uint8_t *data;
    size_t len, sent;
};

struct rf_bf_slot {
    uint64_t id, seq, sector;
    rf_nbd_conn *conn;
    rf_nbd_reply queued;
    uint32_t length, sent_on;
    uint16_t npages, descriptor;
    uint8_t kind, state;
    uint8_t header[NBD_REPLY];
    uint16_t pages[MAX_PAGES];
};

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static void put_be32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

/* ---- the device ---------------------------------------------------------------------- */

rf_bf_device *rf_bf_new(uint8_t *pool, uint32_t pool_pages)
{
    if (pool_pages >= NO_PAGE)
        return NULL;
    rf_bf_device *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->free_pages = malloc(pool_pages * sizeof *d->free_pages);
    d->slots = calloc(RF_BF_SLOTS, sizeof *d->slots);
    if (!d->free_pages || !d->slots) {
        rf_bf_free(d);
        return NULL;
    }
    d->pool = pool;
    d->pool_pages = d->nfree = pool_pages;
    for (uint32_t i = 0; i < pool_pages; i++)
        d->free_pages[i] = (uint16_t)(pool_pages - 1 - i);
    for (uint32_t i = 0; i < RF_BF_SLOTS; i++)
        d->free_slots[i] = RF_BF_SLOTS - 1 - i;
    d->nfree_slots = RF_BF_SLOTS;
    return d;
}

void rf_bf_free(rf_bf_device *d)
{
    if (!d)
        return;
    free(d->free_pages);
    free(d->slots);
    free(d);
}

int rf_bf_take_pages(rf_bf_device *d, uint32_t count, uint16_t *out)
{
    if (count > d->nfree)
        return 0;
    for (uint32_t i = 0; i < count; i++)
        out[i] = d->free_pages[--d->nfree];
    return 1;
}

void rf_bf_release_pages(rf_bf_device *d, const uint16_t *pages, uint32_t count)
{
    for (uint32_t i = 0; i < count && d->nfree < d->pool_pages; i++)
        d->free_pages[d->nfree++] = pages[i];
}

static int pick_queue(rf_bf_device *d)
{
    for (uint32_t i = 0; i < d->nqueues; i++) {
        d->next_queue = (d->next_queue + 1) % d->nqueues;
        if (rf_front_free_requests(d->rings[d->next_queue]))
            return (int)d->next_queue;
    }
    return -1;
}

/* Encode with the current backend's grefs (they change when a new backend comes). */
static void put_request(rf_bf_device *d, rf_bf_slot *s, uint32_t q)
{
    uint8_t raw[RF_BLK_REQUEST_SIZE] = {0};
    unsigned in_last = (s->length - (uint32_t)(s->npages - 1) * BLK_PAGE) / BLK_SECTOR;
    struct blk_segment seg = {0};
    if (s->descriptor == NO_PAGE) {
        struct blk_request *r = (struct blk_request *)raw;
        r->operation = s->kind;
        r->nr_segments = (uint8_t)s->npages;
        r->handle = d->handle;
        r->id = s->id;
        r->sector_number = s->sector;
        for (unsigned i = 0; i < s->npages; i++) {
            r->seg[i].gref = d->grefs[s->pages[i]];
            r->seg[i].last_sect = (uint8_t)((i + 1u == s->npages ? in_last : 8) - 1);
        }
    } else {
        /* The segments go in a granted page of their own, which the backend reads once. */
        uint8_t *page = d->pool + (size_t)s->descriptor * BLK_PAGE;
        memset(page + s->npages * sizeof seg, 0, BLK_PAGE - s->npages * sizeof seg);
        for (unsigned i = 0; i < s->npages; i++) {
            seg.gref = d->grefs[s->pages[i]];
            seg.last_sect = (uint8_t)((i + 1u == s->npages ? in_last : 8) - 1);
            memcpy(page + i * sizeof seg, &seg, sizeof seg);
        }
        struct blk_indirect_request *r = (struct blk_indirect_request *)raw;
        r->operation = BLK_OP_INDIRECT;
        r->indirect_op = s->kind;
        r->nr_segments = s->npages;
        r->id = s->id;
        r->sector_number = s->sector;
        r->handle = d->handle;
        r->indirect_grefs[0] = d->grefs[s->descriptor];
    }
    rf_front_put_requests(d->rings[q], raw, 1);
    s->sent_on = d->connection;
}

static void push_queues(rf_bf_device *d, uint32_t touched)
{
    for (uint32_t q = 0; q < d->nqueues; q++)
        if (touched & (1u << q) && rf_front_push_requests(d->rings[q], -1))
            d->notify_mask |= 1u << q;
}

static void free_slot(rf_bf_device *d, rf_bf_slot *s)
{
    rf_bf_release_pages(d, s->pages, s->npages);
    if (s->descriptor != NO_PAGE)
        rf_bf_release_pages(d, &s->descriptor, 1);
    s->state = SLOT_FREE;
    d->free_slots[d->nfree_slots++] = (uint32_t)(s - d->slots);
    d->in_flight--;
    rf_nbd_conn *c = s->conn;
    s->conn = NULL;
    if (c && --c->outstanding == 0 && c->closed) {
        free(c->in);
        free(c);
    }
}

/* ---- replies --------------------------------------------------------------------------- */

static size_t reply_iov(const rf_bf_device *d, const rf_nbd_reply *r, struct iovec *iov)
{
    if (!r->slot) {
        iov[0].iov_base = r->data;
        iov[0].iov_len = r->len;
        return 1;
    }
    const rf_bf_slot *s = r->slot;
    iov[0].iov_base = (void *)s->header;
    iov[0].iov_len = NBD_REPLY;
    uint32_t left = (uint32_t)(r->len - NBD_REPLY);
    for (unsigned i = 0; left; i++) {
        iov[1 + i].iov_base = d->pool + (size_t)s->pages[i] * BLK_PAGE;
        iov[1 + i].iov_len = left < BLK_PAGE ? left : BLK_PAGE;
        left -= (uint32_t)iov[1 + i].iov_len;
    }
    return 1 + (r->len - NBD_REPLY + BLK_PAGE - 1) / BLK_PAGE;
}

static size_t skip_bytes(struct iovec *iov, size_t n, size_t skip)
{
    size_t i = 0;
    while (i < n && skip >= iov[i].iov_len)
        skip -= iov[i++].iov_len;
    if (i < n) {
        iov[i].iov_base = (uint8_t *)iov[i].iov_base + skip;
        iov[i].iov_len -= skip;
    }
    memmove(iov, iov + i, (n - i) * sizeof *iov);
    return n - i;
}

static void append(rf_nbd_conn *c, rf_nbd_reply *r)
{
    r->next = NULL;
    if (c->out_tail)
        c->out_tail->next = r;
    else
        c->out_head = r;
    c->out_tail = r;
    c->queued_bytes += r->len - r->sent;
}

static void release(rf_nbd_conn *c, rf_nbd_reply *r)
{
    if (r->slot) {
        c->pinned -= r->slot->npages;
        free_slot(c->dev, r->slot);
    } else {
        free(r);
    }
}

static void drop_queue(rf_nbd_conn *c)
{
    while (c->out_head) {
        rf_nbd_reply *r = c->out_head;
        c->out_head = r->next;
        release(c, r);
    }
    c->out_tail = NULL;
    c->queued_bytes = 0;
}

static rf_nbd_reply *copy_reply(const struct iovec *iov, size_t n)
{
    size_t len = 0;
    for (size_t i = 0; i < n; i++)
        len += iov[i].iov_len;
    rf_nbd_reply *r = malloc(sizeof *r + len);
    if (!r)
        return NULL;
    *r = (rf_nbd_reply){.data = (uint8_t *)(r + 1), .len = len};
    for (size_t i = 0, at = 0; i < n; at += iov[i].iov_len, i++)
        memcpy(r->data + at, iov[i].iov_base, iov[i].iov_len);
    return r;
}

static ssize_t send_iov(rf_nbd_conn *c, struct iovec *iov, size_t n)
{
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = n};
    for (;;) {
        ssize_t sent = sendmsg(c->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent >= 0)
            return sent;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        c->broken = 1;   /* the client is gone: what it would have been sent is dropped */
        drop_queue(c);
        return -1;
    }
}

static void answer(rf_bf_device *d, rf_bf_slot *s, int ok)
{
    rf_nbd_conn *c = s->conn;
    int data = ok && s->kind == BLK_OP_READ;
    if (data)
        d->bytes_read += s->length;
    else if (ok)
        d->bytes_written += s->length;
    else
        d->errors++;
    if (!c || c->closed || c->broken) {
        free_slot(d, s);
        return;
    }
    if (data)
        c->reads++, c->bytes_read += s->length;
    else if (ok)
        c->writes++, c->bytes_written += s->length;
    else
        c->errors++;
    put_be32(s->header, NBD_REPLY_MAGIC);
    put_be32(s->header + 4, ok ? 0 : NBD_EIO);
    s->state = SLOT_DONE;
    if (s->descriptor != NO_PAGE)
        rf_bf_release_pages(d, &s->descriptor, 1);
    s->descriptor = NO_PAGE;
    if (!data) {   /* the reply is the header alone: the pages are free now */
        rf_bf_release_pages(d, s->pages, s->npages);
        s->npages = 0;
    }
    s->queued = (rf_nbd_reply){.slot = s, .len = NBD_REPLY + (data ? s->length : 0)};
    if (c->pinned + s->npages <= d->pool_pages / 2) {
        c->pinned += s->npages;
        append(c, &s->queued);
    } else {
        /* A client slow to read holds at most half the pool: the rest of its replies wait
         * as copies, so that the other clients' requests still find pages. */
        struct iovec iov[1 + MAX_PAGES];
        rf_nbd_reply *copy = copy_reply(iov, reply_iov(d, &s->queued, iov));
        free_slot(d, s);
        if (!copy) {
            c->broken = 1;   /* a reply lost would hang the client: end the connection */
            drop_queue(c);
            return;
        }
        append(c, copy);
    }
    if (!c->is_touched) {
        c->is_touched = 1;
        c->next_touched = d->touched;
        d->touched = c;
    }
}

static void send_touched(rf_bf_device *d)
{
    while (d->touched) {
        rf_nbd_conn *c = d->touched;
        d->touched = c->next_touched;
        c->is_touched = 0;
        rf_nbd_flush(c);
    }
}

int rf_bf_complete(rf_bf_device *d, uint32_t q, uint8_t *handback, uint32_t max_back)
{
    struct blk_response rsp[64];
    uint32_t back = 0;
    int result = 0;
    if (q >= d->nqueues)
        return 0;
    rf_ring *ring = d->rings[q];
    while (back < max_back) {
        uint32_t room = max_back - back;
        int n = rf_front_take_responses(ring, rsp, room < 64 ? room : 64);
        if (n < 0) {
            result = n;
            break;
        }
        if (n == 0) {
            if (rf_front_final_check_for_responses(ring))
                continue;
            break;
        }
        d->batches++;
        for (int i = 0; i < n; i++) {
            const struct blk_response *r = &rsp[i];
            if (!(r->id & RF_BF_FAST_ID)) {
                memcpy(handback + (size_t)back++ * RF_BLK_RESPONSE_SIZE, r, RF_BLK_RESPONSE_SIZE);
                continue;
            }
            rf_bf_slot *s = &d->slots[r->id & (RF_BF_SLOTS - 1)];
            /* an id never sent on this ring, or one answered twice, completes nothing (the
             * hardened Linux blkfront's checks) */
            if (s->state != SLOT_ON_RING || s->id != r->id || s->sent_on != d->connection) {
                d->bad_responses++;
                continue;
            }
            /* ours, answered as another operation (the request was corrupted on the ring,
             * or the backend is broken): failed, whatever the status says, and never left
             * waiting for an answer that will not come */
            int same = r->operation == s->kind || r->operation == BLK_OP_INDIRECT;
            d->bad_responses += !same;
            answer(d, s, same && r->status == BLK_RSP_OKAY);
        }
    }
    send_touched(d);
    return result < 0 ? result : (int)back;
}

static int by_seq(const void *a, const void *b)
{
    const rf_bf_slot *x = *(rf_bf_slot *const *)a, *y = *(rf_bf_slot *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

uint32_t rf_bf_replay(rf_bf_device *d)
{
    static rf_bf_slot *waiting[RF_BF_SLOTS];
    uint32_t n = 0, touched = 0;
    for (uint32_t i = 0; i < RF_BF_SLOTS; i++)
        if (d->slots[i].state == SLOT_ON_RING && d->slots[i].sent_on != d->connection)
            waiting[n++] = &d->slots[i];
    qsort(waiting, n, sizeof *waiting, by_seq);
    d->notify_mask = 0;
    uint32_t put = 0;
    for (; put < n; put++) {
        int q = pick_queue(d);
        if (q < 0)
            break;
        put_request(d, waiting[put], (uint32_t)q);
        touched |= 1u << q;
        d->replayed++;
    }
    push_queues(d, touched);
    return n - put;
}

void rf_bf_fail_all(rf_bf_device *d)
{
    for (uint32_t i = 0; i < RF_BF_SLOTS; i++)
        if (d->slots[i].state == SLOT_ON_RING)
            answer(d, &d->slots[i], 0);
    send_touched(d);
}

/* ---- requests ------------------------------------------------------------------------- */

rf_nbd_conn *rf_nbd_open(rf_bf_device *d, int fd)
{
    rf_nbd_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->in = malloc(IN_BUFFER);
    if (!c->in) {
        free(c);
        return NULL;
    }
    c->in_cap = IN_BUFFER;
    c->fd = fd;
    c->dev = d;
    return c;
}

void rf_nbd_close(rf_nbd_conn *c)
{
    drop_queue(c);   /* before closed is set: releasing a reply must not free c yet */
    c->closed = 1;
    if (c->outstanding == 0) {
        free(c->in);
        free(c);
    }
}

/* Start a fast request: 1, or 0 when the device has no room for it now. */
static int start(rf_bf_device *d, rf_nbd_conn *c, uint16_t type, const uint8_t *cookie,
                 uint64_t offset, uint32_t length, const uint8_t *data, uint32_t *touched)
{
    uint32_t npages = (length + BLK_PAGE - 1) / BLK_PAGE;
    uint32_t taking = npages > BLK_SEGMENTS ? npages + 1 : npages;
    if (!d->nfree_slots || d->nfree < taking)
        return 0;
    int q = pick_queue(d);
    if (q < 0)
        return 0;
    uint32_t index = d->free_slots[--d->nfree_slots];
    rf_bf_slot *s = &d->slots[index];
    rf_bf_take_pages(d, npages, s->pages);
    s->descriptor = NO_PAGE;
    if (taking > npages)
        rf_bf_take_pages(d, 1, &s->descriptor);
    s->seq = d->next_seq++;
    s->id = RF_BF_FAST_ID | (s->seq << SLOT_BITS) | index;  /* unique for 2^53 requests */
    s->sector = offset / BLK_SECTOR;
    s->length = length;
    s->npages = (uint16_t)npages;
    s->kind = type == NBD_CMD_WRITE ? BLK_OP_WRITE : BLK_OP_READ;
    s->state = SLOT_ON_RING;
    s->conn = c;
    memcpy(s->header + 8, cookie, 8);
    if (data)
        for (uint32_t i = 0, left = length; i < npages; i++, left -= BLK_PAGE)
            memcpy(d->pool + (size_t)s->pages[i] * BLK_PAGE, data + (size_t)i * BLK_PAGE,
                   left < BLK_PAGE ? left : BLK_PAGE);
    /* A granted page holds this request's bytes and zeroes, nothing older (XSA-403). */
    uint32_t used = length - (npages - 1) * BLK_PAGE;
    memset(d->pool + (size_t)s->pages[npages - 1] * BLK_PAGE + used, 0, BLK_PAGE - used);
    put_request(d, s, (uint32_t)q);
    *touched |= 1u << q;
    c->outstanding++;
    d->in_flight++;
    d->requests++;
    return 1;
}

static int fast(const rf_bf_device *d, uint16_t flags, uint16_t type, uint64_t offset, uint32_t length)
{
    return d && !d->failed && (type == NBD_CMD_READ || (type == NBD_CMD_WRITE && !d->read_only))
        && !(flags & NBD_FLAG_FUA) && length && !((offset | length) % BLK_SECTOR)
        && offset <= d->size && length <= d->size - offset
        && (length + BLK_PAGE - 1) / BLK_PAGE <= d->max_segments;
}

/* Make room for need bytes from in_start on. 0 or -ENOMEM. */
static int reserve(rf_nbd_conn *c, size_t need)
{
    if (c->in_start == c->in_end)
        c->in_start = c->in_end = 0;
    if (c->in_cap - c->in_start >= need && c->in_cap - c->in_end >= 4096)
        return 0;
    memmove(c->in, c->in + c->in_start, c->in_end - c->in_start);
    c->in_end -= c->in_start;
    c->in_start = 0;
    if (need > c->in_cap) {
        uint8_t *bigger = realloc(c->in, need);
        if (!bigger)
            return -ENOMEM;
        c->in = bigger;
        c->in_cap = need;
    }
    return 0;
}

int rf_nbd_pump(rf_nbd_conn *c, rf_nbd_request *out, uint32_t budget)
{
    rf_bf_device *d = c->dev;
    uint32_t touched = 0, started = 0;
    int rc;
    if (d)
        d->notify_mask = 0;
    for (;;) {
        size_t avail = c->in_end - c->in_start, need = NBD_HEADER;
        if (avail >= NBD_HEADER) {
            const uint8_t *h = c->in + c->in_start;
            uint16_t flags = be16(h + 4), type = be16(h + 6);
            uint64_t offset = be64(h + 16);
            uint32_t length = be32(h + 24);
            if (be32(h) != NBD_REQUEST_MAGIC) {
                rc = RF_NBD_BAD_MAGIC;
                break;
            }
            if (type == NBD_CMD_DISC) {
                c->in_start += NBD_HEADER;
                rc = RF_NBD_DISC;
                break;
            }
            if (type == NBD_CMD_WRITE) {
                if (length > MAX_REQUEST) {
                    rc = RF_NBD_TOO_BIG;
                    break;
                }
                need += length;
            }
            if (avail >= need) {
                const uint8_t *data = type == NBD_CMD_WRITE ? h + NBD_HEADER : NULL;
                if (fast(d, flags, type, offset, length)) {
                    if (c->queued_bytes > MAX_QUEUED) {
                        rc = RF_NBD_FULL;
                        break;
                    }
                    if (!d->connected || !start(d, c, type, h + 8, offset, length, data, &touched)) {
                        rc = RF_NBD_ROOM;
                        break;
                    }
                    c->in_start += need;
                    if (++started >= budget) {
                        rc = RF_NBD_BUDGET;
                        break;
                    }
                    continue;
                }
                out->flags = flags;
                out->type = type;
                out->offset = offset;
                out->length = length;
                memcpy(out->cookie, h + 8, 8);
                out->data = data;
                c->in_start += need;
                c->handed_back++;
                rc = RF_NBD_HANDBACK;
                break;
            }
        }
        if (reserve(c, need) < 0) {
            rc = RF_NBD_TOO_BIG;
            break;
        }
        ssize_t got = recv(c->fd, c->in + c->in_end, c->in_cap - c->in_end, MSG_DONTWAIT);
        if (got > 0) {
            c->in_end += (size_t)got;
            continue;
        }
        if (got < 0 && errno == EINTR)
            continue;
        rc = got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? RF_NBD_WAIT : RF_NBD_EOF;
        break;
    }
    if (d)
        push_queues(d, touched);
    return rc;
}

int rf_nbd_feed(rf_nbd_conn *c, const uint8_t *data, size_t len)
{
    if (reserve(c, c->in_end - c->in_start + len) < 0)
        return -ENOMEM;
    memcpy(c->in + c->in_end, data, len);
    c->in_end += len;
    return 0;
}

int rf_nbd_queue_reply(rf_nbd_conn *c, const uint8_t *data, size_t len)
{
    struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
    if (c->broken)
        return 0;
    rf_nbd_reply *r = copy_reply(&iov, 1);
    if (!r) {
        c->broken = 1;
        drop_queue(c);
        return 0;
    }
    append(c, r);
    return rf_nbd_flush(c) == 1;
}

int rf_nbd_flush(rf_nbd_conn *c)
{
    static struct iovec iov[IOV_BATCH];
    while (c->out_head && !c->broken) {
        size_t n = 0;
        for (rf_nbd_reply *r = c->out_head; r; r = r->next) {
            if (n + 1 + MAX_PAGES > IOV_BATCH)
                break;
            size_t k = reply_iov(c->dev, r, iov + n);
            n += r == c->out_head ? skip_bytes(iov + n, k, r->sent) : k;
        }
        ssize_t sent = send_iov(c, iov, n);
        if (sent <= 0)
            return sent < 0 ? -1 : 1;
        while (sent > 0) {
            rf_nbd_reply *r = c->out_head;
            size_t left = r->len - r->sent;
            c->queued_bytes -= (size_t)sent < left ? (size_t)sent : left;
            if ((size_t)sent < left) {
                r->sent += (size_t)sent;
                break;
            }
            sent -= (ssize_t)left;
            c->out_head = r->next;
            if (!c->out_head)
                c->out_tail = NULL;
            release(c, r);
        }
    }
    return c->broken ? -1 : 0;
}
