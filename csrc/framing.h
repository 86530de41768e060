/* Frame reassembly (PROTOCOL.md section 2; src/sshrpc/_framing.py has the
 * theory of operation).  The text between the cdef markers is also the cffi
 * declaration.
 *
 * A frame is a 4-byte big-endian length and that many payload bytes; length
 * 0 is a keepalive.  Two tools: sshrpc_frames_scan finds the complete frames
 * of a channel read in place (no copy); the buffer (sshrpc_framebuf) holds
 * the one frame that straddles reads, filled with exactly the bytes it still
 * needs, so every byte is copied into it at most once, whatever the read
 * sizes. */
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
int sshrpc_fb_feed(sshrpc_framebuf *fb, const char *src, size_t n);
/* Append from src[pos..n) only the bytes the frame at the front of the
 * buffer still needs: its header, then, if its length is at most max_frame,
 * its payload.  Returns the number of bytes taken, or (size_t)-1 when out of
 * memory; *missing is set to the bytes still needed after that (0 once the
 * frame is complete or its length is above max_frame). */
size_t sshrpc_fb_fill(sshrpc_framebuf *fb, const char *src, size_t pos, size_t n,
                      uint32_t max_frame, size_t *missing);
/* Find the complete frames of data[pos..n) in place: up to max_spans
 * (offset, length) pairs into spans, offsets from data, keepalives skipped.
 * *consumed is the offset just past the last frame walked (keepalives
 * included).  Stops early at a frame longer than max_frame, with *too_large
 * set to its length and *consumed at its header; *too_large is 0 otherwise. */
size_t sshrpc_frames_scan(const char *data, size_t pos, size_t n, uint32_t max_frame,
                          size_t *spans, size_t max_spans, size_t *consumed, size_t *too_large);
/* Report up to max_spans complete frames at the front of the buffer, in
 * order, as spans[2i] = payload offset into fb->data, spans[2i+1] = length,
 * skipping keepalives, and advance fb->start past them.  The spans stay valid
 * until the next feed.  Returns the number of spans.  Stops early, with
 * *too_large set to the frame's length, at a frame longer than max_frame
 * (fb->start then points at its header); *too_large is 0 otherwise. */
size_t sshrpc_fb_scan(sshrpc_framebuf *fb, uint32_t max_frame, size_t *spans, size_t max_spans,
                      size_t *too_large);
/* Discard everything buffered (and release a buffer grown past 256 KiB). */
void sshrpc_fb_clear(sshrpc_framebuf *fb);
/* cdef-end */

#endif
