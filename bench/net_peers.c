/* The C programs of `ringfence bench net`, one binary, the mode first:
 *
 *   tapwrite SECONDS            64-byte UDP frames written straight into a TAP (the small-packet
 *                               peer): prints frames/s.
 *   udpsend ADDR PORT SECONDS RATE
 *                               64-byte UDP datagrams to ADDR:PORT at RATE a second (0: as fast
 *                               as possible), 32 a system call: prints how many were sent.
 *   udprecv PORT                prints "ready", then counts datagrams until a second passes
 *                               without one (5 before the first): prints "PACKETS SECONDS" (from
 *                               the first to the last).
 *   relay NS_A NS_BRIDGE NS_B   the floor of any design with TAPs on both sides: a TAP eth0 in
 *                               NS_A and in NS_B, TAPs vifa and vifb in NS_BRIDGE, and two threads
 *                               that move frames eth0(A) <-> vifa and vifb <-> eth0(B) with one
 *                               read and one write each, offloads on (64 KB GSO frames), no ring,
 *                               no work of their own. Prints "ready", then serves until killed.
 *
 * The generator is paced and batched because a sender that is faster than the path it feeds
 * spends the CPUs the path needs on packets the first queue drops: the rate measured is then
 * the sender's, not the path's. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int open_tap(const char *name, short flags)
{
    int fd = open("/dev/net/tun", O_RDWR);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = (short)(IFF_TAP | IFF_NO_PI | flags);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr) < 0)
        die(name);
    return fd;
}

static int tap_write(double seconds)
{
    int fd = open_tap("rfbench0", 0);
    int s = socket(AF_INET, SOCK_DGRAM, 0);  /* a TAP that is down refuses writes */
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "rfbench0");
    ioctl(s, SIOCGIFFLAGS, &ifr);
    ifr.ifr_flags |= IFF_UP;
    ioctl(s, SIOCSIFFLAGS, &ifr);
    unsigned char frame[64 + 42];
    memset(frame, 0, sizeof frame);
    memset(frame, 0xff, 6);
    memset(frame + 6, 2, 6);
    frame[12] = 0x08;
    double start = now(), elapsed;
    long n = 0;
    do {
        for (int i = 0; i < 10000; i++)
            if (write(fd, frame, sizeof frame) > 0)
                n++;
        elapsed = now() - start;
    } while (elapsed < seconds);
    printf("%.0f\n", (double)n / elapsed);
    return 0;
}

static int udp_send(const char *address, int port, double seconds, double rate)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, address, &to.sin_addr) != 1 || connect(s, (void *)&to, sizeof to) < 0)
        die("udpsend");
    static char payload[64];
    struct iovec iov = {payload, sizeof payload};
    struct mmsghdr messages[BATCH];
    memset(messages, 0, sizeof messages);
    for (int i = 0; i < BATCH; i++) {
        messages[i].msg_hdr.msg_iov = &iov;
        messages[i].msg_hdr.msg_iovlen = 1;
    }
    double start = now(), t;
    long sent = 0;
    while ((t = now()) - start < seconds) {
        if (rate > 0 && (double)sent > (t - start) * rate) {
            struct timespec pause = {0, 20000};
            nanosleep(&pause, NULL);
            continue;
        }
        int n = sendmmsg(s, messages, BATCH, 0);
        if (n > 0)
            sent += n;
    }
    printf("%ld\n", sent);
    return 0;
}

static int udp_recv(int port)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int size = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (bind(s, (void *)&at, sizeof at) < 0)
        die("udprecv");
    static char buffers[BATCH][128];
    struct iovec iov[BATCH];
    struct mmsghdr messages[BATCH];
    memset(messages, 0, sizeof messages);
    for (int i = 0; i < BATCH; i++) {
        iov[i] = (struct iovec){buffers[i], sizeof buffers[i]};
        messages[i].msg_hdr.msg_iov = &iov[i];
        messages[i].msg_hdr.msg_iovlen = 1;
    }
    printf("ready\n");
    fflush(stdout);
    struct timeval first_wait = {5, 0}, quiet = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &first_wait, sizeof first_wait);
    long received = 0;
    double first = 0, last = 0;
    for (;;) {
        int n = recvmmsg(s, messages, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0)
            break;
        if (!received) {  /* from the first datagram on, a second of silence ends it */
            first = now();
            setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &quiet, sizeof quiet);
        }
        received += n;
        last = now();
    }
    printf("%ld %.6f\n", received, last - first);
    return 0;
}

struct relay_pair {
    int a, b;
};

static int relay_tap(const char *netns, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/run/netns/%s", netns);
    int ns = open(path, O_RDONLY);
    if (ns < 0 || setns(ns, CLONE_NEWNET) < 0)
        die(path);
    close(ns);
    int fd = open_tap(name, IFF_VNET_HDR);
    if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) < 0)
        die("TUNSETOFFLOAD");
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

static void *relay(void *arg)
{
    const struct relay_pair *pair = arg;
    static __thread char frame[65536 + 64];
    struct pollfd fds[2] = {{pair->a, POLLIN, 0}, {pair->b, POLLIN, 0}};
    for (;;) {
        poll(fds, 2, -1);
        for (int i = 0; i < 2; i++) {
            int from = i ? pair->b : pair->a, to = i ? pair->a : pair->b;
            ssize_t n;
            while ((n = read(from, frame, sizeof frame)) > 0)
                if (write(to, frame, (size_t)n) < 0)
                    continue;  /* dropped, as a full queue would */
        }
    }
    return NULL;
}

static int tap_relay(const char *ns_a, const char *ns_bridge, const char *ns_b)
{
    static struct relay_pair side_a, side_b;
    side_a = (struct relay_pair){relay_tap(ns_a, "eth0"), relay_tap(ns_bridge, "vifa")};
    side_b = (struct relay_pair){relay_tap(ns_bridge, "vifb"), relay_tap(ns_b, "eth0")};
    printf("ready\n");
    fflush(stdout);
    pthread_t thread;
    pthread_create(&thread, NULL, relay, &side_a);
    relay(&side_b);
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "tapwrite") && argc == 3)
        return tap_write(atof(argv[2]));
    if (!strcmp(mode, "udpsend") && argc == 6)
        return udp_send(argv[2], atoi(argv[3]), atof(argv[4]), atof(argv[5]));
    if (!strcmp(mode, "udprecv") && argc == 3)
        return udp_recv(atoi(argv[2]));
    if (!strcmp(mode, "relay") && argc == 5)
        return tap_relay(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: net_peers tapwrite SECONDS | udpsend ADDR PORT SECONDS RATE | "
                    "udprecv PORT | relay NS_A NS_BRIDGE NS_B\n");
    return 2;
}
