/* The other end of our ring, written with Xen's own io/ring.h macros (Debian libxen-dev).
 *
 *   xen_ring_peer sizes
 *   xen_ring_peer front|back blk|nettx SHM_PATH START COUNT
 *
 * "front" initialises the shared ring at index START (prints "ready"), produces COUNT
 * requests and checks every response; "back" attaches at START, checks every request and
 * answers it. Contents follow the same deterministic pattern as test_ring_xen_abi.py. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sched.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>

#define xen_mb() __sync_synchronize()
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#define xen_rmb() __sync_synchronize()
#define xen_wmb() __sync_synchronize()
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/xs_wire.h>

#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)

static time_t deadline;
static void tick(void) { sched_yield(); if (time(NULL) > deadline) FAIL("timeout"); }

static void blk_fill(blkif_request_t *r, uint32_t i)
{
    memset(r, 0, sizeof *r);
    r->operation = i % 2;
    r->nr_segments = i % 12;
    r->handle = (uint16_t)(i * 3);
    r->id = (uint64_t)i * 0x100000001ULL + 7;
    r->sector_number = (uint64_t)i * 8 + ((uint64_t)i << 33);
    for (int j = 0; j < r->nr_segments && j < BLKIF_MAX_SEGMENTS_PER_REQUEST; j++) {
        r->seg[j].gref = i * 16 + j;
        r->seg[j].first_sect = j % 8;
        r->seg[j].last_sect = 7;
    }
}

static int blk_same(const blkif_request_t *a, const blkif_request_t *b)
{
    if (a->operation != b->operation || a->nr_segments != b->nr_segments ||
        a->handle != b->handle || a->id != b->id || a->sector_number != b->sector_number)
        return 0;
    for (int j = 0; j < a->nr_segments; j++)
        if (a->seg[j].gref != b->seg[j].gref || a->seg[j].first_sect != b->seg[j].first_sect ||
            a->seg[j].last_sect != b->seg[j].last_sect)
            return 0;
    return 1;
}

static void tx_fill(netif_tx_request_t *r, uint32_t i)
{
    r->gref = i; r->offset = i % 4096; r->flags = i & 15; r->id = i & 0xffff;
    r->size = (uint16_t)(i * 7);
}

#define RUN_FRONT(PFX, REQ_T, FILL, CHECK_RSP)                                           \
    do {                                                                                 \
        PFX##_sring_t *s = map;                                                          \
        PFX##_front_ring_t fr;                                                           \
        SHARED_RING_INIT(s);                                                             \
        FRONT_RING_INIT(&fr, s, 4096);                                                   \
        s->req_prod = s->rsp_prod = start;                                               \
        s->req_event = s->rsp_event = start + 1;                                         \
        fr.req_prod_pvt = fr.rsp_cons = start;                                           \
        printf("ready %u\n", RING_SIZE(&fr)); fflush(stdout);                            \
        uint32_t sent = 0, got = 0;                                                      \
        while (got < count) {                                                            \
            while (sent < count && !RING_FULL(&fr)) {                                    \
                REQ_T *r = RING_GET_REQUEST(&fr, fr.req_prod_pvt);                       \
                FILL(r, sent); fr.req_prod_pvt++; sent++;                                \
            }                                                                            \
            int notify; RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify); (void)notify;  \
            int more; RING_FINAL_CHECK_FOR_RESPONSES(&fr, more);                         \
            if (!more) { tick(); continue; }                                             \
            while (RING_HAS_UNCONSUMED_RESPONSES(&fr)) {                                 \
                CHECK_RSP(RING_GET_RESPONSE(&fr, fr.rsp_cons), got);                     \
                fr.rsp_cons++; got++;                                                    \
            }                                                                            \
        }                                                                                \
    } while (0)

#define RUN_BACK(PFX, REQ_T, RSP_T, CHECK_REQ, FILL_RSP)                                 \
    do {                                                                                 \
        PFX##_sring_t *s = map;                                                          \
        PFX##_back_ring_t br;                                                            \
        BACK_RING_INIT(&br, s, 4096);                                                    \
        br.rsp_prod_pvt = br.req_cons = start;                                           \
        printf("ready %u\n", RING_SIZE(&br)); fflush(stdout);                            \
        uint32_t done = 0;                                                               \
        while (done < count) {                                                           \
            int more; RING_FINAL_CHECK_FOR_REQUESTS(&br, more);                          \
            if (!more) { tick(); continue; }                                             \
            if (RING_REQUEST_PROD_OVERFLOW(&br, br.sring->req_prod)) FAIL("overflow");   \
            while (RING_HAS_UNCONSUMED_REQUESTS(&br)) {                                  \
                REQ_T req; RING_COPY_REQUEST(&br, br.req_cons, &req); br.req_cons++;     \
                CHECK_REQ(&req, done);                                                   \
                RSP_T *rsp = RING_GET_RESPONSE(&br, br.rsp_prod_pvt);                    \
                FILL_RSP(rsp, &req, done); br.rsp_prod_pvt++; done++;                    \
            }                                                                            \
            int notify; RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&br, notify); (void)notify; \
        }                                                                                \
    } while (0)

static void blk_check_rsp(const blkif_response_t *rsp, uint32_t i)
{
    blkif_request_t want; blk_fill(&want, i);
    if (rsp->id != want.id || rsp->operation != want.operation ||
        rsp->status != (i % 5 == 0 ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY))
        FAIL("blk response %u: id=%llu op=%u status=%d", i, (unsigned long long)rsp->id,
             rsp->operation, rsp->status);
}
static void blk_check_req(const blkif_request_t *req, uint32_t i)
{
    blkif_request_t want; blk_fill(&want, i);
    if (!blk_same(req, &want)) FAIL("blk request %u differs", i);
}
static void blk_fill_rsp(blkif_response_t *rsp, const blkif_request_t *req, uint32_t i)
{
    rsp->id = req->id; rsp->operation = req->operation;
    rsp->status = i % 5 == 0 ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY;
}
static void tx_check_rsp(const netif_tx_response_t *rsp, uint32_t i)
{
    if (rsp->id != (i & 0xffff) || rsp->status != (i % 3 == 0 ? NETIF_RSP_DROPPED : NETIF_RSP_OKAY))
        FAIL("tx response %u: id=%u status=%d", i, rsp->id, rsp->status);
}
static void tx_check_req(const netif_tx_request_t *req, uint32_t i)
{
    netif_tx_request_t want; tx_fill(&want, i);
    if (memcmp(req, &want, sizeof want)) FAIL("tx request %u differs", i);
}
static void tx_fill_rsp(netif_tx_response_t *rsp, const netif_tx_request_t *req, uint32_t i)
{
    rsp->id = req->id; rsp->status = i % 3 == 0 ? NETIF_RSP_DROPPED : NETIF_RSP_OKAY;
}

#define SZ(t) printf("\"%s\": %zu, ", #t, sizeof(t))
#define OFF(t, f) printf("\"%s.%s\": %zu, ", #t, #f, offsetof(t, f))

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "sizes")) {
        printf("{");
        SZ(blkif_request_t); SZ(blkif_response_t); SZ(struct blkif_request_segment);
        SZ(blkif_request_discard_t); SZ(blkif_request_indirect_t);
        OFF(blkif_request_t, operation); OFF(blkif_request_t, nr_segments);
        OFF(blkif_request_t, handle); OFF(blkif_request_t, id);
        OFF(blkif_request_t, sector_number); OFF(blkif_request_t, seg);
        OFF(blkif_request_discard_t, nr_sectors); OFF(blkif_request_indirect_t, handle);
        OFF(blkif_request_indirect_t, indirect_grefs); OFF(blkif_response_t, status);
        SZ(netif_tx_request_t); SZ(netif_tx_response_t); SZ(netif_rx_request_t);
        SZ(netif_rx_response_t); SZ(struct netif_extra_info);
        OFF(netif_tx_request_t, offset); OFF(netif_tx_request_t, flags);
        OFF(netif_tx_request_t, id); OFF(netif_tx_request_t, size);
        OFF(netif_rx_request_t, gref); OFF(netif_rx_response_t, status);
        SZ(grant_entry_v1_t); OFF(grant_entry_v1_t, domid); OFF(grant_entry_v1_t, frame);
        SZ(struct xsd_sockmsg); SZ(struct xenstore_domain_interface);
        OFF(struct xenstore_domain_interface, req_cons); OFF(struct xenstore_domain_interface, rsp_prod);
        printf("\"BLKIF_MAX_SEGMENTS_PER_REQUEST\": %d, ", BLKIF_MAX_SEGMENTS_PER_REQUEST);
        printf("\"blk_slots\": %u, ", (unsigned)__CONST_RING_SIZE(blkif, 4096));
        printf("\"tx_slots\": %u, ", (unsigned)__CONST_RING_SIZE(netif_tx, 4096));
        printf("\"rx_slots\": %u, ", (unsigned)__CONST_RING_SIZE(netif_rx, 4096));
        printf("\"sring_header\": %zu}\n", offsetof(blkif_sring_t, ring));
        return 0;
    }
    if (argc != 6)
        FAIL("usage: %s sizes | front|back blk|nettx SHM START COUNT", argv[0]);
    int fd = open(argv[3], O_RDWR);
    if (fd < 0) FAIL("open %s", argv[3]);
    void *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) FAIL("mmap");
    uint32_t start = (uint32_t)strtoul(argv[4], NULL, 0);
    uint32_t count = (uint32_t)strtoul(argv[5], NULL, 0);
    deadline = time(NULL) + 20;
    int front = !strcmp(argv[1], "front"), blk = !strcmp(argv[2], "blk");
    if (front && blk) RUN_FRONT(blkif, blkif_request_t, blk_fill, blk_check_rsp);
    else if (front) RUN_FRONT(netif_tx, netif_tx_request_t, tx_fill, tx_check_rsp);
    else if (blk) RUN_BACK(blkif, blkif_request_t, blkif_response_t, blk_check_req, blk_fill_rsp);
    else RUN_BACK(netif_tx, netif_tx_request_t, netif_tx_response_t, tx_check_req, tx_fill_rsp);
    printf("done %u\n", count);
    return 0;
}
