/* Erlang External Term Format transcoders (csrc/README.md).  The text
 * between the cdef markers is also the cffi declaration, so it stays plain C
 * declarations that cffi can parse.
 *
 * decode: ETF bytes -> a pickle protocol 5 stream that CPython's C unpickler
 *         turns into objects (sshrpc._codec documents the memo layout).
 * encode: a pickle protocol 5 stream (from pickle.dumps) -> ETF bytes.
 * Both are iterative (no recursion on the C stack), bounds-check every read
 * and allocate only in proportion to bytes already read or written. */
#ifndef SSHRPC_ETF_H
#define SSHRPC_ETF_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define SSHRPC_C_VERSION 10
int sshrpc_c_version(void);

/* Memo indices the decoder's pickle stream relies on; the Python side puts
 * these callables there once per unpickler. */
#define SSHRPC_M_IMPROPER 0
#define SSHRPC_M_ATOM 1
#define SSHRPC_M_MAP 2
#define SSHRPC_M_BITSTRING 3
#define SSHRPC_M_PID 4
#define SSHRPC_M_PORT 5
#define SSHRPC_M_REFERENCE 6
#define SSHRPC_M_FUN 7
#define SSHRPC_M_EXPORT 8
#define SSHRPC_M_SFLOAT 9
#define SSHRPC_M_INTS 10
#define SSHRPC_M_FLOATS 11
#define SSHRPC_M_BYTELIST 12
#define SSHRPC_M_FIRST_ATOM 16

typedef struct {
    uint8_t *out;          /* the stream (decode) or the term (encode) */
    size_t out_len;
    size_t n_oob;          /* decode: out-of-band binaries, as pairs */
    uint64_t *oob;         /* (offset, length) into the input */
    size_t n_floats;       /* decode: offsets of string floats (tag 99) */
    uint64_t *floats;
    int64_t err_offset;    /* decode: the byte offset of the error */
    char err[256];         /* the error message, without the offset */
    uint64_t cost;         /* decode: the term's cost (sshrpc._etf.TERM_COST) */
    void *priv;
} sshrpc_io;

sshrpc_io *sshrpc_io_new(uint32_t atom_cache);
void sshrpc_io_free(sshrpc_io *io);

/* ETF (version byte included) -> pickle stream written to out[0, cap).
 * Returns 4 * (stream length) + (2 if io->n_floats string floats need
 * checking) + (1 if io->n_oob binaries go out of band); when it fails,
 * io->floats still lists the string floats read before the error;
 * -1 for a malformed term (io->err, io->err_offset), -2 for out of memory,
 * -3 when cap is too small (call again with a larger buffer).  Every tag
 * read as a term costs its TERM_COST; more than max_cost in all is an error
 * at the tag that went over (the decode budget, as in sshrpc._etf). */
int64_t sshrpc_etf_to_pickle(sshrpc_io *io, const char *data, size_t len,
                             uint64_t max_depth, uint64_t max_big, uint64_t max_cost,
                             size_t oob_min, char *out, size_t cap);

/* Forget every cached atom (after the unpickler's memo was lost). */
void sshrpc_dec_forget_atoms(sshrpc_io *io);

/* pickle stream -> ETF, after `reserve` bytes whose last four (when
 * reserve >= 4) are set to the term's length, big-endian.  Written to
 * out[0, cap) while it fits, else to io->out (see sshrpc_io_out).  Returns
 * 4 * length + 2 * (binaries left in the stream: io->n_oob triples in
 * io->oob, output offset, stream offset, length, to be joined in) + (1 if
 * the result is in io->out); -1 when the stream holds something the
 * transcoder does not handle (the caller falls back to the reference
 * encoder, which raises the right error); -2 for out of memory. */
int64_t sshrpc_pickle_to_etf(sshrpc_io *io, const char *data, size_t len,
                             uint64_t max_depth, size_t reserve, char *out, size_t cap);
const char *sshrpc_io_out(sshrpc_io *io);

/* Parse a pickle stream whose memo the pickler keeps for every later stream
 * (it names the sshrpc classes, so their globals are looked up once); the
 * stream must stay alive as long as io.  Returns 0 or -1. */
int sshrpc_enc_preamble(sshrpc_io *io, const char *data, size_t len);
/* cdef-end */

#endif
