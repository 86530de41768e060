/* Frame reassembly: see framing.h for the contract. */
#include <stdlib.h>
#include <string.h>

#include "framing.h"

#define FB_MIN_CAP 65536
#define FB_KEEP (256 * 1024)

sshrpc_framebuf *sshrpc_fb_new(void)
{
    sshrpc_framebuf *fb = calloc(1, sizeof *fb);
    return fb;
}

void sshrpc_fb_free(sshrpc_framebuf *fb)
{
    if (fb != NULL) {
        free(fb->data);
        free(fb);
    }
}

void sshrpc_fb_clear(sshrpc_framebuf *fb)
{
    fb->start = fb->end = 0;
    if (fb->cap > FB_KEEP) {
        /* One large frame should not pin its buffer for the channel's life. */
        free(fb->data);
        fb->data = NULL;
        fb->cap = 0;
    }
}

/* A frame up to this long whose header is in gets a buffer of exactly its
 * size at once (bulk, issue 10): no doubling copies on the way up, and no
 * block of twice its size (which glibc would map fresh, and fault in page
 * by page, for every frame).  The block is only reserved: its pages become
 * resident as the payload arrives.  Longer frames grow by doubling. */
#define FB_EXACT_MAX ((size_t)256 * 1024 * 1024)

/* Move the held bytes to the start of a fresh block of `total` bytes
 * (total >= held); 0, or -1 when out of memory (the buffer is unchanged). */
static int fb_move_to(sshrpc_framebuf *fb, size_t total)
{
    size_t held = fb->end - fb->start;
    unsigned char *grown = malloc(total);

    if (grown == NULL)
        return -1;
    if (held)
        memcpy(grown, fb->data + fb->start, held);
    free(fb->data);
    fb->data = grown;
    fb->cap = total;
    fb->start = 0;
    fb->end = held;
    return 0;
}

int sshrpc_fb_feed(sshrpc_framebuf *fb, const char *src, size_t n)
{
    size_t held, need, cap;

    if (n == 0)
        return 0;
    held = fb->end - fb->start;
    if (held == 0)
        fb->start = fb->end = 0;
    if (n <= fb->cap - fb->end) {
        memcpy(fb->data + fb->end, src, n);
        fb->end += n;
        return 0;
    }
    if (n > SIZE_MAX - held)
        return -1;
    need = held + n;
    if (need <= fb->cap / 2) {
        /* Enough room once the unread tail moves to the front; moving only
         * when at most half is in use keeps the copying amortised linear. */
        memmove(fb->data, fb->data + fb->start, held);
    } else {
        cap = fb->cap < FB_MIN_CAP ? FB_MIN_CAP : fb->cap;
        while (cap < 2 * need) {
            if (cap > SIZE_MAX / 2)
                return -1;
            cap *= 2;
        }
        if (fb_move_to(fb, cap) < 0)
            return -1;
    }
    fb->start = 0;
    fb->end = held;
    memcpy(fb->data + fb->end, src, n);
    fb->end += n;
    return 0;
}

static uint32_t read_length(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

size_t sshrpc_fb_fill(sshrpc_framebuf *fb, const char *src, size_t pos, size_t n,
                      uint32_t max_frame, size_t *missing)
{
    size_t taken = 0, held, need, take;
    uint32_t length;

    for (;;) {
        held = fb->end - fb->start;
        if (held < 4) {
            need = 4 - held;
        } else {
            length = read_length(fb->data + fb->start);
            if (length > max_frame || held >= 4 + (size_t)length) {
                *missing = 0;
                return taken;
            }
            need = 4 + (size_t)length - held;
            if (pos < n && need > fb->cap - fb->end && 4 + (size_t)length <= FB_EXACT_MAX
                && 4 + (size_t)length > FB_MIN_CAP
                && fb_move_to(fb, 4 + (size_t)length) != 0)
                return (size_t)-1;
        }
        if (pos >= n) {
            *missing = need;
            return taken;
        }
        take = n - pos < need ? n - pos : need;
        if (sshrpc_fb_feed(fb, src + pos, take) != 0)
            return (size_t)-1;
        pos += take;
        taken += take;
    }
}

size_t sshrpc_frames_scan(const char *data, size_t pos, size_t n, uint32_t max_frame,
                          size_t *spans, size_t max_spans, size_t *consumed, size_t *too_large)
{
    const unsigned char *p = (const unsigned char *)data;
    size_t count = 0;
    uint32_t length;

    *too_large = 0;
    if (pos > n)
        pos = n;
    while (count < max_spans && n - pos >= 4) {
        length = read_length(p + pos);
        if (length > max_frame) {
            *too_large = length;
            break;
        }
        if (n - pos - 4 < length)
            break;
        if (length != 0) {
            spans[2 * count] = pos + 4;
            spans[2 * count + 1] = length;
            count++;
        }
        pos += 4 + (size_t)length;
    }
    *consumed = pos;
    return count;
}

size_t sshrpc_fb_scan(sshrpc_framebuf *fb, uint32_t max_frame, size_t *spans, size_t max_spans,
                      size_t *too_large)
{
    const unsigned char *data = fb->data;
    size_t pos = fb->start, end = fb->end, count = 0;
    uint32_t length;

    *too_large = 0;
    while (count < max_spans && end - pos >= 4) {
        length = read_length(data + pos);
        if (length > max_frame) {
            *too_large = length;
            break;
        }
        if (end - pos - 4 < length)
            break;
        if (length != 0) {
            spans[2 * count] = pos + 4;
            spans[2 * count + 1] = length;
            count++;
        }
        pos += 4 + (size_t)length;
    }
    fb->start = pos;
    return count;
}
