/* Frame reassembly (PROTOCOL.md section 2; csrc/README.md).  The text
 * between the cdef markers is also the cffi declaration.
 *
 * A frame is a 4-byte big-endian length and that many payload bytes; length
 * 0 is a keepalive.  sshrpc_fb_feed appends a channel read to one growable
 * buffer; sshrpc_fb_scan walks the complete frames at its front and reports
 * them as (offset, length) pairs, so Python copies each payload out once.
 * Each byte is appended once and moved at most once more (when the unread
 * tail, always less than one frame, is compacted to the front), so 1-byte
 * reads and many-frames-per-read are both linear. */
#ifndef SSHRPC_FRAMING_H
#define SSHRPC_FRAMING_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
typedef struct {
    unsigned char *data;
    size_t cap;   /* bytes allocated at data */
    size_t start; /* first unread byte */
    size_t end;   /* one past the last buffered byte */
} sshrpc_framebuf;

/* A new empty buffer, or NULL when out of memory. */
sshrpc_framebuf *sshrpc_fb_new(void);
void sshrpc_fb_free(sshrpc_framebuf *fb);
/* Append n bytes.  0 on success, -1 when out of memory (nothing appended). */
int sshrpc_fb_feed(sshrpc_framebuf *fb, const unsigned char *src, size_t n);
/* Report up to max_spans complete frames at the front of the buffer, in
 * order, as spans[2i] = payload offset into fb->data, spans[2i+1] = length,
 * skipping keepalives, and advance fb->start past them.  The spans stay valid
 * until the next feed.  Returns the number of spans.  Stops early, with
 * *too_large set to the frame's length, at a frame longer than max_frame
 * (fb->start then points at its header); *too_large is 0 otherwise. */
size_t sshrpc_fb_scan(sshrpc_framebuf *fb, uint32_t max_frame, size_t *spans, size_t max_spans,
                      uint32_t *too_large);
/* Discard everything buffered. */
void sshrpc_fb_clear(sshrpc_framebuf *fb);
/* cdef-end */

#endif
