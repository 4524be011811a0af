#define _GNU_SOURCE
#include "grant.h"
#include <errno.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <sys/mman.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

/* GNTST codes as in xen/grant_table.h */
#define GNTST_okay 0
#define GNTST_general_error (-1)
#define GNTST_permission_denied (-8)
#define GNTST_eagain (-12)

void rf_grant_set(rf_grant_entry_v1 *e, uint16_t domid, uint32_t frame, int readonly)
{
    /* domid and frame must be visible before the entry becomes valid. */
    e->domid = domid;
    e->frame = frame;
    __atomic_store_n(&e->flags, (uint16_t)(RF_GTF_permit_access | (readonly ? RF_GTF_readonly : 0)),
                     __ATOMIC_RELEASE);
}

int rf_grant_end_access(rf_grant_entry_v1 *e)
{
    /* As gnttab_end_foreign_access_ref: clear the entry only if nobody has it pinned,
     * atomically, so that a pin racing with us either wins or sees GTF_invalid. */
    uint16_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
    do {
        if (flags & (RF_GTF_reading | RF_GTF_writing))
            return 0;
    } while (!__atomic_compare_exchange_n(&e->flags, &flags, 0, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    return 1;
}

void rf_grant_set_many(rf_grant_entry_v1 *table, const uint32_t *grefs, uint16_t domid,
                       const uint32_t *frames, uint32_t n, int readonly)
{
    for (uint32_t i = 0; i < n; i++)
        rf_grant_set(table + grefs[i], domid, frames[i], readonly);
}

uint32_t rf_grant_end_access_many(rf_grant_entry_v1 *table, const uint32_t *grefs, uint32_t n,
                                  uint8_t *ended)
{
    uint32_t count = 0;
    for (uint32_t i = 0; i < n; i++) {
        ended[i] = (uint8_t)rf_grant_end_access(table + grefs[i]);
        count += ended[i];
    }
    return count;
}

int rf_grant_pin(rf_grant_entry_v1 *e, uint16_t domid, int readonly, uint32_t *frame)
{
    uint16_t pin = readonly ? RF_GTF_reading : (RF_GTF_reading | RF_GTF_writing);
    uint16_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
    for (;;) {
        /* The granter owns this memory and may rewrite it at any time: the domid is read
         * after the flags and re-checked by the compare-and-swap below. */
        if ((flags & RF_GTF_type_mask) != RF_GTF_permit_access)
            return GNTST_general_error;
        if (!readonly && (flags & RF_GTF_readonly))
            return GNTST_permission_denied;
        if (__atomic_load_n(&e->domid, __ATOMIC_ACQUIRE) != domid)
            return GNTST_permission_denied;
        if (__atomic_compare_exchange_n(&e->flags, &flags, (uint16_t)(flags | pin), 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            break;
    }
    /* Read once, after the pin: the granter may not change a pinned entry. */
    *frame = __atomic_load_n(&e->frame, __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&e->domid, __ATOMIC_ACQUIRE) != domid) {
        rf_grant_unpin(e, !(flags & RF_GTF_reading), !readonly && !(flags & RF_GTF_writing));
        return GNTST_permission_denied;
    }
    return GNTST_okay;
}

void rf_grant_unpin(rf_grant_entry_v1 *e, int clear_reading, int clear_writing)
{
    uint16_t mask = (uint16_t)((clear_reading ? RF_GTF_reading : 0) |
                               (clear_writing ? RF_GTF_writing : 0));
    __atomic_fetch_and(&e->flags, (uint16_t)~mask, __ATOMIC_ACQ_REL);
}

uint16_t rf_grant_flags(const rf_grant_entry_v1 *e)
{
    return __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
}

static int copy_direction(pid_t pid, rf_remote_copy *ops, size_t n, int to_remote)
{
    enum { MAX_IOV = 1024 };
    struct iovec local[MAX_IOV], remote[MAX_IOV];
    size_t idx[MAX_IOV];
    size_t i = 0;
    while (i < n) {
        size_t k = 0;
        uint64_t total = 0;
        for (; i < n && k < MAX_IOV; i++) {
            if (ops[i].to_remote != to_remote || ops[i].status != 1)
                continue;
            local[k].iov_base = ops[i].local;
            local[k].iov_len = ops[i].len;
            remote[k].iov_base = (void *)(uintptr_t)ops[i].remote;
            remote[k].iov_len = ops[i].len;
            idx[k++] = i;
            total += ops[i].len;
        }
        if (!k)
            continue;
        ssize_t done = to_remote ? process_vm_writev(pid, local, k, remote, k, 0)
                                 : process_vm_readv(pid, local, k, remote, k, 0);
        int err = done < 0 ? -errno : 0;
        if (done < 0)
            done = 0;
        /* A partial transfer stops at the first bad remote address: everything before it
         * succeeded, that segment and the rest of this batch failed. */
        for (size_t j = 0; j < k; j++) {
            rf_remote_copy *op = &ops[idx[j]];
            if ((uint64_t)done >= op->len) {
                op->status = 0;
                done -= (ssize_t)op->len;
            } else {
                op->status = err ? err : -EFAULT;
                done = 0;
            }
        }
        (void)total;
    }
    return 0;
}

int rf_remote_copy_batch(pid_t pid, rf_remote_copy *ops, size_t n)
{
    /* status 1 marks "pending"; anything else was decided by the caller and is skipped. */
    for (size_t i = 0; i < n; i++)
        ops[i].status = 1;
    copy_direction(pid, ops, n, 0);
    copy_direction(pid, ops, n, 1);
    int failures = 0;
    for (size_t i = 0; i < n; i++)
        failures += ops[i].status != 0;
    return failures;
}

int rf_pidfd_open(pid_t pid)
{
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    return fd < 0 ? -errno : fd;
}

int rf_pidfd_getfd(int pidfd, int fd)
{
    int r = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    return r < 0 ? -errno : r;
}

int rf_pidfd_send_signal(int pidfd, int sig)
{
    int r = (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
    return r < 0 ? -errno : r;
}

void *rf_map_fds(const int *fds, size_t n, int writable)
{
    const size_t page = 4096;
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    /* Reserve the whole range first so that the pages land next to each other. */
    char *base = mmap(NULL, n * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (mmap(base + i * page, page, prot, MAP_SHARED | MAP_FIXED, fds[i], 0) == MAP_FAILED) {
            int err = errno;
            munmap(base, n * page);
            errno = err;
            return NULL;
        }
    }
    return base;
}

int rf_unmap(void *addr, size_t len)
{
    return munmap(addr, len) < 0 ? -errno : 0;
}
