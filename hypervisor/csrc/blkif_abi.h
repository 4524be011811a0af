/* The x86_64 blkif request and response of Xen's io/blkif.h, for every C module that reads
 * or writes them (asserted against Xen's headers in the tests). A header only. */
#ifndef RF_BLKIF_ABI_H
#define RF_BLKIF_ABI_H
#include <stdint.h>

#define RF_BLK_REQUEST_SIZE 112
#define RF_BLK_RESPONSE_SIZE 16
#define BLK_SEGMENTS 11                 /* BLKIF_MAX_SEGMENTS_PER_REQUEST */
#define BLK_SEGMENTS_PER_INDIRECT_PAGE 512
#define BLK_OP_READ 0
#define BLK_OP_WRITE 1
#define BLK_OP_INDIRECT 6
#define BLK_RSP_OKAY 0
#define BLK_RSP_ERROR (-1)
#define BLK_SECTOR 512
#define BLK_PAGE 4096

struct blk_segment {
    uint32_t gref;
    uint8_t first_sect, last_sect;
    uint16_t pad;
};
struct blk_request {
    uint8_t operation, nr_segments;
    uint16_t handle;
    uint32_t pad;
    uint64_t id, sector_number;
    struct blk_segment seg[BLK_SEGMENTS];
};
struct blk_response {
    uint64_t id;
    uint8_t operation, pad;
    int16_t status;
    uint32_t pad2;
};
struct blk_indirect_request {
    uint8_t operation, indirect_op;
    uint16_t nr_segments;
    uint32_t pad;
    uint64_t id, sector_number;
    uint16_t handle, pad2;
    uint32_t indirect_grefs[8];
    uint8_t pad3[RF_BLK_REQUEST_SIZE - 64];
};
_Static_assert(sizeof(struct blk_request) == RF_BLK_REQUEST_SIZE, "blkif request");
_Static_assert(sizeof(struct blk_indirect_request) == RF_BLK_REQUEST_SIZE, "blkif indirect request");
_Static_assert(sizeof(struct blk_response) == RF_BLK_RESPONSE_SIZE, "blkif response");
#endif
