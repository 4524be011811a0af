#define _GNU_SOURCE
#include "netloop.h"
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#define BUDGET 64                  /* packets a side moves before looking at the other */
#define STORM_RUN 8
#define STORM_FIRST_DELAY_MS 1     /* poll's resolution: storm.py's 0.5 ms rounded up */
#define STORM_MAX_DELAY_MS 50

struct rx_request {
    uint16_t id, pad;
    uint32_t gref;
};
_Static_assert(sizeof(struct rx_request) == 8, "netif rx request");

static int stopping(const rf_netloop *l)
{
    return __atomic_load_n(&l->stop, __ATOMIC_ACQUIRE);
}

static void notify_peer(rf_netloop *l)
{
    rf_notify(l->notify_fd);
    l->notifications++;
}

/* After a pump between the TAP and a ring: the peer is notified if the responses or
 * requests pushed call for it, and a TAP error is kept for Python. Returns 1 on that error. */
static int pumped(rf_netloop *l, int result, int notify)
{
    if (notify)
        notify_peer(l);
    if (result >= 0)
        return 0;
    l->error = -result;
    return 1;
}

static void drain(int fd)
{
    uint64_t count;
    while (read(fd, &count, sizeof count) < 0 && errno == EINTR)
        ;
}

/* Work was found: the wake-up that led here was not spurious. */
static void worked(rf_netloop *l)
{
    l->awaiting_work = 0;
    l->in_a_row = 0;
}

/* Nothing left to do: wait for the peer's event, the TAP (tap_fd >= 0) or a stop. Returns
 * 0, or 1 when stopped. */
static int wait_for_work(rf_netloop *l, int tap_fd)
{
    if (l->awaiting_work) {  /* the last event brought nothing: back off from a storm */
        l->awaiting_work = 0;
        l->spurious++;
        if (++l->in_a_row > STORM_RUN) {
            unsigned excess = l->in_a_row - STORM_RUN - 1;
            int delay = excess >= 6 ? STORM_MAX_DELAY_MS : STORM_FIRST_DELAY_MS << excess;
            if (delay > STORM_MAX_DELAY_MS)
                delay = STORM_MAX_DELAY_MS;
            struct pollfd stop = {l->stop_fd, POLLIN, 0};
            l->backoffs++;
            poll(&stop, 1, delay);
        }
    }
    struct pollfd fds[3] = {{l->stop_fd, POLLIN, 0}, {l->wait_fd, POLLIN, 0}, {tap_fd, POLLIN, 0}};
    for (;;) {
        if (stopping(l))
            return 1;
        int n = poll(fds, tap_fd >= 0 ? 3 : 2, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (fds[1].revents) {
            drain(l->wait_fd);
            l->wakeups++;
            l->awaiting_work = 1;
        }
        return stopping(l);
    }
}

/* Buffers the guest posted: those whose pages C has go to the pump, in order; from the first
 * that is not mapped writable, the rest are handed back. Returns how many were taken, or
 * -EOVERFLOW. */
static int take_rx_buffers(rf_netback_loop *l)
{
    struct rx_request requests[RF_NETLOOP_NEW_MAX];
    rf_net_rx *rx = l->rx;
    int n = rf_back_take_requests(l->base.rx_ring, requests, RF_NETLOOP_NEW_MAX);
    for (int i = 0; i < n; i++) {
        uint32_t gref = requests[i].gref;
        if (l->nnew == 0 && rf_net_rx_writable_page(rx, gref)) {
            rf_net_rx_post(rx, &requests[i].id, &gref, 1);
        } else {
            l->new_ids[l->nnew] = requests[i].id;
            l->new_grefs[l->nnew++] = gref;
        }
    }
    return n;
}

int rf_netback_loop_run(rf_netback_loop *l)
{
    rf_netloop *b = &l->base;
    rf_net_tx *tx = l->tx;
    rf_net_rx *rx = l->rx;
    l->nhanded = l->nnew = 0;
    l->rx_waits_for_buffers = 0;  /* Python may have posted buffers */
    drain(b->stop_fd);            /* a stop that came as the last run returned */
    while (!stopping(b)) {
        int notify, work = 0;
        uint64_t moved = tx->packets + tx->dropped;
        int n = rf_net_tx_serve(tx, b->tx_ring, l->handed_back, &notify);
        if (notify)
            notify_peer(b);
        if (n < 0)
            return RF_NETLOOP_OVERFLOW;
        if (n > 0) {
            l->nhanded = (uint32_t)n;
            worked(b);
            return RF_NETLOOP_HANDED_BACK;
        }
        work |= tx->packets + tx->dropped != moved;
        n = take_rx_buffers(l);
        if (n < 0)
            return RF_NETLOOP_OVERFLOW;
        if (n > 0)
            work = 1, l->rx_waits_for_buffers = 0;
        if (l->nnew) {
            worked(b);
            return RF_NETLOOP_NEW_BUFFERS;
        }
        if (!l->rx_waits_for_buffers) {
            moved = rx->packets + rx->dropped + rx->bad_grants;
            int result = rf_net_rx_serve(rx, b->rx_ring, BUDGET, &notify);
            if (pumped(b, result, notify))
                return RF_NETLOOP_TAP_ERROR;
            work |= result == RF_NETBACK_BUDGET || rx->packets + rx->dropped + rx->bad_grants != moved;
            l->rx_waits_for_buffers = result == RF_NETBACK_NO_BUFFERS;
        }
        if (work) {
            worked(b);
            continue;
        }
        if (rf_back_final_check_for_requests(b->tx_ring) | rf_back_final_check_for_requests(b->rx_ring))
            continue;
        if (wait_for_work(b, l->rx_waits_for_buffers ? -1 : rx->tap_fd))
            break;
    }
    drain(b->stop_fd);
    return RF_NETLOOP_STOPPED;
}

int rf_netfront_loop_run(rf_netfront_loop *l)
{
    rf_netloop *b = &l->base;
    rf_netfront_tx *tx = l->tx;
    rf_netfront_rx *rx = l->rx;
    drain(b->stop_fd);
    while (!stopping(b)) {
        int notify, work = 0;
        int n = rf_netfront_tx_complete(tx, b->tx_ring);
        if (n < 0)
            return RF_NETLOOP_OVERFLOW;
        if (n > 0)
            work = 1, l->tx_waits_for_room = 0;
        n = rf_netfront_rx_serve(rx, b->rx_ring, &notify);
        if (notify)
            notify_peer(b);
        if (n < 0)
            return RF_NETLOOP_OVERFLOW;
        work |= n > 0;
        if (!l->tx_waits_for_room) {
            uint64_t moved = tx->packets + tx->dropped;
            int result = rf_netfront_tx_pump(tx, b->tx_ring, BUDGET, &notify);
            if (pumped(b, result, notify))
                return RF_NETLOOP_TAP_ERROR;
            work |= result == RF_NETFRONT_BUDGET || tx->packets + tx->dropped != moved;
            l->tx_waits_for_room = result == RF_NETFRONT_NO_ROOM;
        }
        if (work) {
            worked(b);
            continue;
        }
        /* A tx answer only gives a buffer back: woken when half are answered (as Linux's
         * netfront), or at once when the pump waits for room. */
        int tx_pending = l->tx_waits_for_room ? rf_front_final_check_for_responses(b->tx_ring)
                                              : rf_front_check_for_half_the_responses(b->tx_ring);
        if (tx_pending | rf_front_final_check_for_responses(b->rx_ring))
            continue;
        if (wait_for_work(b, l->tx_waits_for_room ? -1 : tx->tap_fd))
            break;
    }
    drain(b->stop_fd);
    return RF_NETLOOP_STOPPED;
}
