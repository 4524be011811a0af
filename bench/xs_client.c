/* The client `ringfence bench xenstore` drives both daemons with: xs_wire over the dom0 Unix
 * socket, written in C so that what is measured is the daemon, not the client (a Python
 * client spends ~170 us of its own per round trip on these machines, and either daemon
 * answers well within that).
 *
 *   xs_client SOCKET read COUNT       one read at a time: prints microseconds per read
 *   xs_client SOCKET pipelined COUNT  64 reads in flight: prints reads per second
 *   xs_client SOCKET tx COUNT         start, read, write, commit (again on EAGAIN): tx/s
 *   xs_client SOCKET watch COUNT      a write on one connection, its event on another: us
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { READ = 2, WATCH = 4, TX_START = 6, TX_END = 7, WRITE = 11, WATCH_EVENT = 15, ERROR = 16 };
#define DEPTH 64

struct conn {
    int fd;
    uint8_t buf[1 << 16];
    size_t len;
};

struct msg {
    uint32_t type, req_id, tx_id, len;
    char payload[4097];
};

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void dial(struct conn *c, const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    c->len = 0;
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof(addr)))
        die("connect");
}

static void send_msg(struct conn *c, uint32_t type, uint32_t req_id, uint32_t tx_id,
                     const void *payload, uint32_t len)
{
    uint8_t out[16 + 4096];
    uint32_t header[4] = {type, req_id, tx_id, len};
    memcpy(out, header, 16);
    memcpy(out + 16, payload, len);
    for (size_t sent = 0; sent < 16 + len;) {
        ssize_t n = send(c->fd, out + sent, 16 + len - sent, 0);
        if (n < 0 && errno != EINTR)
            die("send");
        if (n > 0)
            sent += (size_t)n;
    }
}

static void recv_msg(struct conn *c, struct msg *m)
{
    for (;;) {
        if (c->len >= 16) {
            uint32_t header[4];
            memcpy(header, c->buf, 16);
            if (header[3] > 4096) {
                fprintf(stderr, "reply of %u bytes\n", header[3]);
                exit(1);
            }
            if (c->len >= 16 + header[3]) {
                m->type = header[0];
                m->req_id = header[1];
                m->tx_id = header[2];
                m->len = header[3];
                memcpy(m->payload, c->buf + 16, m->len);
                m->payload[m->len] = 0;
                memmove(c->buf, c->buf + 16 + m->len, c->len - 16 - m->len);
                c->len -= 16 + m->len;
                return;
            }
        }
        ssize_t n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            die("recv");
        }
        c->len += (size_t)n;
    }
}

/* One request, its reply (watch events on the way are skipped). */
static void call(struct conn *c, uint32_t type, uint32_t tx_id, const void *payload, uint32_t len,
                 struct msg *reply)
{
    static uint32_t req_id;
    send_msg(c, type, ++req_id, tx_id, payload, len);
    do
        recv_msg(c, reply);
    while (reply->type == WATCH_EVENT);
}

static void write_node(struct conn *c, uint32_t tx_id, const char *path, const char *value,
                       struct msg *reply)
{
    char payload[4096];
    size_t plen = strlen(path) + 1, vlen = strlen(value);
    memcpy(payload, path, plen);
    memcpy(payload + plen, value, vlen);
    call(c, WRITE, tx_id, payload, (uint32_t)(plen + vlen), reply);
    if (reply->type == ERROR && strcmp(reply->payload, "EAGAIN")) {
        fprintf(stderr, "write %s: %s\n", path, reply->payload);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: xs_client SOCKET read|pipelined|tx|watch COUNT\n");
        return 2;
    }
    const char *mode = argv[2];
    long count = atol(argv[3]);
    struct conn *c = malloc(sizeof(*c)), *other = malloc(sizeof(*other));
    struct msg reply;
    dial(c, argv[1]);
    static const char key[] = "/bench/key";
    write_node(c, 0, key, "value", &reply);
    double started = now();
    if (!strcmp(mode, "read")) {
        for (long i = 0; i < count; i++)
            call(c, READ, 0, key, sizeof(key), &reply);
        printf("%.3f\n", (now() - started) / count * 1e6);
    } else if (!strcmp(mode, "pipelined")) {
        long sent = 0, received = 0;
        for (; sent < DEPTH && sent < count; sent++)
            send_msg(c, READ, (uint32_t)sent, 0, key, sizeof(key));
        while (received < count) {
            recv_msg(c, &reply);
            received++;
            if (sent < count)
                send_msg(c, READ, (uint32_t)sent++, 0, key, sizeof(key));
        }
        printf("%.1f\n", count / (now() - started));
    } else if (!strcmp(mode, "tx")) {
        static const char counter[] = "/bench/counter";
        write_node(c, 0, counter, "0", &reply);
        started = now();
        for (long i = 0; i < count;) {
            call(c, TX_START, 0, "", 1, &reply);
            uint32_t tx = (uint32_t)strtoul(reply.payload, NULL, 10);
            call(c, READ, tx, counter, sizeof(counter), &reply);
            char value[32];
            snprintf(value, sizeof(value), "%ld", atol(reply.payload) + 1);
            write_node(c, tx, counter, value, &reply);
            call(c, TX_END, tx, "T", 2, &reply);
            if (reply.type != ERROR)
                i++;
        }
        printf("%.1f\n", count / (now() - started));
    } else if (!strcmp(mode, "watch")) {
        static const char watched[] = "/bench/w/x";
        write_node(c, 0, watched, "0", &reply);
        dial(other, argv[1]);
        send_msg(other, WATCH, 1, 0, "/bench/w\0t", 11);
        recv_msg(other, &reply);  /* the reply and the initial event, in either order */
        recv_msg(other, &reply);
        double total = 0;
        for (long i = 0; i < count; i++) {
            char value[32];
            snprintf(value, sizeof(value), "%ld", i);
            double t = now();
            write_node(c, 0, watched, value, &reply);
            recv_msg(other, &reply);
            total += now() - t;
            if (reply.type != WATCH_EVENT) {
                fprintf(stderr, "expected a watch event, got type %u\n", reply.type);
                return 1;
            }
        }
        printf("%.3f\n", total / count * 1e6);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}
