/* See xsd.h. Locking: xsd->lock guards the connection table, every connection's output and
 * flags, the list of connections with output to send, the copy of the tree and the
 * statistics. A connection's input is the engine thread's alone, and only the engine thread
 * frees a connection, so it may hold one without the lock between the two. The engine never
 * holds the lock while it calls into Python (the callbacks take the GIL, and Python calls
 * back in here). */
#define _GNU_SOURCE
#include "xsd.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define HEADER 16
#define PAYLOAD_MAX 4096
#define XS_READ 2
#define XS_WRITE 11
#define XS_WATCH_EVENT 15
#define RECV_CHUNK 65536
#define REPLY_CHUNK 8          /* replies sent together, as the Python daemon's dom0 batches */
#define SLOT_BITS 20
#define MAX_SLOTS (1u << SLOT_BITS)
#define TAG_STOP UINT64_MAX
#define TAG_LISTEN (UINT64_MAX - 1)
#define ACCEPT_PAUSE_MS 50     /* out of fds: stop accepting for a while, not spin */
#define XS_TRANSACTION_START 6
#define XS_TRANSACTION_END 7
#define XS_ERROR 16
#define TX_ID_BIT 0x80000000u  /* the engine's transaction ids; the daemon's are below */
#define TX_READ UINT32_MAX
#define TX_LOG_MAX 61440       /* fits the daemon's buffer for rf_xsd_adopt */
#define TX_MAX 1024
#define WRITTEN_MAX (1u << 20) /* writes kept for the daemon: past this, it makes them (and
                                * takes these) itself, so dom0 writing alone grows nothing */

struct buf {
    uint8_t *data;
    size_t len, cap;
};

struct conn {
    int fd;
    uint32_t id;
    struct buf in;             /* engine thread only */
    size_t in_off;             /* parsed up to here */
    struct buf out;
    int blocked;               /* the socket took not all output: reading waits, EPOLLOUT armed */
    int queued;                /* on the list of connections with output to send */
    int closing;               /* reason + 1 */
    struct conn *next_queued;
};

/* A node's value. changed_at: the change count (rf_xsd.epoch) when it last changed, for
 * the engine's transactions; a removed node stays, `gone`, while any of them is open. */
struct value {
    struct value *next;
    uint32_t hash, path_len, value_len;
    int gone;
    uint64_t changed_at;
    uint8_t *bytes;            /* path, then value */
};

/* A transaction of dom0's that the engine serves: reads and writes of nodes that exist,
 * logged in order, then committed here if nothing it touched changed since it started.
 * Anything else it asks for hands it to the daemon (rf_xsd_adopt), which goes on with it. */
struct tx {
    struct tx *next;
    uint32_t id, conn;
    uint64_t start;
    int doomed;                /* it read a value newer than its start: the commit fails */
    struct buf log;            /* u32 path length, u32 value length (TX_READ), path, value */
};

/* A watch, as the daemon registered it. `servable`: the engine may send its events (an
 * absolute path, dom0's, on one of the engine's connections); a write that fires any other
 * watch goes to the daemon. */
struct watch {
    struct watch *next;
    uint32_t id, conn, path_len, token_len;
    int servable;
    uint8_t *bytes;            /* path, then token */
};

struct rf_xsd {
    int listen_fd, epfd, stopfd;
    void *ctx;
    size_t max_output;
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    struct conn **slots;
    uint16_t *generation;
    uint32_t nslots;
    struct conn *queued;
    struct value **table;
    size_t table_size;
    int accept_paused;
    struct watch *watches;
    int fast_writes;           /* the daemon allows them (no journal to keep) */
    int daemon_busy;           /* the daemon is inside the tree: the engine writes nothing */
    struct buf written;        /* writes made here, for the daemon to replay (apply format) */
    uint64_t epoch;            /* changes to the values so far */
    size_t entries, tombstones;
    struct tx *txs;
    uint32_t next_tx;
    int journal_fd;            /* the daemon's journal, or -1 */
    uint64_t journaled;        /* records written to it since the daemon last asked */
    rf_xsd_stats stats;
};

/* ---- buffers ---------------------------------------------------------------------------- */
static int reserve(struct buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more)
        cap *= 2;
    uint8_t *data = realloc(b->data, cap);
    if (!data)
        return -ENOMEM;
    b->data = data;
    b->cap = cap;
    return 0;
}

static int append(struct buf *b, const void *data, size_t len)
{
    if (reserve(b, len))
        return -ENOMEM;
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

static uint32_t get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- the copy of the tree's values ------------------------------------------------------ */
static uint32_t hash_path(const uint8_t *path, size_t len)
{
    uint32_t h = 2166136261u;  /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ path[i]) * 16777619u;
    return h;
}

static struct value **find_value(rf_xsd *x, const uint8_t *path, size_t len, uint32_t h)
{
    struct value **at = &x->table[h & (x->table_size - 1)];
    for (; *at; at = &(*at)->next)
        if ((*at)->hash == h && (*at)->path_len == len && !memcmp((*at)->bytes, path, len))
            return at;
    return at;
}

static int grow_table(rf_xsd *x)
{
    size_t size = x->table_size * 2;
    struct value **table = calloc(size, sizeof(*table));
    if (!table)
        return -ENOMEM;
    for (size_t i = 0; i < x->table_size; i++) {
        struct value *v = x->table[i], *next;
        for (; v; v = next) {
            next = v->next;
            v->next = table[v->hash & (size - 1)];
            table[v->hash & (size - 1)] = v;
        }
    }
    free(x->table);
    x->table = table;
    x->table_size = size;
    return 0;
}

static void sweep_tombstones(rf_xsd *x)
{
    for (size_t i = 0; i < x->table_size && x->tombstones; i++)
        for (struct value **at = &x->table[i]; *at;) {
            struct value *v = *at;
            if (!v->gone) {
                at = &v->next;
                continue;
            }
            *at = v->next;
            free(v->bytes);
            free(v);
            x->entries--;
            x->tombstones--;
        }
}

static void mark_gone(rf_xsd *x, struct value *v)
{
    if (!v->gone) {
        v->gone = 1;
        x->stats.values--;
        x->tombstones++;
    }
    v->value_len = 0;
    v->changed_at = x->epoch;
}

static struct value *live_value(rf_xsd *x, const uint8_t *path, uint32_t len)
{
    struct value *v = *find_value(x, path, len, hash_path(path, len));
    return v && !v->gone ? v : NULL;
}

static int set_value(rf_xsd *x, const uint8_t *path, uint32_t plen, const uint8_t *val, uint32_t vlen,
                     int gone)
{
    uint32_t h = hash_path(path, plen);
    struct value **at = find_value(x, path, plen, h), *v = *at;
    x->epoch++;
    if (gone) {
        if (!v)
            return 0;  /* an open transaction only ever touched nodes that were there */
        mark_gone(x, v);
        if (!x->stats.transactions_open) {  /* no transaction needs the tombstone */
            *at = v->next;
            free(v->bytes);
            free(v);
            x->entries--;
            x->tombstones--;
        }
        return 0;
    }
    uint8_t *bytes = malloc((size_t)plen + vlen + 1);
    if (!bytes) {
        if (v)
            mark_gone(x, v);  /* missing here is safe: the daemon answers for it */
        return -ENOMEM;
    }
    memcpy(bytes, path, plen);
    memcpy(bytes + plen, val, vlen);
    if (!v) {
        if (!(v = calloc(1, sizeof(*v)))) {
            free(bytes);
            return -ENOMEM;
        }
        v->hash = h;
        v->next = x->table[h & (x->table_size - 1)];
        x->table[h & (x->table_size - 1)] = v;
        x->entries++;
        x->stats.values++;
    } else {
        free(v->bytes);
        if (v->gone) {
            v->gone = 0;
            x->tombstones--;
            x->stats.values++;
        }
    }
    v->bytes = bytes;
    v->path_len = plen;
    v->value_len = vlen;
    v->changed_at = x->epoch;
    if (x->entries > x->table_size)
        return grow_table(x);
    return 0;
}

int rf_xsd_apply(rf_xsd *x, const uint8_t *batch, size_t len)
{
    int rc = 0;
    pthread_mutex_lock(&x->lock);
    size_t off = 0;
    while (rc == 0 && len - off >= 8) {
        uint32_t plen = get32(batch + off), vlen = get32(batch + off + 4);
        int gone = vlen == UINT32_MAX;
        size_t need = 8 + (size_t)plen + (gone ? 0 : vlen);
        if (need > len - off) {
            rc = -EINVAL;
            break;
        }
        rc = set_value(x, batch + off + 8, plen, batch + off + 8 + plen, gone ? 0 : vlen, gone);
        off += need;
    }
    if (rc == 0 && off != len)
        rc = -EINVAL;
    pthread_mutex_unlock(&x->lock);
    return rc;
}

static void free_values(rf_xsd *x)
{
    for (size_t i = 0; i < x->table_size; i++) {
        struct value *v = x->table[i], *next;
        for (; v; v = next) {
            next = v->next;
            free(v->bytes);
            free(v);
        }
        x->table[i] = NULL;
    }
    x->stats.values = 0;
    x->entries = x->tombstones = 0;
    x->epoch++;  /* whatever a transaction read may have changed */
}

void rf_xsd_clear_values(rf_xsd *x)
{
    pthread_mutex_lock(&x->lock);
    free_values(x);
    pthread_mutex_unlock(&x->lock);
}

/* ---- connections ------------------------------------------------------------------------ */
static struct conn *lookup(rf_xsd *x, uint32_t id)
{
    uint32_t slot = id & (MAX_SLOTS - 1);
    if (slot >= x->nslots || !x->slots[slot] || x->slots[slot]->id != id)
        return NULL;
    return x->slots[slot];
}

static void watch_for(rf_xsd *x, struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u64 = c->id};
    epoll_ctl(x->epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Ask the engine thread to drop a connection: shutting the socket down wakes it. */
static void mark_closing(struct conn *c, int reason)
{
    if (!c->closing) {
        c->closing = reason + 1;
        shutdown(c->fd, SHUT_RDWR);
    }
}

/* Send what is queued; what the socket does not take waits for EPOLLOUT. Locked. */
static void send_queued(rf_xsd *x, struct conn *c)
{
    size_t sent = 0;
    while (sent < c->out.len && !c->closing) {
        ssize_t n = send(c->fd, c->out.data + sent, c->out.len - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            mark_closing(c, RF_XSD_CLOSED_EOF);
            break;
        }
    }
    memmove(c->out.data, c->out.data + sent, c->out.len - sent);
    c->out.len -= sent;
    if (c->out.len && !c->closing && !c->blocked) {
        c->blocked = 1;
        watch_for(x, c, EPOLLOUT);
    }
}

/* Queue output, locked. The engine thread sends when its batch is done; another thread
 * sends at once (a watch event caused by a guest's write). */
static int queue_output(rf_xsd *x, struct conn *c, const void *data, size_t len, int engine)
{
    if (c->closing)
        return 0;
    if (append(&c->out, data, len) || c->out.len > x->max_output) {
        x->stats.dropped_slow_clients++;
        c->out.len = 0;  /* the memory goes now, not when the engine notices */
        mark_closing(c, RF_XSD_CLOSED_SLOW);
        return 0;
    }
    if (c->blocked)
        return 0;
    if (!engine) {
        send_queued(x, c);
    } else if (!c->queued) {
        c->queued = 1;
        c->next_queued = x->queued;
        x->queued = c;
    }
    return 0;
}

int rf_xsd_send(rf_xsd *x, uint32_t id, const uint8_t *data, size_t len)
{
    int engine = x->started && pthread_equal(pthread_self(), x->thread);
    pthread_mutex_lock(&x->lock);
    struct conn *c = lookup(x, id);
    int rc = c ? queue_output(x, c, data, len, engine) : -ENOENT;
    pthread_mutex_unlock(&x->lock);
    return rc;
}

void rf_xsd_close(rf_xsd *x, uint32_t id)
{
    pthread_mutex_lock(&x->lock);
    struct conn *c = lookup(x, id);
    if (c)
        mark_closing(c, RF_XSD_CLOSED_BY_DAEMON);
    pthread_mutex_unlock(&x->lock);
}

/* Send every connection's queued output; `last` goes after the others (watchers hear of a
 * write before its writer hears it is done, as the Python daemon orders them). */
static void send_all_queued(rf_xsd *x, struct conn *last)
{
    pthread_mutex_lock(&x->lock);
    int last_queued = 0;
    while (x->queued) {
        struct conn *c = x->queued;
        x->queued = c->next_queued;
        c->queued = 0;
        if (c == last)
            last_queued = 1;
        else
            send_queued(x, c);
    }
    if (last_queued)
        send_queued(x, last);
    pthread_mutex_unlock(&x->lock);
}

static int watch_fires(const struct watch *w, const uint8_t *path, uint32_t len)
{
    /* as the daemon's rule: the path itself or one below it */
    return w->path_len <= len && !memcmp(w->bytes, path, w->path_len) &&
           (w->path_len == len || path[w->path_len] == '/');
}

/* Every watch a change of path fires is one the engine can serve, and its event fits. */
static int watches_servable(rf_xsd *x, const uint8_t *path, uint32_t len)
{
    for (struct watch *w = x->watches; w; w = w->next)
        if (watch_fires(w, path, len) && (!w->servable || len + w->token_len + 2 > PAYLOAD_MAX))
            return 0;
    return 1;
}

static void fire_watches(rf_xsd *x, const uint8_t *path, uint32_t len)
{
    uint8_t event[HEADER + PAYLOAD_MAX];
    for (struct watch *w = x->watches; w; w = w->next) {
        struct conn *to = watch_fires(w, path, len) ? lookup(x, w->conn) : NULL;
        if (!to)
            continue;
        uint32_t size = len + w->token_len + 2;
        uint32_t header[4] = {XS_WATCH_EVENT, 0, 0, size};
        memcpy(event, header, HEADER);
        memcpy(event + HEADER, path, len);
        event[HEADER + len] = 0;
        memcpy(event + HEADER + len + 1, w->bytes + w->path_len, w->token_len);
        event[HEADER + size - 1] = 0;
        queue_output(x, to, event, HEADER + size, 1);
        x->stats.watch_events++;
    }
}

static void reply(rf_xsd *x, struct conn *c, uint32_t type, const uint8_t *request,
                  const void *payload, uint32_t len)
{
    uint8_t out[HEADER + PAYLOAD_MAX];
    uint32_t header[4] = {type, get32(request + 4), get32(request + 8), len};
    memcpy(out, header, HEADER);
    memcpy(out + HEADER, payload, len);
    queue_output(x, c, out, HEADER + len, 1);
}

/* ---- the journal (xenbus/persistence.py's format) ------------------------------------------ */
static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const uint8_t *data, size_t len)
{
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++)
        c = crc_table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* One journal record, as the daemon frames them (u32 length, u32 CRC-32, then a marshal'd
 * tuple): ("S", path, value), a new value for a node that exists. */
static int journal_record(struct buf *b, const uint8_t *path, uint32_t plen, const uint8_t *val,
                          uint32_t vlen)
{
    uint32_t body = 2 + 3 + 5 + plen + 5 + vlen;
    if (reserve(b, 8 + (size_t)body))
        return -ENOMEM;
    uint8_t *at = b->data + b->len;
    uint8_t *m = at + 8;
    static const uint8_t head[5] = {')', 3, 'z', 1, 'S'};  /* a 3-tuple; the string "S" */
    memcpy(m, head, 5);
    m[5] = 'a';                            /* the path: an ASCII string */
    memcpy(m + 6, &plen, 4);
    memcpy(m + 10, path, plen);
    m[10 + plen] = 's';                    /* the value: bytes */
    memcpy(m + 11 + plen, &vlen, 4);
    memcpy(m + 15 + plen, val, vlen);
    uint32_t crc = crc32_of(m, body);
    memcpy(at, &body, 4);
    memcpy(at + 4, &crc, 4);
    b->len += 8 + body;
    return 0;
}

/* Write records to the journal before the reply that reports them: 0, or -1 (the daemon
 * then makes the change, and says what went wrong). Locked. */
static int journal_write(rf_xsd *x, struct buf *records, unsigned count)
{
    if (x->journal_fd < 0)
        return 0;
    size_t done = 0;
    while (done < records->len) {
        ssize_t n = write(x->journal_fd, records->data + done, records->len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;  /* a torn record is never acknowledged: loading stops at it */
        done += (size_t)n;
    }
    x->journaled += count;
    x->stats.journal_records += count;
    return 0;
}

void rf_xsd_set_journal(rf_xsd *x, int fd)
{
    pthread_mutex_lock(&x->lock);
    x->journal_fd = fd;
    pthread_mutex_unlock(&x->lock);
}

uint64_t rf_xsd_take_journaled(rf_xsd *x)
{
    pthread_mutex_lock(&x->lock);
    uint64_t n = x->journaled;
    x->journaled = 0;
    pthread_mutex_unlock(&x->lock);
    return n;
}

/* A path ended by its NUL with none inside: what the engine looks up as it is (the daemon
 * answers anything else, with its own errors). */
static int plain_path(const uint8_t *payload, uint32_t len)
{
    return len >= 2 && payload[len - 1] == 0 && !memchr(payload, 0, len - 1);
}

/* Make a write here and keep it for the daemon to replay; x->written has the room. Locked. */
static void keep_write(rf_xsd *x, const uint8_t *path, uint32_t plen, const uint8_t *val,
                       uint32_t vlen)
{
    uint32_t head[2] = {plen, vlen};
    append(&x->written, head, 8);
    append(&x->written, path, plen);
    append(&x->written, val, vlen);
    /* the record first: if the copy then fails, the node is missing here and the daemon,
     * which replays the record, answers for it */
    set_value(x, path, plen, val, vlen, 0);
}

/* dom0's plain read of a node that exists, from the copy of the values. */
static int answer_read(rf_xsd *x, struct conn *c, const uint8_t *m, uint32_t len)
{
    if (get32(m) != XS_READ || get32(m + 8) != 0 || !plain_path(m + HEADER, len))
        return 0;
    const uint8_t *path = m + HEADER;
    uint32_t plen = len - 1;
    pthread_mutex_lock(&x->lock);
    struct value *v = live_value(x, path, plen);
    int answered = v && v->value_len <= PAYLOAD_MAX;
    if (answered) {
        reply(x, c, XS_READ, m, v->bytes + v->path_len, v->value_len);
        x->stats.fast_reads++;
    }
    pthread_mutex_unlock(&x->lock);
    return answered;
}

/* dom0 writing an existing node outside a transaction, when the daemon is not inside the
 * tree: the value is changed here, the watches it fires are sent, and the write is kept for
 * the daemon to replay when it next enters the tree (rf_xsd_enter). Anything else (a new
 * node, a watch only the daemon can serve, a journal to keep) is the daemon's. */
static int answer_write(rf_xsd *x, struct conn *c, const uint8_t *m, uint32_t len)
{
    if (get32(m) != XS_WRITE || get32(m + 8) != 0)
        return 0;
    const uint8_t *path = m + HEADER;
    const uint8_t *nul = memchr(path, 0, len);
    if (!nul)
        return 0;
    uint32_t plen = (uint32_t)(nul - path), vlen = len - plen - 1;
    int answered = 0;
    pthread_mutex_lock(&x->lock);
    if (!x->fast_writes || x->daemon_busy || x->written.len > WRITTEN_MAX ||
        !live_value(x, path, plen) || !watches_servable(x, path, plen) ||
        reserve(&x->written, 8 + (size_t)plen + vlen))
        goto out;
    struct buf record = {0};
    int journaled = journal_record(&record, path, plen, nul + 1, vlen) == 0 &&
                    journal_write(x, &record, 1) == 0;
    free(record.data);
    if (!journaled)
        goto out;
    keep_write(x, path, plen, nul + 1, vlen);
    fire_watches(x, path, plen);
    reply(x, c, XS_WRITE, m, "OK", 3);
    x->stats.fast_writes++;
    answered = 1;
out:
    pthread_mutex_unlock(&x->lock);
    return answered;
}

int rf_xsd_watch(rf_xsd *x, uint32_t id, uint32_t conn, int servable, const uint8_t *path,
                 size_t path_len, const uint8_t *token, size_t token_len)
{
    struct watch *w = calloc(1, sizeof(*w));
    uint8_t *bytes = malloc(path_len + token_len + 1);
    if (!w || !bytes) {
        free(w);
        free(bytes);
        return -ENOMEM;
    }
    memcpy(bytes, path, path_len);
    memcpy(bytes + path_len, token, token_len);
    *w = (struct watch){.id = id, .conn = conn, .servable = servable, .bytes = bytes,
                        .path_len = (uint32_t)path_len, .token_len = (uint32_t)token_len};
    pthread_mutex_lock(&x->lock);
    struct watch **at = &x->watches;  /* at the end: events go out in registration order */
    while (*at)
        at = &(*at)->next;
    *at = w;
    pthread_mutex_unlock(&x->lock);
    return 0;
}

void rf_xsd_unwatch(rf_xsd *x, uint32_t id)
{
    pthread_mutex_lock(&x->lock);
    for (struct watch **at = &x->watches; *at; at = &(*at)->next)
        if ((*at)->id == id) {
            struct watch *w = *at;
            *at = w->next;
            free(w->bytes);
            free(w);
            break;
        }
    pthread_mutex_unlock(&x->lock);
}

void rf_xsd_set_fast_writes(rf_xsd *x, int on)
{
    pthread_mutex_lock(&x->lock);
    x->fast_writes = on;
    pthread_mutex_unlock(&x->lock);
}

long rf_xsd_enter(rf_xsd *x, uint8_t *out, size_t cap)
{
    pthread_mutex_lock(&x->lock);
    x->daemon_busy = 1;
    long len = (long)x->written.len;
    if (x->written.len <= cap) {
        memcpy(out, x->written.data, x->written.len);
        x->written.len = 0;
    } else {
        len = -len;
    }
    pthread_mutex_unlock(&x->lock);
    return len;
}

void rf_xsd_leave(rf_xsd *x)
{
    pthread_mutex_lock(&x->lock);
    x->daemon_busy = 0;
    pthread_mutex_unlock(&x->lock);
}

/* ---- transactions ------------------------------------------------------------------------ */
static struct tx *find_tx(rf_xsd *x, uint32_t conn, uint32_t id)
{
    for (struct tx *t = x->txs; t; t = t->next)
        if (t->id == id && t->conn == conn)
            return t;
    return NULL;
}

static void free_tx(rf_xsd *x, struct tx *t)
{
    for (struct tx **at = &x->txs; *at; at = &(*at)->next)
        if (*at == t) {
            *at = t->next;
            break;
        }
    free(t->log.data);
    free(t);
    if (--x->stats.transactions_open == 0)
        sweep_tombstones(x);
}

static int log_access(struct tx *t, const uint8_t *path, uint32_t plen, const uint8_t *val, uint32_t vlen,
                      int write)
{
    uint32_t head[2] = {plen, write ? vlen : TX_READ};
    size_t need = 8 + (size_t)plen + (write ? vlen : 0);
    if (t->log.len + need > TX_LOG_MAX || reserve(&t->log, need))
        return -ENOSPC;
    append(&t->log, head, 8);
    append(&t->log, path, plen);
    if (write)
        append(&t->log, val, vlen);
    return 0;
}

/* One record of a transaction's log; value is NULL for a read. */
struct access {
    const uint8_t *path, *value;
    uint32_t path_len, value_len;
};

/* The record at *off, moving *off past it: 0 at the end of the log. */
static int next_access(const struct tx *t, size_t *off, struct access *a)
{
    if (*off >= t->log.len)
        return 0;
    const uint8_t *at = t->log.data + *off;
    a->path_len = get32(at);
    a->value_len = get32(at + 4);
    a->path = at + 8;
    a->value = a->value_len == TX_READ ? NULL : a->path + a->path_len;
    *off += 8 + a->path_len + (a->value ? a->value_len : 0);
    return 1;
}

/* The value the transaction last wrote at path, if it did. */
static const uint8_t *own_write(const struct tx *t, const uint8_t *path, uint32_t len, uint32_t *value_len)
{
    const uint8_t *found = NULL;
    struct access a;
    for (size_t off = 0; next_access(t, &off, &a);)
        if (a.value && a.path_len == len && !memcmp(a.path, path, len)) {
            found = a.value;
            *value_len = a.value_len;
        }
    return found;
}

/* Nothing the transaction touched changed since it started (nor went). */
static int still_valid(rf_xsd *x, const struct tx *t)
{
    struct access a;
    for (size_t off = 0; next_access(t, &off, &a);) {
        struct value *v = *find_value(x, a.path, a.path_len, hash_path(a.path, a.path_len));
        if (!v || v->gone || v->changed_at > t->start)
            return 0;
    }
    return 1;
}

/* Whether the write ending at `end` is the transaction's first of its path. */
static int first_write_of(const struct tx *t, size_t end, const struct access *write)
{
    struct access a;
    size_t off = 0;
    while (next_access(t, &off, &a) && off < end)
        if (a.value && a.path_len == write->path_len && !memcmp(a.path, write->path, a.path_len))
            return 0;
    return 1;
}

/* Commit: the writes become the engine's (kept for the daemon to replay, as plain writes),
 * and each path written fires its watches once. 0: the daemon must do it. Locked. */
static int commit(rf_xsd *x, struct conn *c, struct tx *t, const uint8_t *m)
{
    struct access a;
    size_t replay = 0;
    for (size_t off = 0; next_access(t, &off, &a);)
        if (a.value) {
            if (!watches_servable(x, a.path, a.path_len))
                return 0;
            replay += 8 + (size_t)a.path_len + a.value_len;
        }
    if (reserve(&x->written, replay))
        return 0;
    if (x->journal_fd >= 0) {
        struct buf records = {0};
        unsigned count = 0;
        int ok = 1;
        for (size_t off = 0; ok && next_access(t, &off, &a);)
            if (a.value) {
                ok = journal_record(&records, a.path, a.path_len, a.value, a.value_len) == 0;
                count++;
            }
        ok = ok && journal_write(x, &records, count) == 0;
        free(records.data);
        if (!ok)
            return 0;
    }
    for (size_t off = 0; next_access(t, &off, &a);)
        if (a.value)
            keep_write(x, a.path, a.path_len, a.value, a.value_len);
    for (size_t off = 0; next_access(t, &off, &a);)
        if (a.value && first_write_of(t, off, &a))
            fire_watches(x, a.path, a.path_len);
    x->stats.transactions++;
    reply(x, c, XS_TRANSACTION_END, m, "OK", 3);
    return 1;
}

/* dom0's transactions, while they only read and write nodes that exist: see struct tx. */
static int answer_transaction(rf_xsd *x, struct conn *c, const uint8_t *m, uint32_t len)
{
    uint32_t type = get32(m), tx_id = get32(m + 8);
    const uint8_t *payload = m + HEADER;
    int answered = 0;
    pthread_mutex_lock(&x->lock);
    if (type == XS_TRANSACTION_START) {
        struct tx *t;
        if (tx_id || !x->fast_writes || x->stats.transactions_open >= TX_MAX || !(t = calloc(1, sizeof(*t))))
            goto out;
        do
            t->id = TX_ID_BIT | (x->next_tx++ & ~TX_ID_BIT);
        while (find_tx(x, c->id, t->id));
        t->conn = c->id;
        t->start = x->epoch;
        t->next = x->txs;
        x->txs = t;
        x->stats.transactions_open++;
        char id[16];
        int n = snprintf(id, sizeof(id), "%u", t->id);
        uint32_t header[4] = {XS_TRANSACTION_START, get32(m + 4), 0, (uint32_t)n + 1};
        uint8_t out[HEADER + 16];
        memcpy(out, header, HEADER);
        memcpy(out + HEADER, id, (size_t)n + 1);
        queue_output(x, c, out, HEADER + (size_t)n + 1, 1);
        answered = 1;
        goto out;
    }
    struct tx *t = (tx_id & TX_ID_BIT) ? find_tx(x, c->id, tx_id) : NULL;
    if (!t)
        goto out;
    if (type == XS_READ) {
        if (!plain_path(payload, len))
            goto out;
        uint32_t plen = len - 1, vlen = 0;
        const uint8_t *val = own_write(t, payload, plen, &vlen);
        if (!val) {
            struct value *v = live_value(x, payload, plen);
            if (!v || v->value_len > PAYLOAD_MAX || log_access(t, payload, plen, NULL, 0, 0))
                goto out;  /* an absent node's ENOENT or EINVAL is the daemon's to say */
            if (v->changed_at > t->start)
                t->doomed = 1;
            val = v->bytes + v->path_len;
            vlen = v->value_len;
        }
        reply(x, c, XS_READ, m, val, vlen);
        answered = 1;
    } else if (type == XS_WRITE) {
        const uint8_t *nul = memchr(payload, 0, len);
        if (!nul)
            goto out;
        uint32_t plen = (uint32_t)(nul - payload), vlen = len - plen - 1, ignored;
        struct value *v = live_value(x, payload, plen);
        if (!v && !own_write(t, payload, plen, &ignored))
            goto out;  /* a new node: the daemon's */
        if (log_access(t, payload, plen, nul + 1, vlen, 1))
            goto out;
        if (v && v->changed_at > t->start)
            t->doomed = 1;
        reply(x, c, XS_WRITE, m, "OK", 3);
        answered = 1;
    } else if (type == XS_TRANSACTION_END && len == 2 && (payload[0] == 'T' || payload[0] == 'F') &&
               payload[1] == 0) {
        if (payload[0] == 'F') {
            reply(x, c, XS_TRANSACTION_END, m, "OK", 3);
        } else if (t->doomed || !still_valid(x, t)) {
            x->stats.conflicts++;
            reply(x, c, XS_ERROR, m, "EAGAIN", 7);
        } else if (!x->fast_writes || x->daemon_busy || x->written.len > WRITTEN_MAX ||
                   !commit(x, c, t, m)) {
            goto out;  /* the daemon adopts it and commits */
        }
        free_tx(x, t);
        answered = 1;
    }
out:
    pthread_mutex_unlock(&x->lock);
    return answered;
}

long rf_xsd_adopt(rf_xsd *x, uint32_t conn, uint32_t tx_id, uint8_t *out, size_t cap, int *doomed)
{
    pthread_mutex_lock(&x->lock);
    struct tx *t = find_tx(x, conn, tx_id);
    long rc = -ENOENT;
    if (t && t->log.len > cap) {
        rc = -ENOSPC;
    } else if (t) {
        *doomed = t->doomed || !still_valid(x, t);
        memcpy(out, t->log.data, t->log.len);
        rc = (long)t->log.len;
        x->stats.adopted++;
        free_tx(x, t);
    }
    pthread_mutex_unlock(&x->lock);
    return rc;
}

/* Hand the daemon a run of messages, contiguous in c's input, in one callback (one trip
 * into Python and through its lock, not one per message: a toolstack's transaction is a
 * pipeline of some 40 requests the engine cannot answer). */
static void forward(rf_xsd *x, struct conn *c, const uint8_t *first, size_t len, unsigned count)
{
    if (!count)
        return;
    pthread_mutex_lock(&x->lock);
    x->stats.forwarded += count;
    pthread_mutex_unlock(&x->lock);
    rf_xsd_on_request(x->ctx, c->id, first, len);
}

/* Frame and serve the input buffered on c until it runs out or output backs up. Once one
 * message goes to the daemon, the rest of the run goes with it, answered or not: the
 * engine must not answer a read ahead of a write the daemon has not made yet. */
static void serve_input(rf_xsd *x, struct conn *c)
{
    unsigned since_send = 0, pending = 0;
    size_t pending_from = 0, pending_len = 0;
    for (;;) {
        size_t avail = c->in.len - c->in_off;
        if (avail < HEADER)
            break;
        const uint8_t *m = c->in.data + c->in_off;
        uint32_t len = get32(m + 12);
        if (len > PAYLOAD_MAX) {
            forward(x, c, c->in.data + pending_from, pending_len, pending);
            pending = 0;
            pthread_mutex_lock(&x->lock);
            x->stats.protocol_violations++;
            mark_closing(c, RF_XSD_CLOSED_VIOLATION);
            pthread_mutex_unlock(&x->lock);
            break;
        }
        if (avail < HEADER + (size_t)len)
            break;
        if (pending || (!answer_read(x, c, m, len) && !answer_write(x, c, m, len) &&
                        !answer_transaction(x, c, m, len))) {
            if (!pending++) {
                pending_from = c->in_off;
                pending_len = 0;
            }
            pending_len += HEADER + (size_t)len;
        }
        c->in_off += HEADER + (size_t)len;
        if (++since_send == REPLY_CHUNK) {
            forward(x, c, c->in.data + pending_from, pending_len, pending);
            pending = 0;
            since_send = 0;
            send_all_queued(x, c);
        }
        pthread_mutex_lock(&x->lock);
        int stop = c->blocked || c->closing;
        pthread_mutex_unlock(&x->lock);
        if (stop)
            break;
    }
    forward(x, c, c->in.data + pending_from, pending_len, pending);
    if (c->in_off == c->in.len)
        c->in.len = c->in_off = 0;
}

static void receive(rf_xsd *x, struct conn *c)
{
    if (c->in_off) {
        memmove(c->in.data, c->in.data + c->in_off, c->in.len - c->in_off);
        c->in.len -= c->in_off;
        c->in_off = 0;
    }
    if (reserve(&c->in, RECV_CHUNK)) {
        pthread_mutex_lock(&x->lock);
        mark_closing(c, RF_XSD_CLOSED_SLOW);
        pthread_mutex_unlock(&x->lock);
        return;
    }
    ssize_t n = recv(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        pthread_mutex_lock(&x->lock);
        mark_closing(c, RF_XSD_CLOSED_EOF);
        pthread_mutex_unlock(&x->lock);
        return;
    }
    c->in.len += (size_t)n;
    serve_input(x, c);
}

static void release(rf_xsd *x, struct conn *c)
{
    epoll_ctl(x->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in.data);
    free(c->out.data);
    free(c);
}

/* Drop a closing connection: engine thread, unlocked. */
static void reap(rf_xsd *x, struct conn *c)
{
    pthread_mutex_lock(&x->lock);
    int reason = c->closing - 1;
    x->slots[c->id & (MAX_SLOTS - 1)] = NULL;
    struct conn **at = &x->queued;  /* off the send list */
    for (; *at; at = &(*at)->next_queued)
        if (*at == c) {
            *at = c->next_queued;
            break;
        }
    x->stats.connections--;
    uint32_t id = c->id;
    for (struct tx *t = x->txs, *next; t; t = next) {
        next = t->next;
        if (t->conn == id)
            free_tx(x, t);
    }
    release(x, c);
    pthread_mutex_unlock(&x->lock);
    rf_xsd_on_close(x->ctx, id, reason);
}

static void accept_all(rf_xsd *x)
{
    for (;;) {
        int fd = accept4(x->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                epoll_ctl(x->epfd, EPOLL_CTL_DEL, x->listen_fd, NULL);
                x->accept_paused = 1;
            }
            return;
        }
        pthread_mutex_lock(&x->lock);
        uint32_t slot = 0;
        while (slot < x->nslots && x->slots[slot])
            slot++;
        if (slot == x->nslots && x->nslots < MAX_SLOTS) {
            uint32_t n = x->nslots ? x->nslots * 2 : 64;
            struct conn **slots = realloc(x->slots, n * sizeof(*slots));
            uint16_t *gens = slots ? realloc(x->generation, n * sizeof(*gens)) : NULL;
            if (slots)
                x->slots = slots;
            if (gens) {
                x->generation = gens;
                memset(slots + x->nslots, 0, (n - x->nslots) * sizeof(*slots));
                memset(gens + x->nslots, 0, (n - x->nslots) * sizeof(*gens));
                x->nslots = n;
            }
        }
        struct conn *c = slot < x->nslots ? calloc(1, sizeof(*c)) : NULL;
        if (!c) {
            pthread_mutex_unlock(&x->lock);
            close(fd);
            continue;
        }
        c->fd = fd;
        c->id = slot | ((uint32_t)(++x->generation[slot] & 0xFFF) << SLOT_BITS);
        x->slots[slot] = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = c->id};
        epoll_ctl(x->epfd, EPOLL_CTL_ADD, fd, &ev);
        x->stats.connections++;
        x->stats.connections_total++;
        uint32_t id = c->id;
        pthread_mutex_unlock(&x->lock);
        rf_xsd_on_open(x->ctx, id);
    }
}

static void *run(void *arg)
{
    rf_xsd *x = arg;
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(x->epfd, events, 64, x->accept_paused ? ACCEPT_PAUSE_MS : -1);
        if (n < 0 && errno != EINTR)
            break;
        if (x->accept_paused && n == 0) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_LISTEN};
            if (epoll_ctl(x->epfd, EPOLL_CTL_ADD, x->listen_fd, &ev) == 0)
                x->accept_paused = 0;
        }
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag == TAG_STOP)
                return NULL;
            if (tag == TAG_LISTEN) {
                accept_all(x);
                continue;
            }
            pthread_mutex_lock(&x->lock);
            struct conn *c = lookup(x, (uint32_t)tag);
            int resume = 0;
            if (c && (events[i].events & EPOLLOUT) && c->blocked) {
                c->blocked = 0;
                send_queued(x, c);
                if (!c->blocked) {
                    watch_for(x, c, EPOLLIN);
                    resume = 1;
                }
            }
            if (c && c->blocked && (events[i].events & (EPOLLHUP | EPOLLERR)))
                mark_closing(c, RF_XSD_CLOSED_EOF);  /* gone while we waited to send to it */
            int readable = c && !c->blocked && !c->closing &&
                           (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR));
            pthread_mutex_unlock(&x->lock);
            if (resume)
                serve_input(x, c);  /* what waited for the output to drain */
            if (readable)
                receive(x, c);
            if (c)
                send_all_queued(x, c);
            if (c && c->closing)  /* the flag is only ever set, never cleared */
                reap(x, c);
        }
        send_all_queued(x, NULL);
    }
    return NULL;
}

/* ---- life cycle ------------------------------------------------------------------------- */
rf_xsd *rf_xsd_new(int listen_fd, void *ctx, size_t max_output)
{
    rf_xsd *x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->listen_fd = listen_fd;
    x->journal_fd = -1;
    x->ctx = ctx;
    if (!crc_table[1])
        crc_init();
    x->max_output = max_output;
    x->table_size = 1024;
    x->table = calloc(x->table_size, sizeof(*x->table));
    x->epfd = epoll_create1(EPOLL_CLOEXEC);
    x->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&x->lock, NULL);
    struct epoll_event stop = {.events = EPOLLIN, .data.u64 = TAG_STOP};
    struct epoll_event listen = {.events = EPOLLIN, .data.u64 = TAG_LISTEN};
    if (!x->table || x->epfd < 0 || x->stopfd < 0 ||
        epoll_ctl(x->epfd, EPOLL_CTL_ADD, x->stopfd, &stop) ||
        epoll_ctl(x->epfd, EPOLL_CTL_ADD, listen_fd, &listen)) {
        int saved = errno;
        rf_xsd_free(x);
        errno = saved;
        return NULL;
    }
    return x;
}

int rf_xsd_start(rf_xsd *x)
{
    int rc = pthread_create(&x->thread, NULL, run, x);
    if (rc)
        return -rc;
    x->started = 1;
    return 0;
}

void rf_xsd_stop(rf_xsd *x)
{
    if (!x->started)
        return;
    uint64_t one = 1;
    (void)!write(x->stopfd, &one, sizeof(one));
    pthread_join(x->thread, NULL);
    x->started = 0;
    pthread_mutex_lock(&x->lock);
    for (uint32_t i = 0; i < x->nslots; i++)
        if (x->slots[i]) {
            release(x, x->slots[i]);
            x->slots[i] = NULL;
        }
    x->queued = NULL;
    x->stats.connections = 0;
    pthread_mutex_unlock(&x->lock);
}

void rf_xsd_free(rf_xsd *x)
{
    if (!x)
        return;
    rf_xsd_stop(x);
    if (x->table)
        free_values(x);
    while (x->watches) {
        struct watch *w = x->watches;
        x->watches = w->next;
        free(w->bytes);
        free(w);
    }
    free(x->written.data);
    while (x->txs)
        free_tx(x, x->txs);
    free(x->table);
    free(x->slots);
    free(x->generation);
    if (x->epfd >= 0)
        close(x->epfd);
    if (x->stopfd >= 0)
        close(x->stopfd);
    pthread_mutex_destroy(&x->lock);
    free(x);
}

void rf_xsd_statistics(rf_xsd *x, rf_xsd_stats *out)
{
    pthread_mutex_lock(&x->lock);
    *out = x->stats;
    pthread_mutex_unlock(&x->lock);
}
