"""cffi build script for the xen platform's bindings (API mode, out of line).

Compiled against Debian libxen-dev's own headers and linked with libxengnttab and
libxenevtchn, so a signature or struct that does not match Xen's fails the build, not a
guest. Built only where those headers exist (see setup.py); the sim platform never needs it.
"""
from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
typedef struct xengntdev_handle xengnttab_handle;
typedef struct xengntdev_handle xengntshr_handle;
typedef struct xenevtchn_handle xenevtchn_handle;
typedef int xenevtchn_port_or_error_t;
typedef uint32_t evtchn_port_t;

#define PROT_READ ...
#define PROT_WRITE ...
#define GNTCOPY_source_gref ...
#define GNTCOPY_dest_gref ...

xengnttab_handle *xengnttab_open(void *logger, unsigned open_flags);
int xengnttab_close(xengnttab_handle *xgt);
int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);

struct xengnttab_grant_copy_segment {
    union xengnttab_copy_ptr {
        void *virt;
        struct { uint32_t ref; uint16_t offset; uint16_t domid; } foreign;
    } source, dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
};
typedef struct xengnttab_grant_copy_segment xengnttab_grant_copy_segment_t;
int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count, xengnttab_grant_copy_segment_t *segs);

xengntshr_handle *xengntshr_open(void *logger, unsigned open_flags);
int xengntshr_close(xengntshr_handle *xgs);
void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable);
int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count);

xenevtchn_handle *xenevtchn_open(void *logger, unsigned open_flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
""")

# The loggers are `struct xentoollog_logger *`; Python only ever passes NULL, so the
# declarations above take `void *` and these wrappers keep the compiler's checks honest.
ffibuilder.set_source(
    "ringfence.hypervisor._xenffi",
    """
#include <sys/mman.h>
#include <xengnttab.h>
#include <xenevtchn.h>
#define xengnttab_open(l, f) xengnttab_open((struct xentoollog_logger *)(l), (f))
#define xengntshr_open(l, f) xengntshr_open((struct xentoollog_logger *)(l), (f))
#define xenevtchn_open(l, f) xenevtchn_open((struct xentoollog_logger *)(l), (f))
""",
    libraries=["xengnttab", "xenevtchn"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
