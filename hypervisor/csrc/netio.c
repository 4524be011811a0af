#define _GNU_SOURCE
#include "netio.h"
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096
#define BATCH 256                  /* a tx ring's slots */
#define NR_SLOTS_MIN 18            /* XEN_NETIF_NR_SLOTS_MIN */
#define ETH_HLEN 14
#define TXF_CSUM_BLANK 1
#define TXF_DATA_VALIDATED 2
#define TXF_MORE_DATA 4
#define TXF_EXTRA_INFO 8
#define EXTRA_TYPE_GSO 1
#define EXTRA_FLAG_MORE 1
#define XEN_GSO_TCPV4 1
#define XEN_GSO_TCPV6 2
#define STATUS_OKAY 0
#define STATUS_DROPPED (-2)
#define STATUS_NULL 1
#define VNET_NEEDS_CSUM 1
#define VNET_DATA_VALID 2
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_ECN 0x80
#define MAX_PIECES 17              /* pages of the largest frame a TAP hands us */

struct tx_request {
    uint32_t gref;
    uint16_t offset, flags, id, size;
};
struct tx_extra {
    uint8_t type, flags;
    uint16_t gso_size;
    uint8_t gso_type, pad;
    uint16_t features;
    uint8_t unused[4];
};
struct tx_response {
    uint16_t id;
    int16_t status;
};
struct vnet_header {  /* virtio_net_hdr and num_buffers, as the TAPs are set up (12 bytes) */
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset, num_buffers;
};
_Static_assert(sizeof(struct tx_request) == RF_NET_TX_REQUEST_SIZE, "netif tx request");
_Static_assert(sizeof(struct tx_extra) == RF_NET_TX_REQUEST_SIZE, "netif extra info in a tx slot");
_Static_assert(sizeof(struct tx_response) == 4, "netif tx response");
_Static_assert(sizeof(struct vnet_header) == 12, "vnet header");

static unsigned be16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }

/* Where a TCP or UDP frame's checksum goes (vnet.checksum_location): 1 and the three
 * values, or 0. Every offset is checked against the length. */
static int checksum_location(const uint8_t *f, unsigned n, unsigned *start, unsigned *offset,
                             unsigned *headers)
{
    unsigned at = 12, protocol;
    if (n < at + 2)
        return 0;
    unsigned ethertype = be16(f + at);
    at += 2;
    if (ethertype == 0x8100) {
        if (n < at + 4)
            return 0;
        ethertype = be16(f + at + 2);
        at += 4;
    }
    if (ethertype == 0x0800) {
        if (n < at + 20)
            return 0;
        unsigned ihl = (f[at] & 0x0F) * 4u;
        if (ihl < 20 || (be16(f + at + 6) & 0x3FFF))
            return 0;
        protocol = f[at + 9];
        at += ihl;
    } else if (ethertype == 0x86DD) {
        if (n < at + 40)
            return 0;
        protocol = f[at + 6];
        at += 40;
        for (int i = 0; i < 8 && (protocol == 0 || protocol == 43 || protocol == 60); i++) {
            if (n < at + 2)
                return 0;
            unsigned length = (f[at + 1] + 1u) * 8;
            protocol = f[at];
            at += length;
        }
    } else {
        return 0;
    }
    if (protocol == 6) {
        unsigned tcp = n >= at + 20 ? (f[at + 12] >> 4) * 4u : 0;
        if (tcp < 20 || n < at + tcp)
            return 0;
        *start = at, *offset = 16, *headers = at + tcp;
        return 1;
    }
    if (protocol == 17) {
        if (n < at + 8)
            return 0;
        *start = at, *offset = 6, *headers = at + 8;
        return 1;
    }
    return 0;
}

/* The vnet header a frame goes to a TAP with, from what the other end said of it (Xen GSO
 * type and size, a partial checksum, a checksum already checked): 1, or 0 when it asks for a
 * checksum or segmentation its headers do not allow (vnet.header_for). The headers are read
 * from a private copy. */
static int vnet_for(const uint8_t *frame, unsigned len, unsigned xen_gso, unsigned gso_size,
                    int partial, int validated, struct vnet_header *vnet)
{
    unsigned start, offset, headers;
    *vnet = (struct vnet_header){0};
    if (xen_gso) {
        if (!checksum_location(frame, len, &start, &offset, &headers) || offset != 16)
            return 0;  /* only TCP is segmented */
        *vnet = (struct vnet_header){VNET_NEEDS_CSUM, xen_gso == XEN_GSO_TCPV4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6,
                                     (uint16_t)headers, (uint16_t)gso_size, (uint16_t)start, (uint16_t)offset, 0};
    } else if (partial) {
        if (!checksum_location(frame, len, &start, &offset, &headers))
            return 0;
        *vnet = (struct vnet_header){VNET_NEEDS_CSUM, 0, 0, 0, (uint16_t)start, (uint16_t)offset, 0};
    } else if (validated) {
        vnet->flags = VNET_DATA_VALID;
    }
    return 1;
}

static const uint8_t *mapped(const rf_net_tx *t, uint32_t gref)
{
    return gref < t->ngrants ? t->pages[gref] : NULL;
}

/* Serve the packet starting at batch[i]: the slots it used, or 0 for Python. Responses are
 * appended to rsp. */
static uint32_t serve_packet(rf_net_tx *t, const struct tx_request *batch, uint32_t i, uint32_t n,
                             struct tx_response *rsp, uint32_t *nrsp)
{
    static __thread uint8_t first_copy[PAGE];
    const struct tx_request *first = &batch[i];
    uint32_t j = i + 1, extras = 0;
    struct vnet_header vnet = {0};
    unsigned gso_type = 0, gso_size = 0;
    if (first->flags & TXF_EXTRA_INFO) {
        if (j >= n)
            return 0;
        const struct tx_extra *extra = (const struct tx_extra *)&batch[j++];
        extras = 1;
        if (extra->type != EXTRA_TYPE_GSO || extra->flags & EXTRA_FLAG_MORE)
            return 0;
        gso_type = extra->gso_type, gso_size = extra->gso_size;
        if ((gso_type != XEN_GSO_TCPV4 && gso_type != XEN_GSO_TCPV6) || !gso_size)
            return 0;
    }
    uint32_t data = j, count = 1;
    for (uint16_t more = first->flags & TXF_MORE_DATA; more; more = batch[j++].flags & TXF_MORE_DATA) {
        if (j >= n || count >= NR_SLOTS_MIN)
            return 0;
        count++;
    }
    uint32_t rest = 0;
    for (uint32_t k = data; k < j; k++)
        rest += batch[k].size;
    if (first->size < ETH_HLEN || rest > first->size)  /* size is 16 bits: never over MAX_TX_SIZE */
        return 0;
    struct iovec iov[2 + NR_SLOTS_MIN];
    unsigned first_len = first->size - rest, nio = 2;
    const uint8_t *page = mapped(t, first->gref);
    if (!page || first->offset + first_len > PAGE || !first_len)
        return 0;
    for (uint32_t k = data; k < j; k++) {
        const struct tx_request *s = &batch[k];
        const uint8_t *p = mapped(t, s->gref);
        if (!p || s->offset + s->size > PAGE)
            return 0;
        if (s->size) {
            iov[nio].iov_base = (void *)(p + s->offset);
            iov[nio++].iov_len = s->size;
        }
    }
    /* the headers are read from this private copy only, and it is what the TAP gets */
    memcpy(first_copy, page + first->offset, first_len);
    if (!vnet_for(first_copy, first_len, gso_type, gso_size, first->flags & TXF_CSUM_BLANK,
                  first->flags & TXF_DATA_VALIDATED, &vnet))
        return 0;
    iov[0].iov_base = &vnet;
    iov[0].iov_len = sizeof vnet;
    iov[1].iov_base = first_copy;
    iov[1].iov_len = first_len;
    ssize_t written;
    do
        written = writev(t->tap_fd, iov, (int)nio);
    while (written < 0 && errno == EINTR);
    int16_t status = written < 0 ? STATUS_DROPPED : STATUS_OKAY;
    if (written < 0)
        t->dropped++;
    else
        t->packets++, t->bytes += first->size;
    rsp[(*nrsp)++] = (struct tx_response){first->id, status};
    if (extras)
        rsp[(*nrsp)++] = (struct tx_response){0, STATUS_NULL};
    for (uint32_t k = data; k < j; k++)
        rsp[(*nrsp)++] = (struct tx_response){batch[k].id, status};
    return j - i;
}

int rf_net_tx_serve(rf_net_tx *t, rf_ring *ring, uint8_t *handed_back, int *notify)
{
    static __thread struct tx_request batch[BATCH];
    static __thread struct tx_response rsp[BATCH];
    *notify = 0;
    for (;;) {
        int n = rf_back_take_requests(ring, batch, BATCH);
        if (n < 0)
            return n;
        if (n == 0) {
            if (rf_back_final_check_for_requests(ring))
                continue;
            return 0;
        }
        t->batches++;
        uint32_t i = 0, nrsp = 0;
        while (i < (uint32_t)n) {
            uint32_t used = t->enabled ? serve_packet(t, batch, i, (uint32_t)n, rsp, &nrsp) : 0;
            if (!used)
                break;
            i += used;
        }
        if (nrsp) {
            rf_back_put_responses(ring, rsp, nrsp);
            if (rf_back_push_responses(ring, -1))
                *notify = 1;
        }
        if (i < (uint32_t)n) {
            uint32_t back = (uint32_t)n - i;
            memcpy(handed_back, &batch[i], (size_t)back * RF_NET_TX_REQUEST_SIZE);
            t->handed_back += back;
            return (int)back;
        }
    }
}

/* ---- netback's receive side --------------------------------------------------------------- */

#define RXF_DATA_VALIDATED 1
#define RXF_CSUM_BLANK 2
#define RXF_MORE_DATA 4
#define RXF_EXTRA_INFO 8
#define STATUS_ERROR (-1)

struct rx_response {
    uint16_t id, offset, flags;
    int16_t status;
};
struct rx_extra {
    uint8_t type, flags;
    uint16_t gso_size;
    uint8_t gso_type, pad;
    uint16_t features;
};
_Static_assert(sizeof(struct rx_response) == 8, "netif rx response");
_Static_assert(sizeof(struct rx_extra) == 8, "netif extra info in an rx slot");

uint32_t rf_net_rx_post(rf_net_rx *r, const uint16_t *ids, const uint32_t *grefs, uint32_t n)
{
    uint32_t taken = 0;
    for (; taken < n && r->posted_count < r->posted_cap; taken++) {
        uint32_t at = (r->posted_head + r->posted_count++) % r->posted_cap;
        r->posted_ids[at] = ids[taken];
        r->posted_grefs[at] = grefs[taken];
    }
    return taken;
}

static void take_posted(rf_net_rx *r, uint16_t *id, uint32_t *gref)
{
    *id = r->posted_ids[r->posted_head];
    *gref = r->posted_grefs[r->posted_head];
    r->posted_head = (r->posted_head + 1) % r->posted_cap;
    r->posted_count--;
}

/* The buffer k places after the oldest posted: its page, or NULL if C cannot write it. */
static uint8_t *posted_page(const rf_net_rx *r, uint32_t k)
{
    return rf_net_rx_writable_page(r, r->posted_grefs[(r->posted_head + k) % r->posted_cap]);
}

static unsigned xen_gso_of(const struct vnet_header *vnet)
{
    unsigned kind = vnet->gso_type & ~VNET_GSO_ECN;
    return kind == VNET_GSO_TCPV4 ? XEN_GSO_TCPV4 : kind == VNET_GSO_TCPV6 ? XEN_GSO_TCPV6 : 0;
}

/* Reads the next packet from the TAP straight into the buffers posted, where its responses
 * will say it is: piece i in the i-th buffer, one later from the second piece on when a GSO
 * extra takes the second slot. Whether it does is known only once read: the layout of the
 * last packet is assumed, and pieces are moved between the guest's pages when wrong (rare:
 * a stream's large packets are all GSO or all not). Returns the bytes read (header included), 0 when the
 * buffers cannot take any packet (too few posted, or a page C cannot write: the private copy
 * serves), or -errno. */
static ssize_t read_into_buffers(rf_net_rx *r, struct vnet_header *vnet)
{
    uint8_t *pages[MAX_PIECES + 1];
    struct iovec iov[1 + MAX_PIECES];
    if (r->posted_count < MAX_PIECES + 1)
        return 0;
    for (uint32_t k = 0; k < MAX_PIECES + 1; k++)
        if (!(pages[k] = posted_page(r, k)))
            return 0;
    uint32_t skip = r->expect_gso ? 1 : 0;
    iov[0].iov_base = vnet;
    iov[0].iov_len = sizeof *vnet;
    for (uint32_t i = 0; i < MAX_PIECES; i++) {
        iov[1 + i].iov_base = pages[i ? i + skip : 0];
        iov[1 + i].iov_len = PAGE;
    }
    ssize_t got;
    do
        got = readv(r->tap_fd, iov, 1 + MAX_PIECES);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return -errno;
    if ((size_t)got < sizeof *vnet)
        return got;
    uint32_t length = (uint32_t)got - (uint32_t)sizeof *vnet;
    uint32_t pieces = length ? (length + PAGE - 1) / PAGE : 1;
    uint32_t gso = xen_gso_of(vnet) ? 1 : 0;
    if (pieces > 1 && gso != skip) {
        r->moved++;
        if (gso)  /* pieces 1.. are one buffer early: move them up, the last first */
            for (uint32_t i = pieces - 1; i >= 1; i--)
                memmove(pages[i + 1], pages[i], i + 1 < pieces ? PAGE : length - i * PAGE);
        else      /* one buffer late: move them down, the first first */
            for (uint32_t i = 1; i < pieces; i++)
                memmove(pages[i], pages[i + 1], i + 1 < pieces ? PAGE : length - i * PAGE);
    }
    if (pieces > 1)  /* a packet of one piece fits either layout: it tells nothing */
        r->expect_gso = gso;
    return got;
}

int rf_net_rx_serve(rf_net_rx *r, rf_ring *ring, uint32_t budget, int *notify)
{
    static __thread struct rx_response rsp[MAX_PIECES + 1];
    uint32_t sent = 0;
    int result;
    *notify = 0;
    for (;;) {
        if (sent >= budget) {
            result = RF_NETBACK_BUDGET;
            break;
        }
        struct vnet_header vnet;
        int direct = 0;  /* the packet is in the buffers already */
        if (!r->have_packet) {
            ssize_t got = read_into_buffers(r, &vnet);
            direct = got > 0;
            if (got == 0 && (got = read(r->tap_fd, r->packet, RF_NET_RX_PACKET)) < 0)
                got = -errno;
            if (got < 0) {
                if (got == -EINTR)
                    continue;
                result = got == -EAGAIN || got == -EWOULDBLOCK ? RF_NETBACK_TAP_EMPTY : (int)got;
                break;
            }
            r->packet_len = (uint32_t)got;
            r->have_packet = !direct;
            r->direct += (uint64_t)direct;
        }
        if (r->packet_len < sizeof vnet) {
            r->have_packet = 0;
            r->dropped++;
            continue;
        }
        if (!direct)
            memcpy(&vnet, r->packet, sizeof vnet);
        const uint8_t *frame = r->packet + sizeof vnet;
        uint32_t length = r->packet_len - (uint32_t)sizeof vnet;
        uint32_t pieces = length ? (length + PAGE - 1) / PAGE : 1;
        unsigned xen_gso = xen_gso_of(&vnet);
        if ((pieces > 1 && !r->sg) || (vnet.gso_type && !xen_gso) || pieces > MAX_PIECES) {
            r->have_packet = 0;  /* the guest cannot take it (the TAP's offloads should prevent it) */
            r->dropped++;
            continue;
        }
        if (r->posted_count < pieces + (xen_gso ? 1 : 0)) {
            result = RF_NETBACK_NO_BUFFERS;
            break;
        }
        uint16_t flags = vnet.flags & VNET_NEEDS_CSUM ? RXF_CSUM_BLANK | RXF_DATA_VALIDATED
                       : vnet.flags & VNET_DATA_VALID ? RXF_DATA_VALIDATED : 0;
        uint32_t n = 0;
        int whole = 1;
        for (uint32_t i = 0; i < pieces; i++) {
            uint16_t id;
            uint32_t gref, len = length - i * PAGE < PAGE ? length - i * PAGE : PAGE;
            take_posted(r, &id, &gref);
            uint8_t *page = rf_net_rx_writable_page(r, gref);
            if (!page)
                whole = 0;
            else if (!direct)
                memcpy(page, frame + (size_t)i * PAGE, len);
            uint16_t piece_flags = i + 1 < pieces ? RXF_MORE_DATA : 0;
            if (i == 0)
                piece_flags |= flags | (xen_gso ? RXF_EXTRA_INFO : 0);
            rsp[n++] = (struct rx_response){id, 0, piece_flags, (int16_t)len};
            if (i == 0 && xen_gso) {
                take_posted(r, &id, &gref);  /* its slot carries the extra info */
                struct rx_extra extra = {EXTRA_TYPE_GSO, 0, vnet.gso_size, (uint8_t)xen_gso, 0, 0};
                memcpy(&rsp[n++], &extra, sizeof extra);
            }
        }
        if (!whole) {
            rsp[0].status = STATUS_ERROR;  /* a buffer we cannot write: the packet is lost */
            r->bad_grants++;
        } else {
            r->packets++;
        }
        rf_back_put_responses(ring, rsp, n);
        r->have_packet = 0;
        sent++;
    }
    if (sent) {
        r->batches++;
        if (rf_back_push_responses(ring, -1))
            *notify = 1;
    }
    return result;
}

/* ---- netfront ------------------------------------------------------------------------- */

#define MAX_TX_SIZE 0xFFFF         /* XEN_NETIF_MAX_TX_SIZE */

int rf_netfront_tx_pump(rf_netfront_tx *f, rf_ring *ring, uint32_t budget, int *notify)
{
    struct vnet_header vnet;
    struct iovec iov[1 + MAX_PIECES];
    uint32_t sent = 0;
    int result;
    *notify = 0;
    for (;;) {
        if (sent >= budget) {
            result = RF_NETFRONT_BUDGET;
            break;
        }
        if (f->nfree < MAX_PIECES || rf_front_free_requests(ring) < MAX_PIECES + 1) {
            result = RF_NETFRONT_NO_ROOM;
            break;
        }
        uint16_t *slots = &f->free[f->nfree - MAX_PIECES];
        iov[0].iov_base = &vnet;
        iov[0].iov_len = sizeof vnet;
        for (int i = 0; i < MAX_PIECES; i++) {
            iov[1 + i].iov_base = f->pages + (size_t)slots[i] * PAGE;
            iov[1 + i].iov_len = PAGE;
        }
        ssize_t got = readv(f->tap_fd, iov, 1 + MAX_PIECES);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            result = errno == EAGAIN || errno == EWOULDBLOCK ? RF_NETFRONT_TAP_EMPTY : -errno;
            break;
        }
        long length = (long)got - (long)sizeof vnet;
        uint32_t pieces = length > 0 ? (uint32_t)((length + PAGE - 1) / PAGE) : 1;
        for (uint32_t i = 0; length > 0 && i < pieces; i++) {  /* kept or not, it is there */
            uint16_t *dirty = &f->dirty[slots[i]];
            uint32_t written = (uint32_t)length - i * PAGE < PAGE ? (uint32_t)length - i * PAGE : PAGE;
            if (written > *dirty)
                *dirty = (uint16_t)written;
        }
        unsigned xen_gso = xen_gso_of(&vnet);
        if (length < 0 || (pieces > 1 && !f->sg) || length > MAX_TX_SIZE || (vnet.gso_type && !xen_gso)) {
            f->dropped++;
            continue;
        }
        /* A granted page holds the frame's bytes and zeroes (XSA-403): what is left of an
         * older, longer frame after this one's last byte goes. */
        uint32_t tail = (uint32_t)length - (pieces - 1) * PAGE;
        uint16_t *dirty = &f->dirty[slots[pieces - 1]];
        if (*dirty > tail)
            memset(f->pages + (size_t)slots[pieces - 1] * PAGE + tail, 0, *dirty - tail);
        *dirty = (uint16_t)tail;
        uint16_t flags = vnet.flags & VNET_NEEDS_CSUM ? TXF_CSUM_BLANK | TXF_DATA_VALIDATED
                       : vnet.flags & VNET_DATA_VALID ? TXF_DATA_VALIDATED : 0;
        uint16_t used[MAX_PIECES];
        memcpy(used, slots, pieces * sizeof *used);
        memmove(slots, slots + pieces, (MAX_PIECES - pieces) * sizeof *slots);
        f->nfree -= pieces;
        for (uint32_t i = 0; i < pieces; i++) {
            uint32_t piece = (uint32_t)length - i * PAGE;
            uint16_t more = i + 1 < pieces ? TXF_MORE_DATA : 0;
            /* the first slot carries the packet's whole size, the others their own */
            struct tx_request r = {f->grefs[used[i]], 0, more, used[i],
                                   (uint16_t)(i == 0 ? (uint32_t)length : piece < PAGE ? piece : PAGE)};
            f->on_ring[used[i]] = 1;
            if (i == 0) {
                r.flags |= flags | (xen_gso ? TXF_EXTRA_INFO : 0);
                rf_front_put_requests(ring, &r, 1);
                if (xen_gso) {
                    struct tx_extra extra = {EXTRA_TYPE_GSO, 0, vnet.gso_size, (uint8_t)xen_gso, 0, 0, {0}};
                    rf_front_put_requests(ring, &extra, 1);
                }
            } else {
                rf_front_put_requests(ring, &r, 1);
            }
        }
        f->packets++;
        sent++;
    }
    if (sent) {
        f->batches++;
        if (rf_front_push_requests(ring, -1))
            *notify = 1;
    }
    return result;
}

int rf_netfront_tx_complete(rf_netfront_tx *f, rf_ring *ring)
{
    struct tx_response rsp[BATCH];
    int back = 0;
    for (;;) {
        int n = rf_front_take_responses(ring, rsp, BATCH);
        if (n < 0)
            return n;
        if (n == 0)
            return back;
        for (int i = 0; i < n; i++) {
            if (rsp[i].status == STATUS_NULL)
                continue;  /* the answer to an extra-info slot */
            uint16_t id = rsp[i].id;
            if (id >= f->buffers || !f->on_ring[id] || f->nfree >= f->buffers) {
                f->bad_responses++;
                continue;
            }
            f->on_ring[id] = 0;
            f->free[f->nfree++] = id;
            back++;
        }
    }
}

static void repost(rf_netfront_rx *f, rf_ring *ring, uint16_t id)
{
    struct { uint16_t id, pad; uint32_t gref; } req = {id, 0, f->grefs[id]};
    rf_front_put_requests(ring, &req, 1);
    f->posted[(f->posted_head + f->posted_count++) % f->buffers] = id;
}

void rf_netfront_rx_start(rf_netfront_rx *f, rf_ring *ring)
{
    f->posted_head = f->posted_count = 0;
    f->nheld = f->npieces = f->in_packet = 0;
    for (uint32_t id = 0; id < f->buffers && id < ring->nr_ents; id++)
        repost(f, ring, (uint16_t)id);
    rf_front_push_requests(ring, -1);
}

static void deliver(rf_netfront_rx *f)
{
    static __thread uint8_t first_copy[PAGE];
    struct iovec iov[2 + MAX_RX_PIECES];
    struct vnet_header vnet = {0};
    if (f->bad || !f->npieces) {
        f->dropped++;
        return;
    }
    unsigned first_len = f->lengths[0];
    memcpy(first_copy, f->pages + (size_t)f->piece_ids[0] * PAGE + f->offsets[0], first_len);
    if (!vnet_for(first_copy, first_len, f->gso_type, f->gso_size, f->flags & RXF_CSUM_BLANK,
                  f->flags & RXF_DATA_VALIDATED, &vnet)) {
        f->dropped++;
        return;
    }
    iov[0].iov_base = &vnet;
    iov[0].iov_len = sizeof vnet;
    iov[1].iov_base = first_copy;
    iov[1].iov_len = first_len;
    uint32_t n = 2;
    for (uint32_t piece = 1; piece < f->npieces; piece++) {
        iov[n].iov_base = f->pages + (size_t)f->piece_ids[piece] * PAGE + f->offsets[piece];
        iov[n++].iov_len = f->lengths[piece];
    }
    ssize_t written;
    do
        written = writev(f->tap_fd, iov, (int)n);
    while (written < 0 && errno == EINTR);
    if (written < 0)
        f->dropped++;
    else
        f->packets++;
}

int rf_netfront_rx_serve(rf_netfront_rx *f, rf_ring *ring, int *notify)
{
    struct rx_response rsp[BATCH];
    int total = 0;
    *notify = 0;
    for (;;) {
        int n = rf_front_take_responses(ring, rsp, BATCH);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        total += n;
        for (int i = 0; i < n; i++) {
            if (!f->posted_count) {
                f->bad_responses++;  /* more answers than buffers posted */
                continue;
            }
            uint16_t expected = f->posted[f->posted_head];
            f->posted_head = (f->posted_head + 1) % f->buffers;
            f->posted_count--;
            if (f->nheld == MAX_RX_PIECES) {  /* a chain longer than any packet: drop it */
                for (uint32_t k = 0; k < f->nheld; k++)
                    repost(f, ring, f->held[k]);
                f->nheld = f->npieces = 0;
                f->bad = 1;
            }
            f->held[f->nheld++] = expected;
            if (f->in_packet && f->extras_expected) {
                struct rx_extra extra;
                memcpy(&extra, &rsp[i], sizeof extra);
                if (extra.type == EXTRA_TYPE_GSO)
                    f->gso_type = extra.gso_type, f->gso_size = extra.gso_size;
                f->extras_expected = extra.flags & EXTRA_FLAG_MORE;
                continue;
            }
            const struct rx_response *r = &rsp[i];
            if (!f->in_packet) {
                f->in_packet = 1;
                f->flags = r->flags;
                f->extras_expected = r->flags & RXF_EXTRA_INFO;
                f->gso_type = f->gso_size = 0;
                f->npieces = 0;
                f->bad = 0;
            }
            if (r->id != expected || r->status < 0 || r->offset + r->status > PAGE) {
                f->bad = 1;
                f->bad_responses += r->id != expected;
            } else {
                f->piece_ids[f->npieces] = expected;
                f->offsets[f->npieces] = r->offset;
                f->lengths[f->npieces++] = (uint16_t)r->status;
            }
            if (!(r->flags & RXF_MORE_DATA)) {
                deliver(f);
                for (uint32_t k = 0; k < f->nheld; k++)
                    repost(f, ring, f->held[k]);
                f->nheld = 0;
                f->in_packet = 0;
            }
        }
    }
    if (total) {
        f->batches++;
        if (rf_front_push_requests(ring, -1))
            *notify = 1;
    }
    return total;
}
