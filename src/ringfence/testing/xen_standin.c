/* A stand-in for libxengnttab.so.1 and libxenevtchn.so.1 that forwards to the sim
 * hypervisor, so the xen platform's code runs unchanged on machines without /dev/xen.
 *
 * Built by ringfence.testing.xen_standin and put first on LD_LIBRARY_PATH under both
 * sonames. It implements the calls ringfence.hypervisor.xen makes, compiled against
 * Debian's own <xengnttab.h> and <xenevtchn.h> so the signatures are the real ones.
 * The domain's identity is its sim control socket ($RINGFENCE_DOMAIN_FD): the process
 * says HELLO on first use, exactly once, and every handle shares that connection.
 *
 * Event channels: each handle owns an epoll set of its ports' eventfds, so
 * xenevtchn_fd() is one pollable fd and xenevtchn_pending() names a port that fired, as
 * /dev/xen/evtchn does.  Calls are synchronous, like the ioctls they stand in for. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define PAGE 4096u
#define MAGIC 0x5246u
#define REPLY 0x8000u
#define MAX_MESSAGE 65536u
#define MAX_FDS 250u
#define RESERVED_GREFS 8u
enum {
    OP_HELLO = 1, OP_ALLOC_PAGES = 2, OP_REGISTER_PAGES = 3, OP_FREE_PAGES = 4,
    OP_GNT_MAP = 5, OP_GNT_UNMAP = 6, OP_GNT_COPY = 7, OP_EVT_ALLOC_UNBOUND = 8,
    OP_EVT_BIND_INTERDOMAIN = 9, OP_EVT_CLOSE = 10,
};

struct __attribute__((packed)) header { uint16_t magic, op; uint32_t req_id, length; };
struct __attribute__((packed)) map_item { uint16_t domid, flags; uint32_t gref; };
struct __attribute__((packed)) map_result { int32_t status; uint32_t handle; };
struct __attribute__((packed)) copy_item {
    uint8_t source_is_gref, dest_is_gref;
    uint16_t source_domid, dest_domid, pad;
    uint32_t source_gref, dest_gref;
    uint64_t source_offset, dest_offset;
    uint32_t length, pad2;
};
struct __attribute__((packed)) register_item { uint32_t frame; int32_t fd; };

/* ---- the one control connection ---------------------------------------------------- */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int control_fd = -1;
static uint32_t next_req = 1;
static grant_entry_v1_t *grant_table;
static uint32_t grant_entries;
static uint8_t *grant_used;
static uint8_t message[MAX_MESSAGE];

/* One request and its reply; fds in the reply go to fds_out (up to max_fds). Returns the
 * reply's status (>= 0 ok, -errno) and its body length in *body_len. Lock held. */
static int call(uint16_t op, const void *payload, uint32_t length, const struct msghdr *extra,
                void *body, uint32_t body_max, uint32_t *body_len, int *fds_out, unsigned max_fds,
                unsigned *nfds)
{
    struct header h = {MAGIC, op, next_req++, length};
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)payload, length}};
    struct msghdr msg = {0};
    msg.msg_iov = iov;
    msg.msg_iovlen = length ? 2 : 1;
    if (extra) {
        msg.msg_control = extra->msg_control;
        msg.msg_controllen = extra->msg_controllen;
    }
    if (sendmsg(control_fd, &msg, MSG_NOSIGNAL) < 0)
        return -errno;
    union { char buf[CMSG_SPACE(MAX_FDS * sizeof(int))]; struct cmsghdr align; } control;
    for (;;) {
        struct iovec riov = {message, sizeof message};
        struct msghdr reply = {0};
        reply.msg_iov = &riov;
        reply.msg_iovlen = 1;
        reply.msg_control = control.buf;
        reply.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(control_fd, &reply, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -ECONNRESET;
        unsigned got = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&reply); c; c = CMSG_NXTHDR(&reply, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            unsigned count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *in = (int *)CMSG_DATA(c);
            for (unsigned i = 0; i < count; i++) {
                if (fds_out && got < max_fds)
                    fds_out[got++] = in[i];
                else
                    close(in[i]);
            }
        }
        struct header rh;
        if ((size_t)n < sizeof rh + 4)
            return -EPROTO;
        memcpy(&rh, message, sizeof rh);
        if (rh.req_id != h.req_id || rh.op != (op | REPLY)) {  /* not ours: drop */
            for (unsigned i = 0; i < got; i++)
                close(fds_out[i]);
            continue;
        }
        int32_t status;
        memcpy(&status, message + sizeof rh, 4);
        uint32_t blen = (uint32_t)n - sizeof rh - 4;
        if (blen > body_max)
            blen = body_max;
        if (body)
            memcpy(body, message + sizeof rh + 4, blen);
        if (body_len)
            *body_len = blen;
        if (nfds)
            *nfds = got;
        else
            for (unsigned i = 0; i < got; i++)
                close(fds_out[i]);
        return status;
    }
}

/* HELLO once per process: the kernel-checked credentials tell the hypervisor our pid. */
static int connect_once(void)
{
    if (control_fd >= 0)
        return 0;
    const char *env = getenv("RINGFENCE_DOMAIN_FD");
    if (!env)
        return -EBADF;
    int fd = atoi(env);
    control_fd = fd;
    struct ucred cred = {getpid(), getuid(), getgid()};
    union { char buf[CMSG_SPACE(sizeof cred)]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr extra = {0};
    extra.msg_control = control.buf;
    extra.msg_controllen = sizeof control.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&extra);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_CREDENTIALS;
    c->cmsg_len = CMSG_LEN(sizeof cred);
    memcpy(CMSG_DATA(c), &cred, sizeof cred);
    struct __attribute__((packed)) { uint16_t domid; uint32_t entries, ram_pages; } hello;
    uint32_t len = 0;
    int fds[2] = {-1, -1};
    unsigned nfds = 0;
    int status = call(OP_HELLO, NULL, 0, &extra, &hello, sizeof hello, &len, fds, 2, &nfds);
    if (status < 0 || len != sizeof hello || nfds != 2) {
        for (unsigned i = 0; i < nfds; i++)
            close(fds[i]);
        control_fd = -1;
        return status < 0 ? status : -EPROTO;
    }
    size_t table_size = ((size_t)hello.entries * sizeof(grant_entry_v1_t) + PAGE - 1) / PAGE * PAGE;
    grant_table = mmap(NULL, table_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    close(fds[0]);
    close(fds[1]);  /* RAM: gntshr pages are separate, mappable pages */
    if (grant_table == MAP_FAILED) {
        grant_table = NULL;
        return -errno;
    }
    grant_entries = hello.entries;
    grant_used = calloc(grant_entries, 1);
    return grant_used ? 0 : -ENOMEM;
}

static int fail(int status)
{
    errno = -status;
    return -1;
}

/* Every handle's open: the process's one HELLO, made by whichever comes first. */
static int connected(void)
{
    pthread_mutex_lock(&lock);
    int status = connect_once();
    pthread_mutex_unlock(&lock);
    return status < 0 ? fail(status) : 0;
}

/* Map n fds contiguously at a fresh reservation (or fail with nothing mapped). */
static void *map_fds(const int *fds, unsigned n, int prot)
{
    uint8_t *base = mmap(NULL, (size_t)n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    for (unsigned i = 0; i < n; i++) {
        if (mmap(base + (size_t)i * PAGE, PAGE, prot, MAP_SHARED | MAP_FIXED, fds[i], 0) == MAP_FAILED) {
            int saved = errno;
            munmap(base, (size_t)n * PAGE);
            errno = saved;
            return NULL;
        }
    }
    return base;
}

/* ---- grant mapping (xengnttab) ------------------------------------------------------ */

struct mapping { struct mapping *next; void *addr; uint32_t count; uint32_t *handles; };
struct xengntdev_handle { struct mapping *mappings; };

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    if (connected() < 0)
        return NULL;
    return calloc(1, sizeof(xengnttab_handle));
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants) { return 0; }
int xengnttab_fd(xengnttab_handle *xgt) { return control_fd; }

static int unmap_handles(const uint32_t *handles, uint32_t count)
{
    uint8_t payload[4 + MAX_FDS * 4];
    memcpy(payload, &count, 4);
    memcpy(payload + 4, handles, count * 4);
    int32_t statuses[MAX_FDS + 1];
    uint32_t len = 0;
    int status = call(OP_GNT_UNMAP, payload, 4 + count * 4, NULL, statuses, sizeof statuses,
                      &len, NULL, 0, NULL);
    return status < 0 ? status : 0;
}

void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t *domids,
                               uint32_t *refs, int prot)
{
    if (count == 0 || count > MAX_FDS) {
        errno = EINVAL;
        return NULL;
    }
    uint8_t payload[4 + MAX_FDS * sizeof(struct map_item)];
    memcpy(payload, &count, 4);
    for (uint32_t i = 0; i < count; i++) {
        struct map_item item = {(uint16_t)domids[i], (prot & PROT_WRITE) ? 0 : 1, refs[i]};
        memcpy(payload + 4 + i * sizeof item, &item, sizeof item);
    }
    uint8_t body[4 + MAX_FDS * sizeof(struct map_result)];
    uint32_t len = 0;
    int fds[MAX_FDS];
    unsigned nfds = 0;
    pthread_mutex_lock(&lock);
    int status = call(OP_GNT_MAP, payload, 4 + count * sizeof(struct map_item), NULL, body,
                      sizeof body, &len, fds, MAX_FDS, &nfds);
    uint32_t *handles = calloc(count, 4);
    uint32_t mapped = 0;
    int failure = status < 0 ? -EIO : 0;
    if (status >= 0 && handles && len == 4 + count * sizeof(struct map_result)) {
        for (uint32_t i = 0; i < count; i++) {
            struct map_result r;
            memcpy(&r, body + 4 + i * sizeof r, sizeof r);
            if (r.status == 0)
                handles[mapped++] = r.handle;
            else
                failure = -EINVAL;  /* a GNTST error: as the kernel reports it */
        }
    } else if (!failure) {
        failure = handles ? -EPROTO : -ENOMEM;
    }
    void *addr = NULL;
    if (!failure && nfds == count) {
        addr = map_fds(fds, count, prot);
        if (!addr)
            failure = -errno;
    } else if (!failure) {
        failure = -EPROTO;
    }
    for (unsigned i = 0; i < nfds; i++)
        close(fds[i]);
    struct mapping *m = failure ? NULL : malloc(sizeof *m);
    if (!failure && !m) {
        munmap(addr, (size_t)count * PAGE);
        failure = -ENOMEM;
    }
    if (failure) {
        if (mapped)
            unmap_handles(handles, mapped);
        pthread_mutex_unlock(&lock);
        free(handles);
        errno = -failure;
        return NULL;
    }
    *m = (struct mapping){xgt->mappings, addr, count, handles};
    xgt->mappings = m;
    pthread_mutex_unlock(&lock);
    return addr;
}

void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot)
{
    uint32_t domids[MAX_FDS];
    for (uint32_t i = 0; i < count && i < MAX_FDS; i++)
        domids[i] = domid;
    return xengnttab_map_grant_refs(xgt, count, domids, refs, prot);
}

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    return xengnttab_map_grant_refs(xgt, 1, &domid, &ref, prot);
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    pthread_mutex_lock(&lock);
    for (struct mapping **p = &xgt->mappings; *p; p = &(*p)->next) {
        struct mapping *m = *p;
        if (m->addr != start_address || m->count != count)
            continue;
        *p = m->next;
        munmap(m->addr, (size_t)m->count * PAGE);
        int status = unmap_handles(m->handles, m->count);
        pthread_mutex_unlock(&lock);
        free(m->handles);
        free(m);
        return status < 0 ? fail(status) : 0;
    }
    pthread_mutex_unlock(&lock);
    return fail(-EINVAL);
}

int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count, xengnttab_grant_copy_segment_t *segs)
{
    const uint32_t batch = 1024;  /* the hypervisor's MAX_BATCH */
    static uint8_t payload[MAX_MESSAGE];
    static int32_t statuses[MAX_MESSAGE / 4];
    pthread_mutex_lock(&lock);
    for (uint32_t start = 0; start < count; start += batch) {
        uint32_t n = count - start < batch ? count - start : batch;
        memcpy(payload, &n, 4);
        for (uint32_t i = 0; i < n; i++) {
            const xengnttab_grant_copy_segment_t *s = &segs[start + i];
            int src_gref = !!(s->flags & GNTCOPY_source_gref), dst_gref = !!(s->flags & GNTCOPY_dest_gref);
            struct copy_item item = {
                .source_is_gref = src_gref, .dest_is_gref = !!dst_gref,
                .source_domid = src_gref ? s->source.foreign.domid : 0,
                .dest_domid = dst_gref ? s->dest.foreign.domid : 0,
                .source_gref = src_gref ? s->source.foreign.ref : 0,
                .dest_gref = dst_gref ? s->dest.foreign.ref : 0,
                .source_offset = src_gref ? s->source.foreign.offset : (uint64_t)(uintptr_t)s->source.virt,
                .dest_offset = dst_gref ? s->dest.foreign.offset : (uint64_t)(uintptr_t)s->dest.virt,
                .length = s->len,
            };
            memcpy(payload + 4 + i * sizeof item, &item, sizeof item);
        }
        uint32_t len = 0;
        int status = call(OP_GNT_COPY, payload, 4 + n * sizeof(struct copy_item), NULL, statuses,
                          sizeof statuses, &len, NULL, 0, NULL);
        if (status < 0 || len != 4 + n * 4) {
            pthread_mutex_unlock(&lock);
            return fail(status < 0 ? status : -EPROTO);
        }
        for (uint32_t i = 0; i < n; i++)
            segs[start + i].status = (int16_t)statuses[1 + i];
    }
    pthread_mutex_unlock(&lock);
    return 0;
}

int xengnttab_close(xengnttab_handle *xgt)
{
    if (!xgt)
        return 0;
    while (xgt->mappings)
        xengnttab_unmap(xgt, xgt->mappings->addr, xgt->mappings->count);
    free(xgt);
    return 0;
}

/* ---- grant sharing (xengntshr): pages of our own, granted in our grant table ---------- */

struct shared { struct shared *next; void *addr; uint32_t count; uint32_t *frames, *refs; int *fds; };
static struct shared *shares;

xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    return xengnttab_open(logger, open_flags);
}

int xengntshr_close(xengntshr_handle *xgs) { free(xgs); return 0; }
int xengntshr_fd(xengntshr_handle *xgs) { return control_fd; }

static void release_share(struct shared *s)
{
    for (uint32_t i = 0; i < s->count; i++) {
        if (s->refs[i]) {
            uint16_t expected = __atomic_load_n(&grant_table[s->refs[i]].flags, __ATOMIC_ACQUIRE);
            /* as gntalloc: a page still mapped by the peer stays granted (and leaks) */
            if (!(expected & (GTF_reading | GTF_writing)) &&
                __atomic_compare_exchange_n(&grant_table[s->refs[i]].flags, &expected, 0, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                grant_used[s->refs[i]] = 0;
        }
        if (s->fds[i] >= 0)
            close(s->fds[i]);
    }
    if (s->addr)
        munmap(s->addr, (size_t)s->count * PAGE);
    uint8_t payload[4 + MAX_FDS * 4];
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->count; i++)
        if (s->frames[i] != UINT32_MAX)
            memcpy(payload + 4 + 4 * n++, &s->frames[i], 4);
    memcpy(payload, &n, 4);
    if (n)
        call(OP_FREE_PAGES, payload, 4 + n * 4, NULL, NULL, 0, NULL, NULL, 0, NULL);
    free(s->frames);
    free(s->refs);
    free(s->fds);
    free(s);
}

void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable)
{
    if (count <= 0 || (unsigned)count > MAX_FDS) {
        errno = EINVAL;
        return NULL;
    }
    struct shared *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->count = (uint32_t)count;
    s->frames = malloc(count * 4);
    s->refs = calloc(count, 4);
    s->fds = malloc(count * sizeof(int));
    if (!s->frames || !s->refs || !s->fds) {
        free(s->frames); free(s->refs); free(s->fds); free(s);
        errno = ENOMEM;
        return NULL;
    }
    for (int i = 0; i < count; i++) {
        s->frames[i] = UINT32_MAX;
        s->fds[i] = -1;
    }
    pthread_mutex_lock(&lock);
    uint32_t n = (uint32_t)count, len = 0;
    uint8_t body[4 + MAX_FDS * 4];
    unsigned nfds = 0;
    int status = call(OP_ALLOC_PAGES, &n, 4, NULL, body, sizeof body, &len, s->fds, n, &nfds);
    if (status < 0 || len != 4 + n * 4 || nfds != n) {
        release_share(s);
        pthread_mutex_unlock(&lock);
        errno = status < 0 ? -status : EPROTO;
        return NULL;
    }
    memcpy(s->frames, body + 4, n * 4);
    /* the hypervisor takes these fds from us (pidfd_getfd) when the peer maps a page */
    uint8_t reg[4 + MAX_FDS * sizeof(struct register_item)];
    memcpy(reg, &n, 4);
    for (uint32_t i = 0; i < n; i++) {
        struct register_item item = {s->frames[i], s->fds[i]};
        memcpy(reg + 4 + i * sizeof item, &item, sizeof item);
    }
    status = call(OP_REGISTER_PAGES, reg, 4 + n * sizeof(struct register_item), NULL, NULL, 0,
                  NULL, NULL, 0, NULL);
    s->addr = status < 0 ? NULL : map_fds(s->fds, n, PROT_READ | PROT_WRITE);
    uint32_t next = RESERVED_GREFS;
    for (uint32_t i = 0; s->addr && i < n; i++) {
        while (next < grant_entries && grant_used[next])
            next++;
        if (next >= grant_entries) {
            status = -ENOSPC;
            break;
        }
        grant_used[next] = 1;
        s->refs[i] = next;
        grant_entry_v1_t *e = &grant_table[next];
        e->domid = (uint16_t)domid;
        e->frame = s->frames[i];
        __atomic_store_n(&e->flags, (uint16_t)(GTF_permit_access | (writable ? 0 : GTF_readonly)), __ATOMIC_RELEASE);
    }
    if (status < 0 || !s->addr) {
        release_share(s);
        pthread_mutex_unlock(&lock);
        errno = status < 0 ? -status : ENOMEM;
        return NULL;
    }
    memcpy(refs, s->refs, n * 4);
    s->next = shares;
    shares = s;
    pthread_mutex_unlock(&lock);
    return s->addr;
}

int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count)
{
    pthread_mutex_lock(&lock);
    for (struct shared **p = &shares; *p; p = &(*p)->next) {
        struct shared *s = *p;
        if (s->addr == start_address && s->count == count) {
            *p = s->next;
            release_share(s);
            pthread_mutex_unlock(&lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&lock);
    return fail(-EINVAL);
}

/* ---- event channels (xenevtchn) ----------------------------------------------------- */

struct port { struct port *next; uint32_t port; int notify_fd, wait_fd; };
struct xenevtchn_handle { int epoll_fd; struct port *ports; };

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    if (connected() < 0)
        return NULL;
    xenevtchn_handle *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (h->epoll_fd < 0) {
        free(h);
        return NULL;
    }
    return h;
}

int xenevtchn_fd(xenevtchn_handle *xce) { return xce->epoll_fd; }

static xenevtchn_port_or_error_t bind_port(xenevtchn_handle *xce, uint16_t op, const void *payload,
                                      uint32_t length)
{
    uint32_t port = 0, len = 0;
    int fds[2] = {-1, -1};
    unsigned nfds = 0;
    pthread_mutex_lock(&lock);
    int status = call(op, payload, length, NULL, &port, sizeof port, &len, fds, 2, &nfds);
    pthread_mutex_unlock(&lock);
    struct port *p = status >= 0 && len == 4 && nfds == 2 ? malloc(sizeof *p) : NULL;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = port};
    if (!p || epoll_ctl(xce->epoll_fd, EPOLL_CTL_ADD, fds[1], &ev) < 0) {
        for (unsigned i = 0; i < nfds; i++)
            close(fds[i]);
        free(p);
        return fail(status < 0 ? status : -EPROTO);
    }
    *p = (struct port){xce->ports, port, fds[0], fds[1]};
    xce->ports = p;
    return (xenevtchn_port_or_error_t)port;
}

xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid)
{
    uint16_t d = (uint16_t)domid;
    return bind_port(xce, OP_EVT_ALLOC_UNBOUND, &d, sizeof d);
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port)
{
    struct __attribute__((packed)) { uint16_t domid; uint32_t port; } req = {(uint16_t)domid, remote_port};
    return bind_port(xce, OP_EVT_BIND_INTERDOMAIN, &req, sizeof req);
}

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    for (struct port *p = xce->ports; p; p = p->next)
        if (p->port == port)
            return eventfd_write(p->notify_fd, 1) < 0 ? -1 : 0;
    return fail(-EINVAL);
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    struct epoll_event ev;
    int n = epoll_wait(xce->epoll_fd, &ev, 1, 0);
    if (n <= 0)
        return fail(n < 0 ? -errno : -EAGAIN);
    for (struct port *p = xce->ports; p; p = p->next) {
        if (p->port == ev.data.u32) {
            eventfd_t value;
            eventfd_read(p->wait_fd, &value);  /* the eventfd is non-blocking: EAGAIN is fine */
            return (xenevtchn_port_or_error_t)p->port;
        }
    }
    return fail(-EAGAIN);
}

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    for (struct port **pp = &xce->ports; *pp; pp = &(*pp)->next) {
        struct port *p = *pp;
        if (p->port != port)
            continue;
        *pp = p->next;
        epoll_ctl(xce->epoll_fd, EPOLL_CTL_DEL, p->wait_fd, NULL);
        close(p->notify_fd);
        close(p->wait_fd);
        free(p);
        pthread_mutex_lock(&lock);
        int status = call(OP_EVT_CLOSE, &port, 4, NULL, NULL, 0, NULL, NULL, 0, NULL);
        pthread_mutex_unlock(&lock);
        return status < 0 ? fail(status) : 0;
    }
    return fail(-EINVAL);
}

int xenevtchn_close(xenevtchn_handle *xce)
{
    if (!xce)
        return 0;
    while (xce->ports)
        xenevtchn_unbind(xce, xce->ports->port);
    close(xce->epoll_fd);
    free(xce);
    return 0;
}
