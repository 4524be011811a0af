#define _GNU_SOURCE
#include "ring.h"
#include "barriers.h"
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#include <sched.h>

uint32_t rf_ring_slots(size_t ring_bytes, uint32_t slot_size)
{
    if (!slot_size || ring_bytes <= RF_RING_HEADER)
        return 0;
    size_t n = (ring_bytes - RF_RING_HEADER) / slot_size;
    if (n > (1u << 30))
        n = 1u << 30;
    uint32_t p = 1;
    while ((size_t)p * 2 <= n)  /* round down to a power of two, as __RD32 */
        p *= 2;
    return n ? p : 0;
}

int rf_ring_init(rf_ring *r, void *shared, size_t ring_bytes, uint32_t req_size,
                 uint32_t rsp_size, uint32_t slot_size)
{
    memset(r, 0, sizeof *r);
    if (!req_size || !rsp_size || slot_size < req_size || slot_size < rsp_size)
        return -EINVAL;
    r->nr_ents = rf_ring_slots(ring_bytes, slot_size);
    if (!r->nr_ents)
        return -EINVAL;
    r->sring = shared;
    r->slots = (uint8_t *)shared + RF_RING_HEADER;
    r->slot_size = slot_size;
    r->req_size = req_size;
    r->rsp_size = rsp_size;
    return 0;
}

void rf_front_init(rf_ring *r, uint32_t start)
{
    rf_sring *s = r->sring;
    s->req_prod = s->rsp_prod = start;
    s->req_event = s->rsp_event = start + 1;
    memset(s->pad, 0, sizeof s->pad);
    rf_front_attach(r, start);
    FULL_BARRIER();
}

void rf_front_attach(rf_ring *r, uint32_t start) { r->req_prod_pvt = r->rsp_cons = start; }
void rf_back_attach(rf_ring *r, uint32_t start) { r->rsp_prod_pvt = r->req_cons = start; }

static inline uint8_t *slot(const rf_ring *r, uint32_t idx)
{
    return r->slots + (size_t)(idx & (r->nr_ents - 1)) * r->slot_size;
}


/* Copy count items of size bytes between consecutive slots from idx on and a packed private
 * array. Whole runs go in one memcpy when items fill their slots; small items (responses,
 * netif requests) use fixed-size copies the compiler inlines. */
static void copy_slots(const rf_ring *r, uint32_t idx, uint8_t *packed, uint32_t count,
                       uint32_t size, int to_ring)
{
    if (size == r->slot_size) {
        while (count) {
            uint32_t pos = idx & (r->nr_ents - 1);
            uint32_t run = r->nr_ents - pos;
            if (run > count)
                run = count;
            uint8_t *s = r->slots + (size_t)pos * size;
            if (to_ring)
                memcpy(s, packed, (size_t)run * size);
            else
                memcpy(packed, s, (size_t)run * size);
            packed += (size_t)run * size;
            idx += run;
            count -= run;
        }
        return;
    }
#define COPY_LOOP(N)                                                         \
    for (uint32_t i = 0; i < count; i++, packed += (N)) {                   \
        uint8_t *s = slot(r, idx + i);                                       \
        if (to_ring) memcpy(s, packed, (N)); else memcpy(packed, s, (N));    \
    }
    switch (size) {
    case 4: COPY_LOOP(4); break;
    case 8: COPY_LOOP(8); break;
    case 12: COPY_LOOP(12); break;
    case 16: COPY_LOOP(16); break;
    default: COPY_LOOP(size); break;
    }
#undef COPY_LOOP
}

uint32_t rf_front_free_requests(const rf_ring *r)
{
    return r->nr_ents - (r->req_prod_pvt - r->rsp_cons);
}

uint32_t rf_front_put_requests(rf_ring *r, const void *reqs, uint32_t n)
{
    uint32_t free = rf_front_free_requests(r);
    if (n > free)
        n = free;
    copy_slots(r, r->req_prod_pvt, (uint8_t *)reqs, n, r->req_size, 1);
    r->req_prod_pvt += n;
    r->requests += n;
    return n;
}

/* RING_PUSH_*_AND_CHECK_NOTIFY: publish, then notify only if the other side asked for an
 * event at an index we just passed. */
static int push(rf_ring *r, uint32_t *prod, const uint32_t *event, uint32_t new_prod, int fd)
{
    uint32_t old = *prod;
    STORE_REL(prod, new_prod);
    FULL_BARRIER(); /* the other side's event index must be read after the producer write */
    uint32_t ev = LOAD_ACQ(event);
    int notify = (uint32_t)(new_prod - ev) < (uint32_t)(new_prod - old);
    if (notify) {
        r->notifies_sent++;
        if (fd >= 0)
            rf_notify(fd);
    } else if (new_prod != old) {
        r->notifies_suppressed++;
    }
    r->batches++;
    return notify;
}

int rf_front_push_requests(rf_ring *r, int notify_fd)
{
    return push(r, &r->sring->req_prod, &r->sring->req_event, r->req_prod_pvt, notify_fd);
}

int rf_front_unconsumed_responses(const rf_ring *r)
{
    return (int)(LOAD_ACQ(&r->sring->rsp_prod) - r->rsp_cons);
}

int rf_front_take_responses(rf_ring *r, void *out, uint32_t max)
{
    uint32_t rp = LOAD_ACQ(&r->sring->rsp_prod);
    uint32_t avail = rp - r->rsp_cons;
    /* An untrusted backend must not claim responses for requests never made. */
    if (avail > r->req_prod_pvt - r->rsp_cons) {
        r->overflows++;
        return -EOVERFLOW;
    }
    if (avail > max)
        avail = max;
    copy_slots(r, r->rsp_cons, out, avail, r->rsp_size, 0);
    r->rsp_cons += avail;
    r->responses += avail;
    return (int)avail;
}

/* RING_FINAL_CHECK_FOR_RESPONSES, with the event asked for `ahead` responses on. */
static int check_for_responses(rf_ring *r, uint32_t ahead)
{
    if (LOAD_ACQ(&r->sring->rsp_prod) != r->rsp_cons)
        return 1;
    STORE_REL(&r->sring->rsp_event, r->rsp_cons + ahead);
    FULL_BARRIER();
    return LOAD_ACQ(&r->sring->rsp_prod) != r->rsp_cons;
}

int rf_front_final_check_for_responses(rf_ring *r)
{
    return check_for_responses(r, 1);
}

int rf_front_check_for_half_the_responses(rf_ring *r)
{
    return check_for_responses(r, ((r->req_prod_pvt - r->rsp_cons) >> 1) + 1);
}

int rf_back_unconsumed_requests(const rf_ring *r)
{
    uint32_t req = LOAD_ACQ(&r->sring->req_prod) - r->req_cons;
    uint32_t rsp = r->nr_ents - (r->req_cons - r->rsp_prod_pvt);
    return (int)(req < rsp ? req : rsp);
}

int rf_back_take_requests(rf_ring *r, void *out, uint32_t max)
{
    uint32_t rp = LOAD_ACQ(&r->sring->req_prod);
    /* RING_REQUEST_PROD_OVERFLOW: a frontend may not have more requests outstanding than
     * the ring has slots; one that claims so is broken or hostile. */
    if ((uint32_t)(rp - r->rsp_prod_pvt) > r->nr_ents) {
        r->overflows++;
        return -EOVERFLOW;
    }
    uint32_t avail = rp - r->req_cons;
    /* RING_REQUEST_CONS_OVERFLOW: never consume more than we have response slots for. */
    uint32_t room = r->nr_ents - (r->req_cons - r->rsp_prod_pvt);
    if (avail > room)
        avail = room;
    if (avail > max)
        avail = max;
    copy_slots(r, r->req_cons, out, avail, r->req_size, 0);
    r->req_cons += avail;
    r->requests += avail;
    return (int)avail;
}

uint32_t rf_back_put_responses(rf_ring *r, const void *rsps, uint32_t n)
{
    uint32_t owed = r->req_cons - r->rsp_prod_pvt;
    if (n > owed)
        n = owed;
    copy_slots(r, r->rsp_prod_pvt, (uint8_t *)rsps, n, r->rsp_size, 1);
    r->rsp_prod_pvt += n;
    r->responses += n;
    return n;
}

int rf_back_push_responses(rf_ring *r, int notify_fd)
{
    return push(r, &r->sring->rsp_prod, &r->sring->rsp_event, r->rsp_prod_pvt, notify_fd);
}

int rf_back_final_check_for_requests(rf_ring *r)
{
    if (rf_back_unconsumed_requests(r))
        return 1;
    STORE_REL(&r->sring->req_event, r->req_cons + 1);
    FULL_BARRIER();
    return rf_back_unconsumed_requests(r) != 0;
}

int rf_notify(int fd)
{
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == sizeof one ? 0 : -errno;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

long long rf_wait_event(int fd, const uint32_t *watch, uint32_t seen, long long spin_ns)
{
    uint64_t count = 0;
    if (spin_ns > 0 && watch) {
        /* Busy-poll briefly first, as NAPI does: on another CPU the answer is often only a
         * few microseconds away, and a sleep and wake-up cost more than that. */
        long long until = now_ns() + spin_ns;
        do {
            if (LOAD_ACQ(watch) != seen)
                return 0;
            CPU_RELAX();
        } while (now_ns() < until);
    }
    for (;;) {
        ssize_t n = read(fd, &count, sizeof count);
        if (n == sizeof count)
            return (long long)count;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, -1) < 0 && errno != EINTR)
                return -errno;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -errno : -EIO;
    }
}

uint32_t rf_front_submit(rf_ring *r, const void *reqs, uint32_t n, int notify_fd)
{
    n = rf_front_put_requests(r, reqs, n);
    rf_front_push_requests(r, notify_fd);
    return n;
}

uint32_t rf_back_respond(rf_ring *r, const void *rsps, uint32_t n, int notify_fd)
{
    n = rf_back_put_responses(r, rsps, n);
    rf_back_push_responses(r, notify_fd);
    return n;
}

static int block_on(int fd)
{
    uint64_t count;
    for (;;) {
        ssize_t n = read(fd, &count, sizeof count);
        if (n == sizeof count)
            return 0;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, -1) < 0 && errno != EINTR)
                return -errno;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -errno : -EIO;
    }
}

static void drain(int fd)
{
    /* A notification for work we found by polling would only cause a spurious wake-up. */
    uint64_t count;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 0) == 1)
        (void)!read(fd, &count, sizeof count);
}

#define WAIT_LOOP(HAS_WORK, FINAL_CHECK)                                   \
    for (;;) {                                                            \
        if (HAS_WORK)                                                     \
            return 1;                                                     \
        if (spin_ns > 0) {                                                \
            long long until = now_ns() + spin_ns;                         \
            do {                                                          \
                sched_yield();                                            \
                if (HAS_WORK)                                             \
                    return 1;                                             \
            } while (now_ns() < until);                                   \
        }                                                                 \
        if (FINAL_CHECK) {                                                \
            drain(wait_fd);                                               \
            return 1;                                                     \
        }                                                                 \
        int err = block_on(wait_fd);                                      \
        if (err)                                                          \
            return err;                                                   \
    }

int rf_front_wait_responses(rf_ring *r, int wait_fd, long long spin_ns)
{
    WAIT_LOOP(LOAD_ACQ(&r->sring->rsp_prod) != r->rsp_cons, rf_front_final_check_for_responses(r))
}

int rf_back_wait_requests(rf_ring *r, int wait_fd, long long spin_ns)
{
    WAIT_LOOP(LOAD_ACQ(&r->sring->req_prod) != r->req_cons, rf_back_final_check_for_requests(r))
}

int rf_front_exchange(rf_ring *r, const void *reqs, uint32_t n, void *rsps, int notify_fd,
                      int wait_fd, long long spin_ns, uint32_t gather)
{
    if (n)
        rf_front_submit(r, reqs, n, notify_fd);
    uint32_t in_flight = r->req_prod_pvt - r->rsp_cons;
    if (!in_flight)
        return 0;
    int err = rf_front_wait_responses(r, wait_fd, spin_ns);
    if (err < 0)
        return err;
    if (gather > in_flight)
        gather = in_flight;
    if (gather > 1 && spin_ns > 0) {
        long long until = now_ns() + spin_ns;
        while ((uint32_t)(LOAD_ACQ(&r->sring->rsp_prod) - r->rsp_cons) < gather && now_ns() < until)
            sched_yield();
    }
    return rf_front_take_responses(r, rsps, r->nr_ents);
}

int rf_back_exchange(rf_ring *r, const void *rsps, uint32_t n, void *reqs, int notify_fd,
                     int wait_fd, long long spin_ns, uint32_t budget)
{
    if (n)
        rf_back_respond(r, rsps, n, notify_fd);
    int err = rf_back_wait_requests(r, wait_fd, spin_ns);
    if (err < 0)
        return err;
    return rf_back_take_requests(r, reqs, budget && budget < r->nr_ents ? budget : r->nr_ents);
}
