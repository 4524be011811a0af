#include "xsring.h"
#include "barriers.h"
#include <errno.h>
#include <string.h>

#define MASK(idx) ((idx) & (RF_XS_RING_SIZE - 1))

/* Each index is read once into a local: the other side may change it at any moment, and a
 * value checked is the value used.
 *
 * Notifications, as Linux's xenbus sends them: the producer wakes the consumer only when it
 * had consumed everything before (it may be asleep), the consumer wakes the producer only
 * when it found the ring full (the producer may be waiting for room). Each side publishes
 * its index, then (full barrier) reads the other's: of two sides doing so at once, at least
 * one sees the other's, so either the sleeper's last look finds the news or the waker sees
 * that it must notify. A side that lies about its index only goes without notifications. */

int rf_xs_put(rf_xs_intf *intf, int rsp, const uint8_t *data, uint32_t len, int *wake)
{
    char *ring = rsp ? intf->rsp : intf->req;
    uint32_t *prod_p = rsp ? &intf->rsp_prod : &intf->req_prod;
    uint32_t *cons_p = rsp ? &intf->rsp_cons : &intf->req_cons;
    FULL_BARRIER(); /* our last index stored before theirs is read (see above) */
    uint32_t cons = LOAD_ACQ(cons_p); /* reads done before we overwrite */
    uint32_t prod = LOAD_ONCE(prod_p);
    if ((uint32_t)(prod - cons) > RF_XS_RING_SIZE)
        return -EPROTO;
    uint32_t room = RF_XS_RING_SIZE - (prod - cons);
    uint32_t n = len < room ? len : room;
    uint32_t first = RF_XS_RING_SIZE - MASK(prod);
    if (first > n)
        first = n;
    memcpy(ring + MASK(prod), data, first);
    memcpy(ring, data + first, n - first);
    STORE_REL(prod_p, prod + n); /* the bytes are visible before the index says so */
    FULL_BARRIER();
    *wake = n > 0 && LOAD_ONCE(cons_p) == prod;
    return (int)n;
}

/* Bytes waiting in a ring (its consumer index in *cons), or -EPROTO. */
static int waiting(const rf_xs_intf *intf, int rsp, uint32_t *cons)
{
    uint32_t prod = LOAD_ACQ(rsp ? &intf->rsp_prod : &intf->req_prod);
    *cons = LOAD_ONCE(rsp ? &intf->rsp_cons : &intf->req_cons);
    uint32_t avail = prod - *cons;
    return avail > RF_XS_RING_SIZE ? -EPROTO : (int)avail;
}

int rf_xs_get(rf_xs_intf *intf, int rsp, uint8_t *out, uint32_t max, int *wake)
{
    const char *ring = rsp ? intf->rsp : intf->req;
    uint32_t cons;
    int avail = waiting(intf, rsp, &cons);
    if (avail < 0)
        return avail;
    uint32_t n = max < (uint32_t)avail ? max : (uint32_t)avail;
    uint32_t first = RF_XS_RING_SIZE - MASK(cons);
    if (first > n)
        first = n;
    memcpy(out, ring + MASK(cons), first);
    memcpy(out + first, ring, n - first);
    STORE_REL(rsp ? &intf->rsp_cons : &intf->req_cons, cons + n); /* copies done before reuse */
    FULL_BARRIER();
    *wake = n > 0 && (uint32_t)(LOAD_ONCE(rsp ? &intf->rsp_prod : &intf->req_prod) - cons) >= RF_XS_RING_SIZE;
    return (int)n;
}

int rf_xs_pending(const rf_xs_intf *intf, int rsp)
{
    uint32_t cons;
    return waiting(intf, rsp, &cons);
}
