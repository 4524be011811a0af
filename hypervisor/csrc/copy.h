/* Batched copies between mapped regions (granted pages, private buffers): the datapath
 * loop of netback/blkback, with every offset checked against its region. */
#ifndef RF_COPY_H
#define RF_COPY_H
#include <stdint.h>
#include <stddef.h>

typedef struct rf_region {
    uint8_t *base;
    uint64_t size;
} rf_region;

typedef struct rf_copy_op {
    uint32_t dst_region, src_region;
    uint64_t dst_offset, src_offset;
    uint32_t len;
    int32_t status;   /* 0, or -1 when out of bounds (nothing copied for that op) */
} rf_copy_op;

/* Returns how many ops failed. */
int rf_copy_batch(const rf_region *regions, uint32_t nregions, rf_copy_op *ops, uint32_t n);
#endif
