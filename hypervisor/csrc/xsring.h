/* The XenStore ring page (Xen's xen/io/xs_wire.h, struct xenstore_domain_interface): two
 * 1 KiB byte rings, requests from the guest and responses from xenstored, with free-running
 * indices, then the reconnection and error words of docs/misc/xenstore-ring.txt. */
#ifndef RF_XSRING_H
#define RF_XSRING_H
#include <stdint.h>

#define RF_XS_RING_SIZE 1024

typedef struct rf_xs_intf {
    char req[RF_XS_RING_SIZE]; /* guest -> xenstored */
    char rsp[RF_XS_RING_SIZE]; /* xenstored -> guest */
    uint32_t req_cons, req_prod;
    uint32_t rsp_cons, rsp_prod;
    uint32_t server_features;
    uint32_t connection;
    uint32_t error;
} rf_xs_intf;

/* Append up to len bytes to the request (rsp = 0) or response (rsp = 1) ring. Returns the
 * bytes written (0 when full) or -EPROTO when the indices say more than a ring's worth is
 * outstanding (the other side is broken or hostile). *wake: whether to notify the consumer
 * (it had taken everything before). */
int rf_xs_put(rf_xs_intf *intf, int rsp, const uint8_t *data, uint32_t len, int *wake);
/* Take up to max bytes from a ring: the count, or -EPROTO as above. *wake: whether to
 * notify the producer (it had filled the ring, and may be waiting for room). */
int rf_xs_get(rf_xs_intf *intf, int rsp, uint8_t *out, uint32_t max, int *wake);
/* Bytes waiting in a ring, or -EPROTO. */
int rf_xs_pending(const rf_xs_intf *intf, int rsp);
#endif
