#include "ringdrive.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* n copies of one message, for putting a batch in one call */
static uint8_t *copies(const void *message, uint32_t size, uint32_t n)
{
    uint8_t *out = malloc((size_t)size * n);
    for (uint32_t i = 0; out && i < n; i++)
        memcpy(out + (size_t)i * size, message, size);
    return out;
}

long long rf_drive_front(rf_ring *r, const void *request, uint64_t count, uint32_t depth,
                         int notify_fd, int wait_fd, long long spin_ns)
{
    if (!depth || depth > r->nr_ents)
        return -EINVAL;
    uint8_t *requests = copies(request, r->req_size, depth);
    uint8_t *responses = malloc((size_t)r->rsp_size * r->nr_ents);
    uint64_t sent = 0, done = 0;
    long long result = requests && responses ? 0 : -ENOMEM;
    while (!result && done < count) {
        uint64_t room = depth - (sent - done);
        if (room > count - sent)
            room = count - sent;
        sent += room;
        int n = rf_front_exchange(r, requests, (uint32_t)room, responses, notify_fd, wait_fd,
                                  spin_ns, depth > 1 ? depth / 2 : 1);
        if (n < 0)
            result = n;
        done += n > 0 ? (uint64_t)n : 0;
    }
    free(requests);
    free(responses);
    return result ? result : (long long)done;
}

long long rf_drive_back(rf_ring *r, const void *response, uint8_t stop_byte, uint32_t budget,
                        int notify_fd, int wait_fd, long long spin_ns)
{
    uint8_t *responses = copies(response, r->rsp_size, r->nr_ents);
    uint8_t *requests = malloc((size_t)r->req_size * r->nr_ents);
    long long answered = 0, result = requests && responses ? 0 : -ENOMEM;
    int n = 0;
    while (!result) {
        n = rf_back_exchange(r, responses, (uint32_t)n, requests, notify_fd, wait_fd, spin_ns, budget);
        if (n < 0) {
            result = n;
        } else if (n > 0) {
            answered += n;
            if (requests[(size_t)(n - 1) * r->req_size] == stop_byte) {
                rf_back_respond(r, responses, (uint32_t)n, notify_fd);
                break;
            }
        }
    }
    free(requests);
    free(responses);
    return result ? result : answered;
}
