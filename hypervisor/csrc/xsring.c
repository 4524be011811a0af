#include "xsring.h"
#include "barriers.h"
#include <errno.h>
#include <string.h>

#define MASK(idx) ((idx) & (RF_XS_RING_SIZE - 1))

/* Each index is read once into a local: the other side may change it at any moment, and a
 * value checked is the value used. */

int rf_xs_put(rf_xs_intf *intf, int rsp, const uint8_t *data, uint32_t len)
{
    char *ring = rsp ? intf->rsp : intf->req;
    uint32_t *prod_p = rsp ? &intf->rsp_prod : &intf->req_prod;
    uint32_t cons = LOAD_ACQ(rsp ? &intf->rsp_cons : &intf->req_cons); /* reads done before we overwrite */
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

int rf_xs_get(rf_xs_intf *intf, int rsp, uint8_t *out, uint32_t max)
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
    return (int)n;
}

int rf_xs_pending(const rf_xs_intf *intf, int rsp)
{
    uint32_t cons;
    return waiting(intf, rsp, &cons);
}
