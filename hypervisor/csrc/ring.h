/* A shared ring with the semantics of Xen's io/ring.h, for any request and response size.
 *
 * Layout in shared memory: a 64-byte header (req_prod, req_event, rsp_prod, rsp_event,
 * 48 bytes of padding) then a power-of-two number of slots, each the size of the union of a
 * request and a response. Indices are free-running uint32 that wrap. Requests and responses
 * are copied between the shared slots and private memory in batches, exactly once, so that
 * nothing read from the other side is ever read twice (XSA-155). */
#ifndef RF_RING_H
#define RF_RING_H
#include <stdint.h>
#include <stddef.h>

#define RF_RING_HEADER 64

typedef struct rf_sring {
    uint32_t req_prod, req_event;
    uint32_t rsp_prod, rsp_event;
    uint8_t pad[48];
} rf_sring;

typedef struct rf_ring {
    rf_sring *sring;
    uint8_t *slots;
    uint32_t nr_ents;
    uint32_t slot_size, req_size, rsp_size;
    /* front */
    uint32_t req_prod_pvt, rsp_cons;
    /* back */
    uint32_t rsp_prod_pvt, req_cons;
    /* statistics */
    uint64_t requests, responses, batches, notifies_sent, notifies_suppressed, overflows;
} rf_ring;

/* 0 or -EINVAL (sizes) */
int rf_ring_init(rf_ring *r, void *shared, size_t ring_bytes, uint32_t req_size,
                 uint32_t rsp_size, uint32_t slot_size);
uint32_t rf_ring_slots(size_t ring_bytes, uint32_t slot_size);
/* SHARED_RING_INIT + FRONT_RING_ATTACH at index start (0 in real use). */
void rf_front_init(rf_ring *r, uint32_t start);
void rf_front_attach(rf_ring *r, uint32_t start);
void rf_back_attach(rf_ring *r, uint32_t start);

uint32_t rf_front_free_requests(const rf_ring *r);
uint32_t rf_front_put_requests(rf_ring *r, const void *reqs, uint32_t n);
int rf_front_push_requests(rf_ring *r, int notify_fd);
/* count, or -EOVERFLOW when the backend claims more responses than there are requests */
int rf_front_take_responses(rf_ring *r, void *out, uint32_t max);
int rf_front_final_check_for_responses(rf_ring *r);
/* As final_check_for_responses, but the event asked for when half the requests in flight
 * are answered, not the next one (Linux netfront's tx reclaim): for answers that only give
 * buffers back, one wake-up a half ring instead of one a batch. */
int rf_front_check_for_half_the_responses(rf_ring *r);
int rf_front_unconsumed_responses(const rf_ring *r);

/* count, or -EOVERFLOW when the frontend pushed more than the ring holds */
int rf_back_take_requests(rf_ring *r, void *out, uint32_t max);
uint32_t rf_back_put_responses(rf_ring *r, const void *rsps, uint32_t n);
int rf_back_push_responses(rf_ring *r, int notify_fd);
int rf_back_final_check_for_requests(rf_ring *r);
int rf_back_unconsumed_requests(const rf_ring *r);

/* Wait for an eventfd: spin up to spin_ns watching *watch for a change from seen, then
 * block in read(). Returns the eventfd count consumed (0 if the spin saw the change). */
long long rf_wait_event(int fd, const uint32_t *watch, uint32_t seen, long long spin_ns);
int rf_notify(int fd);

/* put + push (+ notify) in one call */
uint32_t rf_front_submit(rf_ring *r, const void *reqs, uint32_t n, int notify_fd);
uint32_t rf_back_respond(rf_ring *r, const void *rsps, uint32_t n, int notify_fd);
/* Wait until there is work: poll the producer index for up to spin_ns (yielding the CPU, so
 * that a peer on the same CPU can run), then re-arm the event index and block on the
 * eventfd. Busy-polling without arming lets the producer skip its notification. Returns 1
 * when work is there, or -errno. */
int rf_front_wait_responses(rf_ring *r, int wait_fd, long long spin_ns);
int rf_back_wait_requests(rf_ring *r, int wait_fd, long long spin_ns);
/* The loop every driver runs, as one call: publish a batch, wait for the other side, take
 * what it produced. Front: submit n requests, wait for and take responses (0 at once if
 * nothing is in flight), gathering up to `gather` of them within the spin budget (response
 * coalescing: fewer, larger batches). Back: respond n, wait for and take requests, at most
 * `budget` of them (0: all there are), as NAPI's budget: with a full ring, the front
 * refills what was answered while the back serves the rest, instead of the two taking
 * turns. Count or -errno. */
int rf_front_exchange(rf_ring *r, const void *reqs, uint32_t n, void *rsps, int notify_fd,
                      int wait_fd, long long spin_ns, uint32_t gather);
int rf_back_exchange(rf_ring *r, const void *rsps, uint32_t n, void *reqs, int notify_fd,
                     int wait_fd, long long spin_ns, uint32_t budget);
#endif
