/* The dom0 side of our xenstored in C: one thread that owns the daemon's Unix socket and its
 * connections, frames xs_wire messages, answers plain reads from a copy of the tree's values
 * itself, and hands every other request to the Python daemon (extern "Python+C" callbacks,
 * which take the GIL). A read then costs no Python at all; trio's per-wakeup cost
 * (~45 us here) was most of a request's. See xenbus/engine.py. */
#ifndef RF_XSD_H
#define RF_XSD_H
#include <stddef.h>
#include <stdint.h>

typedef struct rf_xsd rf_xsd;

typedef struct rf_xsd_stats {
    uint64_t connections_total;
    uint64_t connections;
    uint64_t fast_reads;      /* answered in C */      /* answered in C */
    uint64_t forwarded;       /* handed to the Python daemon */
    uint64_t protocol_violations;
    uint64_t dropped_slow_clients;
    uint64_t values;          /* nodes in the copy of the tree */
    uint64_t fast_writes;     /* dom0's writes made in C */
    uint64_t watch_events;    /* sent for them */
    uint64_t transactions_open;  /* the engine's own */
    uint64_t transactions;    /* committed by the engine */
    uint64_t conflicts;       /* of those, failed with EAGAIN */
    uint64_t adopted;         /* handed to the daemon part way */
    uint64_t journal_records; /* written by the engine */
} rf_xsd_stats;

/* Why a connection ended (rf_xsd_on_close's reason). */
#define RF_XSD_CLOSED_EOF 0
#define RF_XSD_CLOSED_VIOLATION 1
#define RF_XSD_CLOSED_SLOW 2
#define RF_XSD_CLOSED_BY_DAEMON 3

/* listen_fd: a listening, non-blocking Unix socket; its connections are privileged (dom0).
 * ctx comes back in every callback. max_output: queued bytes after which a client that does
 * not read is dropped. NULL on failure (errno set). */
rf_xsd *rf_xsd_new(int listen_fd, void *ctx, size_t max_output);
int rf_xsd_start(rf_xsd *xsd);                /* the thread; 0 or -errno */
void rf_xsd_stop(rf_xsd *xsd);                /* stops and joins it, closes every connection */
void rf_xsd_free(rf_xsd *xsd);

/* Changes to the copy of the tree, applied atomically as one batch: records of
 * u32 path length, u32 value length (0xFFFFFFFF: the node is gone), path, value. */
/* Watches, as the daemon registers and drops them (servable: see xsd.c). */
int rf_xsd_watch(rf_xsd *xsd, uint32_t id, uint32_t conn, int servable, const uint8_t *path,
                 size_t path_len, const uint8_t *token, size_t token_len);
void rf_xsd_unwatch(rf_xsd *xsd, uint32_t id);
/* dom0's writes of existing nodes made in C (off while the daemon keeps a journal). */
void rf_xsd_set_fast_writes(rf_xsd *xsd, int on);
/* The daemon's journal (-1: none): the engine appends its writes' records to it, in the
 * daemon's format, before their replies; rf_xsd_take_journaled counts them for the
 * daemon's compaction. */
void rf_xsd_set_journal(rf_xsd *xsd, int fd);
uint64_t rf_xsd_take_journaled(rf_xsd *xsd);
/* The daemon enters the tree: the engine makes no write until rf_xsd_leave, and the writes
 * it made since the last time are copied to out (apply format) for the daemon to replay.
 * Returns their length, or minus it when cap is too small (nothing copied; call again). */
long rf_xsd_enter(rf_xsd *xsd, uint8_t *out, size_t cap);
void rf_xsd_leave(rf_xsd *xsd);
/* The daemon takes over one of the engine's transactions (it asked for something the
 * engine does not do): its log (apply format, value length 0xFFFFFFFF for a read) is copied
 * to out, and *doomed says whether it must fail at commit. Returns the log's length,
 * -ENOENT (no such transaction on that connection) or -ENOSPC (cap too small). */
long rf_xsd_adopt(rf_xsd *xsd, uint32_t conn, uint32_t tx_id, uint8_t *out, size_t cap, int *doomed);

int rf_xsd_apply(rf_xsd *xsd, const uint8_t *batch, size_t len);
void rf_xsd_clear_values(rf_xsd *xsd);

/* Output for a connection, from any thread: queued, and sent at once unless the engine's
 * own thread is the caller (it sends when its batch is done). -ENOENT: gone. */
int rf_xsd_send(rf_xsd *xsd, uint32_t conn, const uint8_t *data, size_t len);
void rf_xsd_close(rf_xsd *xsd, uint32_t conn);
void rf_xsd_statistics(rf_xsd *xsd, rf_xsd_stats *out);

/* Callbacks into Python (defined by cffi from xsd.cdef). */
void rf_xsd_on_open(void *ctx, uint32_t conn);
/* One or more whole messages, back to back. */
void rf_xsd_on_request(void *ctx, uint32_t conn, const uint8_t *message, size_t len);
void rf_xsd_on_close(void *ctx, uint32_t conn, int reason);
#endif
