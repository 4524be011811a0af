#define _GNU_SOURCE
#include "sandbox.h"
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ioctl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = write(fd, text, strlen(text));
    int err = n < 0 ? -errno : 0;
    close(fd);
    return err;
}

/* Called in the child between fork and exec. With a new pid namespace the caller forks once
 * more: the new process is pid 1 of the namespace and goes on to exec; the first child
 * stays behind as a waiter that relays the exit status, so that whoever started it (and
 * watches it through a pidfd) sees the domain's life and death. A caller born pid 1 of a
 * new pid namespace (forked after rf_pid_namespace_for_children: the launcher's children)
 * needs neither: it is the namespace's init, and its parent watches it. Returns 0 or
 * -errno. */
int rf_sandbox_enter(int what, const char *hostname, int outer_uid, int outer_gid)
{
    int flags = 0;
    int born_init = (what & RF_SANDBOX_PID) && getpid() == 1;
    if (what & RF_SANDBOX_USER) flags |= CLONE_NEWUSER;
    if ((what & RF_SANDBOX_PID) && !born_init) flags |= CLONE_NEWPID;
    if (what & RF_SANDBOX_MOUNT) flags |= CLONE_NEWNS;
    if (what & RF_SANDBOX_NET) flags |= CLONE_NEWNET;
    if (what & RF_SANDBOX_IPC) flags |= CLONE_NEWIPC;
    if (what & RF_SANDBOX_UTS) flags |= CLONE_NEWUTS;
    if (unshare(flags) < 0)
        return -errno;
    if (what & RF_SANDBOX_USER) {
        char map[64];
        int err = write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "0 %d 1\n", outer_uid);
        if (!err) err = write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "0 %d 1\n", outer_gid);
        if (!err) err = write_file("/proc/self/gid_map", map);
        if (err)
            return err;
    }
    if ((what & RF_SANDBOX_PID) && !born_init) {
        pid_t child = fork();
        if (child < 0)
            return -errno;
        if (child > 0) {
            /* The waiter: hold no fd of the parent (in particular not subprocess's exec
             * error pipe, which would keep the parent waiting) and pass signals on. */
            syscall(SYS_close_range, 3, ~0U, 0);
            int status;
            while (waitpid(child, &status, 0) < 0) {
                if (errno != EINTR)
                    _exit(127);
            }
            if (WIFSIGNALED(status)) {
                signal(WTERMSIG(status), SIG_DFL);
                kill(getpid(), WTERMSIG(status));
            }
            _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 127);
        }
        /* pid 1 of the namespace: die with the waiter, taking the namespace with it. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
    }
    if (what & RF_SANDBOX_MOUNT) {
        /* Nothing we mount may leak back to the host, and the host's mounts are not ours. */
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
            return -errno;
        if ((what & RF_SANDBOX_PID) &&
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
            return -errno;
        /* sysfs shows the network namespace of whoever mounts it: mount ours. */
        if ((what & RF_SANDBOX_NET) &&
            mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
            return -errno;
        if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m") < 0)
            return -errno;
        if (mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m") < 0)
            return -errno;
    }
    if ((what & RF_SANDBOX_UTS) && hostname && *hostname &&
        sethostname(hostname, strlen(hostname)) < 0)
        return -errno;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    return 0;
}

static int mkdir_p(const char *path)
{
    char buf[4096];
    size_t len = strlen(path);
    if (len >= sizeof buf)
        return -ENAMETOOLONG;
    memcpy(buf, path, len + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(buf, 0755) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/* Hide a directory others may not enter (say /root) behind an empty tmpfs, then bind the
 * listed paths under it back in, so that a domain that drops to an unprivileged uid can
 * still load its interpreter from there but sees nothing else of it. Mount namespace only. */
int rf_sandbox_expose(const char *cover, const char *const *paths, int n)
{
    enum { MAX = 32 };
    int fds[MAX];
    if (n > MAX)
        return -E2BIG;
    for (int i = 0; i < n; i++) {
        fds[i] = open(paths[i], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fds[i] < 0) {
            int err = -errno;
            while (i--)
                close(fds[i]);
            return err;
        }
    }
    int err = 0;
    if (mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") < 0)
        err = -errno;
    for (int i = 0; i < n && !err; i++) {
        char source[64];
        snprintf(source, sizeof source, "/proc/self/fd/%d", fds[i]);
        err = mkdir_p(paths[i]);
        if (!err && mount(source, paths[i], NULL, MS_BIND | MS_REC, NULL) < 0)
            err = -errno;
    }
    for (int i = 0; i < n; i++)
        close(fds[i]);
    return err;
}

int rf_pid_namespace_for_children(void)
{
    return unshare(CLONE_NEWPID) < 0 ? -errno : 0;
}

int rf_setns(int fd, int nstype)
{
    return setns(fd, nstype) < 0 ? -errno : 0;
}

/* Remount the filesystem mounted at target with the superblock options data, keeping the
 * mount's own flags: a remount sets nosuid, nodev, noexec, ro and the atime flags from its
 * flags argument, and dropping them from a cgroup hierarchy would loosen it. */
int rf_remount(const char *target, const char *data)
{
    static const struct { unsigned long st, ms; } kept[] = {
        {ST_RDONLY, MS_RDONLY}, {ST_NOSUID, MS_NOSUID}, {ST_NODEV, MS_NODEV},
        {ST_NOEXEC, MS_NOEXEC}, {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME},
        {ST_RELATIME, MS_RELATIME},
    };
    struct statvfs st;
    if (statvfs(target, &st) < 0)
        return -errno;
    unsigned long flags = MS_REMOUNT;
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        if (st.f_flag & kept[i].st)
            flags |= kept[i].ms;
    return mount(NULL, target, NULL, flags, data) < 0 ? -errno : 0;
}

/* Open (creating if needed) a TAP device in the caller's network namespace. With vnet_hdr
 * every frame carries a virtio_net_hdr so checksum offload and GSO pass through. */
int rf_tap_open(const char *name, int vnet_hdr, int multi_queue, char *actual_name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet_hdr ? IFF_VNET_HDR : 0) |
                    (multi_queue ? IFF_MULTI_QUEUE : 0);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    if (vnet_hdr) {
        int size = 12; /* virtio_net_hdr_mrg_rxbuf / v1 header */
        if (ioctl(fd, TUNSETVNETHDRSZ, &size) < 0) {
            int err = -errno;
            close(fd);
            return err;
        }
    }
    if (actual_name)
        memcpy(actual_name, ifr.ifr_name, IFNAMSIZ);
    return fd;
}

int rf_die_with_parent(int parent_pid)
{
    /* A domain outlives no toolstack: killed -9 or crashed, its children follow it
     * instead of lingering as orphans that hold the runtime directory. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
        return -errno;
    /* pid 1 of a new pid namespace sees no parent (getppid() is 0): its caller checks */
    if (getpid() != 1 && getppid() != parent_pid)
        return -ESRCH; /* the parent died before we asked */
    return 0;
}

/* Where the kernel reads this process's command line from: fields 48 and 49 of
 * /proc/self/stat (the comm field before them may hold spaces and parentheses). */
static int arg_area(unsigned long *start, unsigned long *end)
{
    char buf[4096];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -EIO;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -EIO;
    /* p + 2 is field 3 */
    p += 2;
    for (int field = 3; field < 48 && p; field++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    if (!p || sscanf(p, "%lu %lu", start, end) != 2 || *end <= *start)
        return -EIO;
    return 0;
}

/* A process forked from the launcher would show the launcher's command line to ps and
 * pgrep. Give it its own: with CAP_SYS_RESOURCE the kernel is pointed at a copy (never
 * freed: it is read for as long as the process lives); without, the program's arguments
 * are written over the launcher's own (the launcher passes a long enough command line),
 * cut if they do not fit. */
int rf_set_cmdline(const char *args, size_t len)
{
    if (!len)
        return -EINVAL;
    char *copy = malloc(len);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, args, len);
    if (prctl(PR_SET_MM, PR_SET_MM_ARG_START, (unsigned long)copy, 0, 0) == 0 &&
        prctl(PR_SET_MM, PR_SET_MM_ARG_END, (unsigned long)(copy + len), 0, 0) == 0)
        return 0;
    free(copy);
    unsigned long start, end;
    int err = arg_area(&start, &end);
    if (err)
        return err;
    size_t room = end - start;
    size_t n = len < room ? len : room;
    memcpy((char *)start, args, n);
    memset((char *)start + n, 0, room - n);
    ((char *)start)[room - 1] = 0;
    return 0;
}
