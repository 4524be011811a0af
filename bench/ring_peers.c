/* The peers of `ringfence bench ring`, built with gcc in the same run.
 *
 *   ring_peers pingpong CPU_A CPU_B ITERATIONS     one eventfd write/read each way
 *   ring_peers ring CPU_A CPU_B REQUESTS DEPTH     a plain C ring, 112-byte requests,
 *                                                  16-byte responses, DEPTH in flight,
 *                                                  eventfd notifications with event indices
 *                                                  and the same 50 us busy-poll as ours
 * Each prints one number: nanoseconds per round trip, or requests per second. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The same busy-poll as ours: up to 50 us of yielding before arming and blocking. */
static int spin_until_changed(volatile uint32_t *index, uint32_t seen)
{
    double until = now() + 50e-6;
    do {
        if (__atomic_load_n(index, __ATOMIC_ACQUIRE) != seen) return 1;
        sched_yield();
    } while (now() < until);
    return 0;
}

static void efd_wait(int fd) { uint64_t v; if (read(fd, &v, 8) != 8) exit(2); }
static void efd_kick(int fd) { uint64_t v = 1; if (write(fd, &v, 8) != 8) exit(2); }

struct sring { volatile uint32_t req_prod, req_event, rsp_prod, rsp_event; uint8_t pad[48]; uint8_t slots[]; };
#define NSLOTS 32
#define SLOT 112

int main(int argc, char **argv)
{
    if (argc < 5) return 1;
    int a = atoi(argv[2]), b = atoi(argv[3]);
    long n = atol(argv[4]);
    int to_b = eventfd(0, 0), to_a = eventfd(0, 0);
    if (!strcmp(argv[1], "pingpong")) {
        pid_t child = fork();
        if (!child) {
            pin(b);
            for (long i = 0; i < n + 1000; i++) { efd_wait(to_b); efd_kick(to_a); }
            _exit(0);
        }
        pin(a);
        for (long i = 0; i < 1000; i++) { efd_kick(to_b); efd_wait(to_a); }
        double t0 = now();
        for (long i = 0; i < n; i++) { efd_kick(to_b); efd_wait(to_a); }
        double t1 = now();
        waitpid(child, NULL, 0);
        printf("%.1f\n", (t1 - t0) / n * 1e9);
        return 0;
    }
    int depth = argc > 5 ? atoi(argv[5]) : 32;
    struct sring *s = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    s->req_event = s->rsp_event = 1;
    pid_t child = fork();
    if (!child) {  /* back end */
        pin(b);
        uint32_t req_cons = 0, rsp_prod_pvt = 0;
        uint8_t req[SLOT];
        for (;;) {
            uint32_t rp = __atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE);
            if (rp == req_cons) {
                if (spin_until_changed(&s->req_prod, req_cons)) continue;
                s->req_event = req_cons + 1;
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                if (__atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE) == req_cons) efd_wait(to_b);
                continue;
            }
            uint32_t old = rsp_prod_pvt;
            while (req_cons != rp) {
                memcpy(req, s->slots + (req_cons % NSLOTS) * SLOT, SLOT);
                req_cons++;
                uint64_t id; memcpy(&id, req + 8, 8);
                if (id == ~0ULL) _exit(0);
                memcpy(s->slots + (rsp_prod_pvt % NSLOTS) * SLOT, &id, 8);
                rsp_prod_pvt++;
            }
            __atomic_store_n(&s->rsp_prod, rsp_prod_pvt, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if ((uint32_t)(rsp_prod_pvt - s->rsp_event) < (uint32_t)(rsp_prod_pvt - old)) efd_kick(to_a);
        }
    }
    pin(a);
    uint32_t req_prod_pvt = 0, rsp_cons = 0;
    uint8_t req[SLOT] = {0}, rsp[16];
    double t0 = now();
    long sent = 0, done = 0;
    while (done < n) {
        uint32_t old = req_prod_pvt;
        while (sent < n && req_prod_pvt - rsp_cons < (uint32_t)depth) {
            uint64_t id = sent++;
            memcpy(req + 8, &id, 8);
            memcpy(s->slots + (req_prod_pvt % NSLOTS) * SLOT, req, SLOT);
            req_prod_pvt++;
        }
        __atomic_store_n(&s->req_prod, req_prod_pvt, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if ((uint32_t)(req_prod_pvt - s->req_event) < (uint32_t)(req_prod_pvt - old)) efd_kick(to_b);
        uint32_t rp = __atomic_load_n(&s->rsp_prod, __ATOMIC_ACQUIRE);
        if (rp == rsp_cons) {
            if (spin_until_changed(&s->rsp_prod, rsp_cons)) continue;
            s->rsp_event = rsp_cons + 1;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(&s->rsp_prod, __ATOMIC_ACQUIRE) == rsp_cons) efd_wait(to_a);
            continue;
        }
        while (rsp_cons != rp) {
            memcpy(rsp, s->slots + (rsp_cons % NSLOTS) * SLOT, 16);
            rsp_cons++;
            done++;
        }
    }
    double t1 = now();
    uint64_t stop = ~0ULL;
    memcpy(req + 8, &stop, 8);
    memcpy(s->slots + (req_prod_pvt % NSLOTS) * SLOT, req, SLOT);
    req_prod_pvt++;
    __atomic_store_n(&s->req_prod, req_prod_pvt, __ATOMIC_RELEASE);
    efd_kick(to_b);
    waitpid(child, NULL, 0);
    printf("%.0f\n", n / (t1 - t0));
    return 0;
}
