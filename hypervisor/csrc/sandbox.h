/* Entering a sandbox in a freshly forked child, before exec (see isolation/sandbox.py). */
#ifndef RF_SANDBOX_H
#define RF_SANDBOX_H
#include <stddef.h>
#define RF_SANDBOX_PID 1
#define RF_SANDBOX_MOUNT 2
#define RF_SANDBOX_NET 4
#define RF_SANDBOX_IPC 8
#define RF_SANDBOX_UTS 16
#define RF_SANDBOX_USER 32
int rf_sandbox_enter(int what, const char *hostname, int outer_uid, int outer_gid);
int rf_sandbox_expose(const char *cover, const char *const *paths, int n);
/* The next child forked is pid 1 of a new pid namespace (undo: rf_setns to our own). */
int rf_pid_namespace_for_children(void);
int rf_setns(int fd, int nstype);
/* Remount the filesystem at target with superblock options data, its mount flags kept. */
int rf_remount(const char *target, const char *data);
/* PR_SET_PDEATHSIG(SIGKILL); -ESRCH if the parent is already gone */
int rf_die_with_parent(int parent_pid);
int rf_tap_open(const char *name, int vnet_hdr, int multi_queue, char *actual_name);
/* What /proc/PID/cmdline shows from now on (a forked domain names its own program) */
int rf_set_cmdline(const char *args, size_t len);
#endif
