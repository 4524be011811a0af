/* XSA-396's race, for real: a granter process ends access to a grant while a hypervisor
 * process pins it for a hostile backend's map, in parallel on two CPUs, ROUNDS times, with
 * the grant-table code the sim hypervisor and the frontends run (hypervisor/csrc/grant.c).
 *
 * Granter, each round: grant the page (the entry's frame carries the round number), wait
 * for the racer's next pin attempt, wait a little more, try to end access once. Ended: the page counts as reused from then on (in the
 * frontends it would go to new I/O). Refused (pinned): a refused revoke, counted; the granter
 * keeps trying until the pin goes (a frontend would leak the page instead).
 * Hypervisor, in a loop: pin the entry; while pinned, the round it pinned must not have been
 * ended (that page would be mapped by the backend and reused by the frontend at once); hold
 * it a little; unpin.
 * Prints: rounds, refused revokes, pins, violations (must be 0). With "racy", the granter
 * ends access the way XSA-396's vulnerable code did (check "in use?", then clear the entry):
 * the test must see violations then, or it proves nothing. */
#define _GNU_SOURCE
#include "grant.h"
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static void pause_for(unsigned spins)
{
    for (volatile unsigned i = 0; i < spins; i++)
        ;
}

/* Widens the vulnerable window of the racy variant a little (it is a few instructions). */
static void pause_for_window(void)
{
    pause_for(20);
}

struct shared {
    rf_grant_entry_v1 entry;
    volatile uint32_t ended_round;   /* the last round whose access was ended */
    volatile uint32_t stop;
    volatile uint64_t attempts;   /* the racer's pin attempts so far */
    volatile uint64_t pins, violations;
};

/* XSA-396's bug: a check, then a plain store that can wipe a pin made in between. */
static int racy_end_access(rf_grant_entry_v1 *e)
{
    if (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & (RF_GTF_reading | RF_GTF_writing))
        return 0;
    pause_for_window();
    __atomic_store_n(&e->flags, 0, __ATOMIC_RELEASE);
    return 1;
}

static void pin_to(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}


int main(int argc, char **argv)
{
    uint32_t rounds = argc > 1 ? (uint32_t)atol(argv[1]) : 100000;
    int (*end_access)(rf_grant_entry_v1 *) =
        argc > 2 && argv[2][0] == 'r' ? racy_end_access : rf_grant_end_access;
    int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    struct shared *s = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED)
        return 2;
    const uint16_t backend = 7;
    pid_t hypervisor = fork();
    if (hypervisor == 0) {
        pin_to(cpus > 1 ? 1 : 0);
        unsigned seed = 2;
        while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
            uint32_t round;
            __atomic_add_fetch(&s->attempts, 1, __ATOMIC_RELEASE);
            if (rf_grant_pin(&s->entry, backend, rand_r(&seed) & 1, &round) != 0)
                continue;
            s->pins++;
            if (__atomic_load_n(&s->ended_round, __ATOMIC_ACQUIRE) == round)
                s->violations++;
            pause_for(rand_r(&seed) % 200);
            if (__atomic_load_n(&s->ended_round, __ATOMIC_ACQUIRE) == round)
                s->violations++;
            uint16_t flags = rf_grant_flags(&s->entry);
            rf_grant_unpin(&s->entry, 1, !(flags & RF_GTF_readonly));
        }
        _exit(0);
    }
    pin_to(0);
    unsigned seed = 1;
    uint64_t refused = 0;
    for (uint32_t round = 1; round <= rounds; round++) {
        rf_grant_set(&s->entry, backend, round, rand_r(&seed) & 1);
        /* Each round is raced, not only those the host ran both processes for: 10^5 rounds
         * take some 30 ms, and a racer not on its CPU then would see none of them. */
        uint64_t attempts = __atomic_load_n(&s->attempts, __ATOMIC_ACQUIRE);
        while (__atomic_load_n(&s->attempts, __ATOMIC_ACQUIRE) == attempts)
            ;
        pause_for(rand_r(&seed) % 400);
        if (!end_access(&s->entry)) {
            refused++;
            while (!end_access(&s->entry))
                ;
        }
        /* Ended: from here the page is the granter's again. */
        __atomic_store_n(&s->ended_round, round, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
    waitpid(hypervisor, NULL, 0);
    printf("{\"rounds\": %u, \"refused\": %llu, \"pins\": %llu, \"violations\": %llu}\n", rounds,
           (unsigned long long)refused, (unsigned long long)s->pins,
           (unsigned long long)s->violations);
    return 0;
}
