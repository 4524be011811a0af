/* Grant entry v1 operations (the layout of Xen's grant_entry_v1) and the system calls the
 * sim hypervisor needs that Python's os module lacks. */
#ifndef RF_GRANT_H
#define RF_GRANT_H
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct rf_grant_entry_v1 {
    uint16_t flags;
    uint16_t domid;
    uint32_t frame;
} rf_grant_entry_v1;

#define RF_GTF_permit_access 1u
#define RF_GTF_type_mask 3u
#define RF_GTF_readonly (1u << 2)
#define RF_GTF_reading (1u << 3)
#define RF_GTF_writing (1u << 4)

/* Granter side. */
void rf_grant_set(rf_grant_entry_v1 *e, uint16_t domid, uint32_t frame, int readonly);
int rf_grant_end_access(rf_grant_entry_v1 *e);
/* The same for many entries of one table (a frontend re-granting its pages to a new
 * backend): ended[i] says whether grefs[i] was ended; returns how many were. */
void rf_grant_set_many(rf_grant_entry_v1 *table, const uint32_t *grefs, uint16_t domid,
                       const uint32_t *frames, uint32_t n, int readonly);
uint32_t rf_grant_end_access_many(rf_grant_entry_v1 *table, const uint32_t *grefs, uint32_t n,
                                  uint8_t *ended);
/* Hypervisor side: check an entry for domid and pin it for the access; returns a GNTST code
 * and the frame read under the pin. */
int rf_grant_pin(rf_grant_entry_v1 *e, uint16_t domid, int readonly, uint32_t *frame);
void rf_grant_unpin(rf_grant_entry_v1 *e, int clear_reading, int clear_writing);
uint16_t rf_grant_flags(const rf_grant_entry_v1 *e);

/* A batch of copies between this process and another, one system call per direction. */
typedef struct rf_remote_copy {
    void *local;          /* in this process */
    uint64_t remote;      /* address in the other process */
    uint64_t len;
    int to_remote;        /* 1: local -> remote, 0: remote -> local */
    int status;           /* 0 or -errno, filled in */
} rf_remote_copy;
int rf_remote_copy_batch(pid_t pid, rf_remote_copy *ops, size_t n);

int rf_pidfd_open(pid_t pid);
int rf_pidfd_getfd(int pidfd, int fd);
int rf_pidfd_send_signal(int pidfd, int sig);
/* Map n one-page fds contiguously (a multi-page ring made of separately granted pages). */
void *rf_map_fds(const int *fds, size_t n, int writable);
int rf_unmap(void *addr, size_t len);
#endif
