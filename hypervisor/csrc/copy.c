#include "copy.h"
#include <string.h>

static int inside(const rf_region *r, uint64_t offset, uint32_t len)
{
    return offset <= r->size && len <= r->size - offset;
}

int rf_copy_batch(const rf_region *regions, uint32_t nregions, rf_copy_op *ops, uint32_t n)
{
    int failed = 0;
    for (uint32_t i = 0; i < n; i++) {
        rf_copy_op *op = &ops[i];
        if (op->dst_region >= nregions || op->src_region >= nregions ||
            !inside(&regions[op->dst_region], op->dst_offset, op->len) ||
            !inside(&regions[op->src_region], op->src_offset, op->len)) {
            op->status = -1;
            failed++;
            continue;
        }
        memmove(regions[op->dst_region].base + op->dst_offset,
                regions[op->src_region].base + op->src_offset, op->len);
        op->status = 0;
    }
    return failed;
}
