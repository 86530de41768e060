/* ETF <-> pickle protocol 5 transcoders; design and measurements in
 * csrc/README.md.  Every read is bounds-checked, every loop is iterative with
 * an explicit, heap-allocated stack, and every allocation is proportional to
 * input already read or output already written. */
#include "etf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sshrpc_c_version(void) { return SSHRPC_C_VERSION; }

/* ------------------------------------------------------------------------
 * Shared state */

typedef struct {
    uint64_t hash;
    uint32_t name_off;
    uint32_t idx;   /* memo index; 0 marks an empty slot */
    uint16_t name_len;
} atom_slot;

typedef struct dframe dframe;
typedef struct enode enode;

typedef struct {
    size_t out_cap;
    size_t oob_cap;
    /* decoder atom cache: UTF-8 name -> memo index of the Atom object */
    uint32_t cache_cap, n_atoms, table_mask;
    atom_slot *table;
    uint8_t *arena;
    size_t arena_len, arena_cap;
    uint32_t *pending;
    size_t n_pending;
    dframe *stack;
    size_t stack_cap;
    /* encoder tape */
    enode *nodes;
    size_t nodes_cap;
    uint32_t *memo;
    size_t memo_cap;
    uint32_t *vstack;
    size_t vstack_cap;
    size_t *marks;
    size_t marks_cap;
    void *cells;
    size_t cells_cap;
    size_t pre_nodes, pre_cells, pre_memo; /* the encoder preamble's tape */
    size_t floats_cap;
    void *estack;
    size_t estack_cap;
} priv_t;

#define PRIV(io) ((priv_t *)(io)->priv)

static int grow_slow(void **ptr, size_t *cap, size_t need, size_t elem);

static inline int grow(void **ptr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    return grow_slow(ptr, cap, need, elem);
}

static int grow_slow(void **ptr, size_t *cap, size_t need, size_t elem) {
    size_t n = *cap ? *cap : 16;
    while (n < need) {
        if (n > ((size_t)-1) / 4 / elem) return -1;
        n *= 2;
    }
    void *p = realloc(*ptr, n * elem);
    if (!p) return -1;
    *ptr = p;
    *cap = n;
    return 0;
}

sshrpc_io *sshrpc_io_new(uint32_t atom_cache) {
    sshrpc_io *io = calloc(1, sizeof(sshrpc_io));
    priv_t *pv = calloc(1, sizeof(priv_t));
    if (!io || !pv) goto fail;
    io->priv = pv;
    if (atom_cache) {
        uint32_t size = 16;
        while (size < 2 * atom_cache) size *= 2;
        pv->table = calloc(size, sizeof(atom_slot));
        pv->pending = malloc(sizeof(uint32_t) * atom_cache);
        if (!pv->table || !pv->pending) goto fail;
        pv->cache_cap = atom_cache;
        pv->table_mask = size - 1;
    }
    return io;
fail:
    if (pv) {
        free(pv->table);
        free(pv->pending);
    }
    free(pv);
    free(io);
    return NULL;
}

void sshrpc_io_free(sshrpc_io *io) {
    if (!io) return;
    priv_t *pv = PRIV(io);
    free(io->out);
    free(io->oob);
    free(io->floats);
    free(pv->table);
    free(pv->arena);
    free(pv->pending);
    free(pv->stack);
    free(pv->nodes);
    free(pv->memo);
    free(pv->vstack);
    free(pv->marks);
    free(pv->cells);
    free(pv->estack);
    free(pv);
    free(io);
}

void sshrpc_dec_forget_atoms(sshrpc_io *io) {
    priv_t *pv = PRIV(io);
    if (pv->table) memset(pv->table, 0, sizeof(atom_slot) * (pv->table_mask + 1));
    pv->n_atoms = 0;
    pv->arena_len = 0;
    pv->n_pending = 0;
}

static uint64_t fnv(uint64_t h, const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ULL;
    return h;
}
#define FNV0 0xcbf29ce484222325ULL

/* ------------------------------------------------------------------------
 * Decoding: ETF -> pickle */

enum { F_TUPLE, F_LIST, F_MAP, F_PASS, F_FUN, F_FUNPID };
enum { P_ITEMS, P_TAIL, P_KEY, P_VALUE };

struct dframe {
    uint8_t kind, phase, fallback;
    uint64_t rem, arity, depth; /* depth: of this frame's children */
    size_t ph;                  /* placeholder offset in the output */
    size_t start, out_mark, oob_mark;
    uint64_t *keys;
    uint32_t keys_mask, n_keys;
};

typedef struct {
    sshrpc_io *io;
    priv_t *pv;
    const uint8_t *data;
    size_t len;
    uint64_t max_depth, max_big, max_cost, cost;
    size_t oob_min;
    int skip;
    int oom;
    int too_small;
    int fixed; /* io->out is the caller's buffer of out_cap bytes */
    size_t fixed_cap;
    dframe *top;
    size_t end;
} dec_t;

static int dfail(dec_t *d, size_t off, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->io->err, sizeof d->io->err, fmt, ap);
    va_end(ap);
    d->io->err_offset = (int64_t)off;
    return -1;
}

static int doom(dec_t *d) {
    d->oom = 1;
    return -2;
}

#define NEED(pos, n, what)                                                          \
    do {                                                                            \
        if ((uint64_t)(n) > (uint64_t)(d->len - (pos)))                             \
            return dfail(d, (pos), "truncated %s: needs %llu bytes, %llu left", what, \
                         (unsigned long long)(n), (unsigned long long)(d->len - (pos))); \
    } while (0)

/* sshrpc._etf.TERM_COST: what each tag read as a term costs. */
static const uint16_t term_cost[256] = {
    [97] = 6,    [98] = 16,   [70] = 32,   [99] = 512,  [100] = 80,  [115] = 80,  [118] = 80,
    [119] = 80,  [104] = 64,  [105] = 64,  [106] = 72,  [107] = 256, [108] = 256, [109] = 48,
    [77] = 512,  [110] = 48,  [111] = 48,  [116] = 256, [88] = 512,  [89] = 512,  [90] = 512,
    [101] = 512, [102] = 512, [103] = 512, [112] = 512, [113] = 512, [114] = 512, [117] = 512,
    [120] = 512,
};

#define CHARGE(tag, pos)                                                              \
    do {                                                                              \
        d->cost += term_cost[(tag)];                                                  \
        if (d->cost > d->max_cost)                                                    \
            return dfail(d, (pos), "term exceeds the decode budget of %llu",          \
                         (unsigned long long)d->max_cost);                            \
    } while (0)

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Room for n more output bytes; returns the write pointer or NULL. */
static inline uint8_t *room(dec_t *d, size_t n) {
    sshrpc_io *io = d->io;
    if (d->fixed) {
        if (n > d->fixed_cap - io->out_len) {
            d->too_small = 1;
            return NULL;
        }
        return io->out + io->out_len;
    }
    if (io->out_len + n > d->pv->out_cap) {
        if (grow((void **)&io->out, &d->pv->out_cap, io->out_len + n, 1)) return NULL;
    }
    return io->out + io->out_len;
}

#define W(n)                                \
    uint8_t *w = room(d, (n));              \
    if (!w) return doom(d);                 \
    d->io->out_len += (n);

static inline void le32(uint8_t *w, uint32_t v) {
    w[0] = (uint8_t)v;
    w[1] = (uint8_t)(v >> 8);
    w[2] = (uint8_t)(v >> 16);
    w[3] = (uint8_t)(v >> 24);
}

static int emit_op(dec_t *d, uint8_t op) {
    W(1);
    w[0] = op;
    return 0;
}

static int emit_get(dec_t *d, uint32_t idx) {
    if (idx < 256) {
        W(2);
        w[0] = 'h';
        w[1] = (uint8_t)idx;
    } else {
        W(5);
        w[0] = 'j';
        le32(w + 1, idx);
    }
    return 0;
}

/* A bytes object holding data[pos, pos+n). */
static int emit_bytes(dec_t *d, size_t pos, size_t n, int allow_oob) {
    if (allow_oob && n >= d->oob_min) {
        sshrpc_io *io = d->io;
        if (grow((void **)&io->oob, &d->pv->oob_cap, 2 * io->n_oob + 2, sizeof(uint64_t)))
            return doom(d);
        io->oob[2 * io->n_oob] = pos;
        io->oob[2 * io->n_oob + 1] = n;
        io->n_oob++;
        return emit_op(d, 0x97); /* NEXT_BUFFER */
    }
    if (n < 256) {
        W(2 + n);
        w[0] = 'C';
        w[1] = (uint8_t)n;
        memcpy(w + 2, d->data + pos, n);
    } else {
        W(5 + n);
        w[0] = 'B';
        le32(w + 1, (uint32_t)n);
        memcpy(w + 5, d->data + pos, n);
    }
    return 0;
}

static int utf8_chars(const uint8_t *s, size_t n, size_t *chars) {
    size_t i = 0, c = 0;
    while (i < n) {
        uint8_t b = s[i];
        if (b < 0x80) {
            i++;
        } else if (b >= 0xC2 && b <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return -1;
            i += 2;
        } else if (b >= 0xE0 && b <= 0xEF) {
            if (i + 2 >= n) return -1;
            uint8_t b1 = s[i + 1];
            if ((b1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return -1;
            if ((b == 0xE0 && b1 < 0xA0) || (b == 0xED && b1 >= 0xA0)) return -1;
            i += 3;
        } else if (b >= 0xF0 && b <= 0xF4) {
            if (i + 3 >= n) return -1;
            uint8_t b1 = s[i + 1];
            if ((b1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
                return -1;
            if ((b == 0xF0 && b1 < 0x90) || (b == 0xF4 && b1 >= 0x90)) return -1;
            i += 4;
        } else {
            return -1;
        }
        c++;
    }
    *chars = c;
    return 0;
}

static int is_atom_tag(uint8_t t) { return t == 100 || t == 115 || t == 118 || t == 119; }

/* Parse and validate the atom at pos; emit it unless d->skip or !emit. */
static int atom(dec_t *d, size_t pos, size_t *end, int emit) {
    NEED(pos, 1, "atom");
    uint8_t tag = d->data[pos];
    if (!is_atom_tag(tag)) return dfail(d, pos, "expected an atom, found tag %u", tag);
    size_t length, p;
    if (tag == 115 || tag == 119) {
        NEED(pos + 1, 1, "atom length");
        length = d->data[pos + 1];
        p = pos + 2;
    } else {
        NEED(pos + 1, 2, "atom length");
        length = be16(d->data + pos + 1);
        p = pos + 3;
    }
    NEED(p, length, "atom text");
    const uint8_t *s = d->data + p;
    int latin1 = tag == 100 || tag == 115;
    size_t chars = length;
    if (!latin1 && utf8_chars(s, length, &chars))
        return dfail(d, pos, "atom text is not valid UTF-8");
    if (chars > 255) return dfail(d, pos, "atom of %zu characters is longer than 255", chars);
    *end = p + length;
    if (!emit || d->skip) return 0;
    if (length == 4 && !memcmp(s, "true", 4)) return emit_op(d, 0x88);
    if (length == 5 && !memcmp(s, "false", 5)) return emit_op(d, 0x89);
    if (length == 9 && !memcmp(s, "undefined", 9)) return emit_op(d, 'N');
    uint8_t conv[512];
    const uint8_t *u = s;
    size_t ulen = length;
    if (latin1) {
        ulen = 0;
        for (size_t i = 0; i < length; i++) {
            if (s[i] < 0x80) {
                conv[ulen++] = s[i];
            } else {
                conv[ulen++] = (uint8_t)(0xC0 | (s[i] >> 6));
                conv[ulen++] = (uint8_t)(0x80 | (s[i] & 0x3F));
            }
        }
        u = conv;
    }
    priv_t *pv = d->pv;
    uint32_t idx = 0;
    atom_slot *slot = NULL;
    uint64_t h = 0;
    if (pv->table) {
        h = fnv(FNV0, u, ulen);
        uint32_t i = (uint32_t)h & pv->table_mask;
        for (;;) {
            atom_slot *sl = &pv->table[i];
            if (!sl->idx) {
                slot = sl;
                break;
            }
            if (sl->hash == h && sl->name_len == ulen &&
                (!ulen || !memcmp(pv->arena + sl->name_off, u, ulen)))
                return emit_get(d, sl->idx);
            i = (i + 1) & pv->table_mask;
        }
        if (pv->n_atoms < pv->cache_cap && pv->arena_len + ulen <= UINT32_MAX) {
            if (grow((void **)&pv->arena, &pv->arena_cap, pv->arena_len + ulen, 1)) return doom(d);
            /* The arena may still be NULL when the first atom is empty. */
            if (ulen) memcpy(pv->arena + pv->arena_len, u, ulen);
            slot->hash = h;
            slot->name_off = (uint32_t)pv->arena_len;
            slot->name_len = (uint16_t)ulen;
            slot->idx = idx = SSHRPC_M_FIRST_ATOM + pv->n_atoms;
            pv->arena_len += ulen;
            pv->n_atoms++;
            pv->pending[pv->n_pending++] = (uint32_t)(slot - pv->table);
        }
    }
    W(2 + 5 + ulen + 2 + 5);
    uint8_t *q = w;
    *q++ = 'h';
    *q++ = SSHRPC_M_ATOM;
    if (ulen < 256) {
        *q++ = 0x8c;
        *q++ = (uint8_t)ulen;
    } else {
        *q++ = 'X';
        le32(q, (uint32_t)ulen);
        q += 4;
    }
    memcpy(q, u, ulen);
    q += ulen;
    *q++ = 0x85;
    *q++ = 'R';
    if (idx) {
        if (idx < 256) {
            *q++ = 'q';
            *q++ = (uint8_t)idx;
        } else {
            *q++ = 'r';
            le32(q, idx);
            q += 4;
        }
    }
    d->io->out_len = (size_t)(q - d->io->out);
    return 0;
}

/* Validate a bignum at pos (tag 110 or 111); set *end, *n, *digits. */
static int big(dec_t *d, size_t pos, size_t *end, size_t *n, size_t *digits, int *neg) {
    uint8_t tag = d->data[pos];
    size_t p = pos + 1;
    uint64_t count;
    if (tag == 110) {
        NEED(p, 1, "SMALL_BIG_EXT length");
        count = d->data[p];
        p += 1;
    } else {
        NEED(p, 4, "LARGE_BIG_EXT length");
        count = be32(d->data + p);
        p += 4;
    }
    if (count > d->max_big)
        return dfail(d, pos, "bignum of %llu bytes is above the limit %llu",
                     (unsigned long long)count, (unsigned long long)d->max_big);
    NEED(p, 1, "bignum sign");
    uint8_t sign = d->data[p];
    if (sign > 1) return dfail(d, p, "bignum sign byte is %u, not 0 or 1", sign);
    p += 1;
    NEED(p, count, "bignum digits");
    *n = (size_t)count;
    *digits = p;
    *neg = sign;
    *end = p + (size_t)count;
    return 0;
}

static int emit_big(dec_t *d, size_t digits, size_t n, int neg) {
    size_t m = n + 1;
    W(5 + m);
    uint8_t *q = w;
    if (m < 256) {
        *q++ = 0x8a;
        *q++ = (uint8_t)m;
        d->io->out_len -= 3;
    } else {
        *q++ = 0x8b;
        le32(q, (uint32_t)m);
        q += 4;
    }
    const uint8_t *s = d->data + digits;
    if (!neg) {
        memcpy(q, s, n);
        q[n] = 0;
    } else {
        unsigned carry = 1;
        for (size_t i = 0; i < n; i++) {
            unsigned v = (uint8_t)~s[i] + carry;
            q[i] = (uint8_t)v;
            carry = v >> 8;
        }
        q[n] = (uint8_t)(0xFF + carry);
    }
    return 0;
}

/* Validate a pid/port/reference/NEW_FUN_EXT at pos; set *end. */
static int opaque_plain(dec_t *d, size_t pos, size_t *end) {
    uint8_t tag = d->data[pos];
    size_t p = pos + 1;
    int rc;
    if (tag == 112) {
        NEED(p, 4, "NEW_FUN_EXT size");
        uint32_t size = be32(d->data + p);
        if (size < 4) return dfail(d, pos, "NEW_FUN_EXT size %u is below 4", size);
        NEED(p, size, "NEW_FUN_EXT");
        *end = p + size;
        return 0;
    }
    if (tag == 90 || tag == 114) {
        NEED(p, 2, "reference length");
        unsigned words = be16(d->data + p);
        if (words < 1 || words > 5)
            return dfail(d, pos, "reference with %u ID words (1..5 allowed)", words);
        if ((rc = atom(d, p + 2, &p, 0))) return rc;
        size_t size = (tag == 90 ? 4 : 1) + 4 * (size_t)words;
        NEED(p, size, "reference");
        *end = p + size;
        return 0;
    }
    if ((rc = atom(d, p, &p, 0))) return rc;
    size_t size = tag == 88 ? 12 : tag == 103 ? 9 : tag == 89 ? 8 : tag == 120 ? 12 : 5;
    NEED(p, size, "pid, port or reference");
    *end = p + size;
    return 0;
}

static int memo_for_tag(uint8_t tag) {
    switch (tag) {
    case 88: case 103: return SSHRPC_M_PID;
    case 89: case 102: case 120: return SSHRPC_M_PORT;
    case 90: case 101: case 114: return SSHRPC_M_REFERENCE;
    case 112: case 117: return SSHRPC_M_FUN;
    default: return SSHRPC_M_EXPORT;
    }
}

static int emit_opaque(dec_t *d, size_t pos, size_t end) {
    int rc;
    if ((rc = emit_get(d, (uint32_t)memo_for_tag(d->data[pos])))) return rc;
    if ((rc = emit_bytes(d, pos, end - pos, 0))) return rc;
    W(2);
    w[0] = 0x85;
    w[1] = 'R';
    return 0;
}

/* An integer term for FUN_EXT's index and uniq: validate, no output. */
static int fun_int(dec_t *d, size_t p, size_t *end, const char *what) {
    NEED(p, 1, "term");
    uint8_t t = d->data[p];
    CHARGE(t, p);
    if (t == 97) {
        NEED(p + 1, 1, "SMALL_INTEGER_EXT");
        *end = p + 2;
    } else if (t == 98) {
        NEED(p + 1, 4, "INTEGER_EXT");
        *end = p + 5;
    } else if (t == 110 || t == 111) {
        size_t n, digits;
        int neg, rc;
        if ((rc = big(d, p, end, &n, &digits, &neg))) return rc;
    } else {
        return dfail(d, p, "FUN_EXT %s is not an integer", what);
    }
    return 0;
}

/* Hash a map key that Python compares the way Erlang does; 0 if the key is
 * not one of those (then the map goes through the Python fallback). */
static int key_hash(dec_t *d, size_t pos, uint64_t *h) {
    const uint8_t *s = d->data;
    size_t left = d->len - pos;
    if (left < 2) return 0;
    uint8_t t = s[pos];
    int64_t iv;
    uint8_t kind;
    if (t == 97) {
        iv = s[pos + 1];
        goto integer;
    }
    if (t == 98) {
        if (left < 5) return 0;
        iv = (int32_t)be32(s + pos + 1);
        goto integer;
    }
    if (t == 110) {
        size_t n = s[pos + 1];
        if (left < 3 + n || s[pos + 2] > 1) return 0;
        const uint8_t *g = s + pos + 3;
        while (n && !g[n - 1]) n--;
        if (n <= 7) {
            uint64_t v = 0;
            for (size_t i = n; i-- > 0;) v = (v << 8) | g[i];
            iv = s[pos + 2] ? -(int64_t)v : (int64_t)v;
            goto integer;
        }
        kind = s[pos + 2] ? 'N' : 'P';
        *h = fnv(fnv(FNV0, &kind, 1), g, n);
        return 1;
    }
    if (t == 109) {
        if (left < 5) return 0;
        uint32_t n = be32(s + pos + 1);
        if (left - 5 < n) return 0;
        kind = 'b';
        *h = fnv(fnv(FNV0, &kind, 1), s + pos + 5, n);
        return 1;
    }
    if (is_atom_tag(t)) {
        size_t n, p;
        if (t == 115 || t == 119) {
            n = s[pos + 1];
            p = pos + 2;
        } else {
            if (left < 3) return 0;
            n = be16(s + pos + 1);
            p = pos + 3;
        }
        if (d->len - p < n) return 0;
        if (t == 100 || t == 115)
            for (size_t i = 0; i < n; i++)
                if (s[p + i] >= 0x80) return 0;
        if (n == 4 && !memcmp(s + p, "true", 4)) {
            iv = 1;
            goto integer;
        }
        if (n == 5 && !memcmp(s + p, "false", 5)) {
            iv = 0;
            goto integer;
        }
        kind = 'a';
        *h = fnv(fnv(FNV0, &kind, 1), s + p, n);
        return 1;
    }
    return 0;
integer:
    kind = 'i';
    {
        uint8_t b[8];
        for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)iv >> (8 * i));
        *h = fnv(fnv(FNV0, &kind, 1), b, 8);
    }
    return 1;
}

#define MAP_HASH_MAX 4096

/* Note the key at pos in the map frame f; sets f->fallback when the key is
 * not a simple one or may equal an earlier key.  The hash table grows with
 * the keys actually read, never with the arity the map claims. */
static int map_key(dec_t *d, dframe *f, size_t pos) {
    if (f->fallback) return 0;
    uint64_t h;
    if (!key_hash(d, pos, &h)) {
        f->fallback = 1;
        return 0;
    }
    if (f->arity < 2) return 0;
    if (!h) h = 1;
    if (2 * (f->n_keys + 1) > (f->keys ? f->keys_mask + 1 : 0)) {
        uint32_t size = f->keys ? 2 * (f->keys_mask + 1) : 16;
        uint64_t *t = calloc(size, sizeof(uint64_t));
        if (!t) return doom(d);
        if (f->keys) {
            for (uint32_t j = 0; j <= f->keys_mask; j++) {
                if (!f->keys[j]) continue;
                uint32_t k = (uint32_t)f->keys[j] & (size - 1);
                while (t[k]) k = (k + 1) & (size - 1);
                t[k] = f->keys[j];
            }
            free(f->keys);
        }
        f->keys = t;
        f->keys_mask = size - 1;
    }
    uint32_t i = (uint32_t)h & f->keys_mask;
    while (f->keys[i]) {
        if (f->keys[i] == h) {
            f->fallback = 1; /* maybe equal keys: let Python decide */
            return 0;
        }
        i = (i + 1) & f->keys_mask;
    }
    f->keys[i] = h;
    f->n_keys++;
    return 0;
}

static int push(dec_t *d, dframe **top) {
    priv_t *pv = d->pv;
    size_t n = *top ? (size_t)(*top - pv->stack) + 1 : 0;
    if (grow((void **)&pv->stack, &pv->stack_cap, n + 1, sizeof(dframe))) return doom(d);
    *top = pv->stack + n;
    memset(*top, 0, sizeof(dframe));
    return 0;
}

static int check_count(dec_t *d, size_t pos, uint64_t count, unsigned size, const char *what) {
    uint64_t left = d->len - pos;
    if (count * size > left)
        return dfail(d, pos, "%s claims %llu elements but only %llu bytes follow", what,
                     (unsigned long long)count, (unsigned long long)left);
    return 0;
}

#define DEPTH(depth, pos)                                                            \
    do {                                                                             \
        if ((depth) >= d->max_depth)                                                 \
            return dfail(d, (pos), "nesting deeper than the limit %llu",             \
                         (unsigned long long)d->max_depth);                          \
    } while (0)

/* A proper list of n >= HOMOGENEOUS_MIN integers (tags 97, 98) or finite
 * floats (70) at p, ending in NIL: emitted as one packed little-endian array
 * for array(...).tolist().  Returns 1 (and emits nothing) for any other list;
 * the generic path then reports whatever is wrong with it. */
#define HOMOGENEOUS_MIN 8
static int homogeneous(dec_t *d, size_t p, uint64_t n, size_t *end) {
    const uint8_t *s = d->data;
    size_t q = p, len = d->len;
    int kind = 0;
    uint64_t i, cost = d->cost;
    for (i = 0; i < n && q < len; i++) {
        uint8_t t = s[q];
        cost += term_cost[t];
        if (kind != 2 && t == 97 && len - q >= 2) {
            kind = 1;
            q += 2;
        } else if (kind != 2 && t == 98 && len - q >= 5) {
            kind = 1;
            q += 5;
        } else if (kind != 1 && t == 70 && len - q >= 9 &&
                   (((s[q + 1] & 0x7F) << 4) | (s[q + 2] >> 4)) != 0x7FF) {
            kind = 2;
            q += 9;
        } else {
            return 1;
        }
    }
    cost += term_cost[106];
    /* Over budget: the generic path reports it at the right element. */
    if (i < n || q >= len || s[q] != 106 || d->skip || cost > d->max_cost) return 1;
    d->cost = cost;
    int rc;
    if ((rc = emit_get(d, kind == 1 ? SSHRPC_M_INTS : SSHRPC_M_FLOATS))) return rc;
    size_t size = (kind == 1 ? 4 : 8) * (size_t)n;
    W(5 + size + 2);
    w[0] = 'B';
    le32(w + 1, (uint32_t)size);
    uint8_t *o = w + 5;
    q = p;
    for (i = 0; i < n; i++) {
        if (s[q] == 97) {
            o[0] = s[q + 1];
            o[1] = o[2] = o[3] = 0;
            o += 4;
            q += 2;
        } else if (s[q] == 98) {
            le32(o, be32(s + q + 1));
            o += 4;
            q += 5;
        } else {
            for (int k = 0; k < 8; k++) o[k] = s[q + 8 - k];
            o += 8;
            q += 9;
        }
    }
    o[0] = 0x85;
    o[1] = 'R';
    *end = q + 1;
    return 0;
}

#define top (d->top)
static int decode_term(dec_t *d) {
    const uint8_t *s = d->data;
    size_t pos = 1;
    uint64_t depth = 0;
    int rc;

next_term:
    NEED(pos, 1, "term");
    CHARGE(s[pos], pos);
    {
        uint8_t tag = s[pos];
        size_t p = pos + 1;
        switch (tag) {
        case 97: { /* SMALL_INTEGER_EXT */
            NEED(p, 1, "SMALL_INTEGER_EXT");
            W(2);
            w[0] = 'K';
            w[1] = s[p];
            pos = p + 1;
            goto complete;
        }
        case 98: { /* INTEGER_EXT */
            NEED(p, 4, "INTEGER_EXT");
            W(5);
            w[0] = 'J';
            le32(w + 1, be32(s + p));
            pos = p + 4;
            goto complete;
        }
        case 70: { /* NEW_FLOAT_EXT */
            NEED(p, 8, "NEW_FLOAT_EXT");
            if ((((s[p] & 0x7F) << 4) | (s[p + 1] >> 4)) == 0x7FF)
                return dfail(d, pos, "float is not finite (Erlang has no NaN or infinity)");
            W(9);
            w[0] = 'G';
            memcpy(w + 1, s + p, 8);
            pos = p + 8;
            goto complete;
        }
        case 99: { /* FLOAT_EXT: parsed by Python's float(), as the reference does */
            NEED(p, 31, "FLOAT_EXT");
            /* Python checks every string float first, in order (io->floats),
             * so a bad one is reported where the reference reports it. */
            if (grow((void **)&d->io->floats, &d->pv->floats_cap, d->io->n_floats + 1,
                     sizeof(uint64_t)))
                return doom(d);
            d->io->floats[d->io->n_floats++] = pos;
            if ((rc = emit_get(d, SSHRPC_M_SFLOAT))) return rc;
            W(2 + 31 + 5 + 2);
            w[0] = 'C';
            w[1] = 31;
            memcpy(w + 2, s + p, 31);
            w[33] = 'J';
            le32(w + 34, (uint32_t)pos);
            w[38] = 0x86;
            w[39] = 'R';
            pos = p + 31;
            goto complete;
        }
        case 100: case 115: case 118: case 119:
            if ((rc = atom(d, pos, &pos, 1))) return rc;
            goto complete;
        case 104: case 105: { /* tuples */
            uint64_t arity;
            if (tag == 104) {
                NEED(p, 1, "SMALL_TUPLE_EXT arity");
                arity = s[p];
                p += 1;
            } else {
                NEED(p, 4, "LARGE_TUPLE_EXT arity");
                arity = be32(s + p);
                p += 4;
            }
            if ((rc = check_count(d, p, arity, 1, "tuple"))) return rc;
            DEPTH(depth, pos);
            pos = p;
            if (arity == 0) {
                if ((rc = emit_op(d, ')'))) return rc;
                goto complete;
            }
            if (arity > 3 && (rc = emit_op(d, '('))) return rc;
            if ((rc = push(d, &top))) return rc;
            top->kind = F_TUPLE;
            top->rem = top->arity = arity;
            top->depth = ++depth;
            goto next_term;
        }
        case 106: /* NIL_EXT */
            if ((rc = emit_op(d, ']'))) return rc;
            pos = p;
            goto complete;
        case 107: { /* STRING_EXT */
            NEED(p, 2, "STRING_EXT length");
            size_t n = be16(s + p);
            p += 2;
            NEED(p, n, "STRING_EXT");
            if (n >= HOMOGENEOUS_MIN) { /* list(bytes) */
                if ((rc = emit_get(d, SSHRPC_M_BYTELIST))) return rc;
                if ((rc = emit_bytes(d, p, n, 0))) return rc;
                W(2);
                w[0] = 0x85;
                w[1] = 'R';
                pos = p + n;
                goto complete;
            }
            W(3 + 2 * n);
            w[0] = ']';
            if (n) {
                w[1] = '(';
                for (size_t i = 0; i < n; i++) {
                    w[2 + 2 * i] = 'K';
                    w[3 + 2 * i] = s[p + i];
                }
                w[2 + 2 * n] = 'e';
            } else {
                d->io->out_len -= 2;
            }
            pos = p + n;
            goto complete;
        }
        case 108: { /* LIST_EXT */
            NEED(p, 4, "LIST_EXT length");
            uint64_t n = be32(s + p);
            p += 4;
            if ((rc = check_count(d, p, n, 1, "list"))) return rc;
            DEPTH(depth, pos);
            if (n >= HOMOGENEOUS_MIN && (rc = homogeneous(d, p, n, &pos)) != 1) {
                if (rc) return rc;
                goto complete;
            }
            pos = p;
            if ((rc = push(d, &top))) return rc;
            top->depth = ++depth;
            if (n == 0) { /* [ | Tail] is Tail */
                top->kind = F_PASS;
                goto next_term;
            }
            top->kind = F_LIST;
            top->phase = P_ITEMS;
            top->rem = n;
            top->ph = d->io->out_len;
            W(4);
            w[0] = '(';
            w[1] = '1';
            w[2] = ']';
            w[3] = '(';
            goto next_term;
        }
        case 109: { /* BINARY_EXT */
            NEED(p, 4, "BINARY_EXT length");
            size_t n = be32(s + p);
            p += 4;
            NEED(p, n, "BINARY_EXT");
            if ((rc = emit_bytes(d, p, n, !d->skip))) return rc;
            pos = p + n;
            goto complete;
        }
        case 77: { /* BIT_BINARY_EXT */
            NEED(p, 4, "BIT_BINARY_EXT length");
            size_t n = be32(s + p);
            NEED(p + 4, 1, "BIT_BINARY_EXT bits");
            unsigned bits = s[p + 4];
            if (n == 0 || bits < 1 || bits > 8)
                return dfail(d, pos,
                             "BIT_BINARY_EXT needs at least one byte and 1..8 bits, "
                             "got %zu bytes and %u bits",
                             n, bits);
            p += 5;
            NEED(p, n, "BIT_BINARY_EXT");
            if (bits == 8) {
                if ((rc = emit_bytes(d, p, n, !d->skip))) return rc;
            } else {
                if ((rc = emit_get(d, SSHRPC_M_BITSTRING))) return rc;
                if ((rc = emit_bytes(d, p, n, 0))) return rc;
                W(4);
                w[0] = 'K';
                w[1] = (uint8_t)bits;
                w[2] = 0x86;
                w[3] = 'R';
            }
            pos = p + n;
            goto complete;
        }
        case 110: case 111: {
            size_t n, digits;
            int neg;
            if ((rc = big(d, pos, &pos, &n, &digits, &neg))) return rc;
            if ((rc = emit_big(d, digits, n, neg))) return rc;
            goto complete;
        }
        case 116: { /* MAP_EXT */
            NEED(p, 4, "MAP_EXT arity");
            uint64_t n = be32(s + p);
            p += 4;
            if ((rc = check_count(d, p, n, 2, "map"))) return rc;
            DEPTH(depth, pos);
            pos = p;
            if (n == 0) {
                if ((rc = emit_op(d, '}'))) return rc;
                goto complete;
            }
            if ((rc = push(d, &top))) return rc;
            top->kind = F_MAP;
            top->phase = P_KEY;
            top->rem = top->arity = n;
            top->depth = ++depth;
            top->ph = d->io->out_len;
            if (n > MAP_HASH_MAX) top->fallback = 1;
            W(4);
            w[0] = '(';
            w[1] = '1';
            w[2] = '}';
            w[3] = '(';
            if ((rc = map_key(d, top, pos))) return rc;
            goto next_term;
        }
        case 88: case 103: case 89: case 120: case 102: case 90: case 114: case 101:
        case 112: {
            size_t end;
            if ((rc = opaque_plain(d, pos, &end))) return rc;
            if ((rc = emit_opaque(d, pos, end))) return rc;
            pos = end;
            goto complete;
        }
        case 113: { /* EXPORT_EXT */
            DEPTH(depth, pos);
            if ((rc = atom(d, p, &p, 0))) return rc;
            if ((rc = atom(d, p, &p, 0))) return rc;
            NEED(p, 1, "export arity");
            if (s[p] != 97) return dfail(d, p, "export arity is not a small integer");
            NEED(p + 1, 1, "export arity");
            if ((rc = emit_opaque(d, pos, p + 2))) return rc;
            pos = p + 2;
            goto complete;
        }
        case 117: { /* FUN_EXT */
            DEPTH(depth, pos);
            NEED(p, 4, "FUN_EXT free variable count");
            uint64_t nfree = be32(s + p);
            p += 4;
            if ((rc = check_count(d, p, nfree, 1, "FUN_EXT free variables"))) return rc;
            NEED(p, 1, "term");
            if (s[p] == 88 || s[p] == 103) CHARGE(s[p], p);
            if (s[p] != 88 && s[p] != 103) {
                /* Like the reference: check that term first, then fail. */
                if ((rc = push(d, &top))) return rc;
                top->kind = F_FUNPID;
                top->start = pos;
                top->depth = ++depth;
                d->skip++;
                pos = p;
                goto next_term;
            }
            if ((rc = opaque_plain(d, p, &p))) return rc;
            if ((rc = atom(d, p, &p, 0))) return rc;
            if ((rc = fun_int(d, p, &p, "index"))) return rc;
            if ((rc = fun_int(d, p, &p, "uniq"))) return rc;
            if (nfree == 0) {
                if ((rc = emit_opaque(d, pos, p))) return rc;
                pos = p;
                goto complete;
            }
            if ((rc = push(d, &top))) return rc;
            top->kind = F_FUN;
            top->rem = nfree;
            top->start = pos;
            top->depth = ++depth;
            top->out_mark = d->io->out_len;
            top->oob_mark = d->io->n_oob;
            d->skip++;
            pos = p;
            goto next_term;
        }
        default:
            return dfail(d, pos, "unknown tag %u", tag);
        }
    }

complete:
    if (!top) {
        d->end = pos;
        return 0;
    }
    switch (top->kind) {
    case F_TUPLE:
        if (--top->rem) goto next_term;
        if (top->arity <= 3) {
            if ((rc = emit_op(d, (uint8_t)(0x84 + top->arity)))) return rc;
        } else if ((rc = emit_op(d, 't'))) {
            return rc;
        }
        break;
    case F_PASS:
        break;
    case F_FUNPID:
        return dfail(d, top->start, "FUN_EXT without a pid");
    case F_FUN:
        if (--top->rem) goto next_term;
        d->skip--;
        d->io->out_len = top->out_mark;
        d->io->n_oob = top->oob_mark;
        if ((rc = emit_opaque(d, top->start, pos))) return rc;
        break;
    case F_MAP:
        if (top->phase == P_KEY) {
            top->phase = P_VALUE;
            goto next_term;
        }
        if (--top->rem) {
            top->phase = P_KEY;
            if ((rc = map_key(d, top, pos))) return rc;
            goto next_term;
        }
        free(top->keys);
        top->keys = NULL;
        if (top->fallback) {
            uint8_t *o = d->io->out + top->ph;
            o[0] = 'h';
            o[1] = SSHRPC_M_MAP;
            W(3);
            w[0] = 't';
            w[1] = 0x86;
            w[2] = 'R';
        } else if ((rc = emit_op(d, 'u'))) {
            return rc;
        }
        break;
    case F_LIST:
        if (top->phase == P_TAIL) {
            W(2);
            w[0] = 0x86;
            w[1] = 'R';
            break;
        }
        if (--top->rem) goto next_term;
        if ((rc = emit_op(d, 'e'))) return rc;
        /* The tail: a list continues this one, anything else makes it improper. */
        for (;;) {
            NEED(pos, 1, "term");
            uint8_t t = s[pos];
            size_t p = pos + 1;
            if (t == 106 || t == 107 || t == 108) CHARGE(t, pos);
            if (t == 106) {
                pos = p;
                goto list_done;
            }
            if (t == 107) {
                NEED(p, 2, "STRING_EXT length");
                size_t n = be16(s + p);
                p += 2;
                NEED(p, n, "STRING_EXT");
                if (n) {
                    W(2 + 2 * n);
                    w[0] = '(';
                    for (size_t i = 0; i < n; i++) {
                        w[1 + 2 * i] = 'K';
                        w[2 + 2 * i] = s[p + i];
                    }
                    w[1 + 2 * n] = 'e';
                }
                pos = p + n;
                goto list_done;
            }
            if (t == 108) {
                NEED(p, 4, "LIST_EXT length");
                uint64_t n = be32(s + p);
                p += 4;
                if ((rc = check_count(d, p, n, 1, "list"))) return rc;
                DEPTH(top->depth, pos);
                top->depth++;
                pos = p;
                if (n == 0) continue;
                top->rem = n;
                if ((rc = emit_op(d, '('))) return rc;
                depth = top->depth;
                goto next_term;
            }
            uint8_t *o = d->io->out + top->ph;
            o[0] = 'h';
            o[1] = SSHRPC_M_IMPROPER;
            top->phase = P_TAIL;
            depth = top->depth;
            goto next_term;
        }
    list_done:
        break;
    }
    /* pop */
    if (top == d->pv->stack) {
        top = NULL;
        d->end = pos;
        return 0;
    }
    top--;
    depth = top->depth;
    goto complete;
}
#undef top

int64_t sshrpc_etf_to_pickle(sshrpc_io *io, const char *cdata, size_t len, uint64_t max_depth,
                             uint64_t max_big, uint64_t max_cost, size_t oob_min, char *out,
                             size_t cap) {
    const uint8_t *data = (const uint8_t *)cdata;
    priv_t *pv = PRIV(io);
    dec_t dd;
    memset(&dd, 0, sizeof dd);
    dec_t *d = &dd;
    d->io = io;
    d->pv = pv;
    d->data = data;
    d->len = len;
    d->max_depth = max_depth;
    d->max_big = max_big;
    d->max_cost = max_cost;
    d->oob_min = oob_min;
    d->fixed = 1;
    d->fixed_cap = cap;
    uint8_t *own_out = io->out;
    io->out = (uint8_t *)out;
    io->out_len = 0;
    io->n_oob = 0;
    io->n_floats = 0;
    io->err[0] = 0;
    io->err_offset = 0;
    pv->n_pending = 0;
    size_t arena_mark = pv->arena_len;
    int rc;
    if (len < 1 || data[0] != 131) {
        rc = len < 1 ? dfail(d, 0, "empty input, expected version byte 131")
                     : dfail(d, 0, "expected version byte 131, found %u", data[0]);
        goto failed;
    }
    /* No PROTO opcode: the unpickler does not need one, and every opcode
     * before the FRAME costs a read() call on the BytesIO. */
    if (!room(d, 9)) {
        rc = -3;
        goto failed;
    }
    io->out[0] = 0x95;
    io->out_len = 9;
    rc = decode_term(d);
    io->cost = d->cost;
    if (rc == -2 && d->too_small) rc = -3;
    if (rc == 0 && d->end != len)
        rc = dfail(d, d->end, "%zu trailing bytes after the term", len - d->end);
    if (rc == 0) {
        uint8_t *w = room(d, 1);
        if (!w) {
            rc = -3;
        } else {
            *w = '.';
            io->out_len++;
            uint64_t flen = io->out_len - 9;
            for (int i = 0; i < 8; i++) io->out[1 + i] = (uint8_t)(flen >> (8 * i));
            pv->n_pending = 0;
            int64_t result =
                (int64_t)io->out_len * 4 + (io->n_floats ? 2 : 0) + (io->n_oob ? 1 : 0);
            io->out = own_out;
            return result;
        }
    }
failed:
    io->out = own_out;
    if (d->top) {
        for (dframe *f = pv->stack; f <= d->top; f++) {
            free(f->keys);
            f->keys = NULL;
        }
    }
    /* Forget the atoms this call cached: the stream defining them is never loaded. */
    for (size_t i = 0; i < pv->n_pending; i++)
        memset(&pv->table[pv->pending[i]], 0, sizeof(atom_slot));
    pv->n_atoms -= (uint32_t)pv->n_pending;
    pv->n_pending = 0;
    pv->arena_len = arena_mark;
    return rc;
}

/* ------------------------------------------------------------------------
 * Encoding: pickle -> ETF
 *
 * Pass 1 parses the pickle stream into a tape of nodes (pickle builds
 * tuples after their items and fills lists after creating them, and batches
 * APPENDS, so ETF's length-first headers need the whole shape first); pass 2
 * walks the tape depth first and writes ETF. */

enum {
    N_NONE, N_TRUE, N_FALSE, N_INT, N_LONG, N_FLOAT, N_STR, N_BYTES, N_TUPLE, N_LIST,
    N_DICT, N_GLOBAL, N_ATOM, N_BITSTR, N_IMPROPER, N_MAP, N_OPAQUE
};
enum { G_ATOM, G_BITSTRING, G_IMPROPER, G_MAP, G_OPAQUE };

typedef struct {
    uint32_t node, next;
} ecell;

struct enode {
    uint8_t kind;
    uint8_t bytes_only; /* N_LIST: every item an int in 0..255 */
    uint8_t gkind;
    uint32_t first, last, count; /* children (cells), or N_IMPROPER items/tail */
    const uint8_t *ptr;
    uint64_t len;
    int64_t ival;
};

#define NIL_CELL 0xFFFFFFFFu

typedef struct {
    sshrpc_io *io;
    priv_t *pv;
    enode *nodes;
    size_t n_nodes;
    ecell *cells;
    size_t n_cells;
    uint8_t *base; /* the caller's buffer while `fixed`, else io->out */
    size_t len, cap;
    int fixed;
    const uint8_t *stream;
    uint64_t spliced; /* bytes left in the stream, see e_binary */
    size_t nmemo;
} enc_t;

static int64_t new_node(enc_t *e, uint8_t kind) {
    if (grow((void **)&e->pv->nodes, &e->pv->nodes_cap, e->n_nodes + 1, sizeof(enode))) return -2;
    e->nodes = e->pv->nodes;
    enode *n = &e->nodes[e->n_nodes];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->first = n->last = NIL_CELL;
    n->bytes_only = 1;
    return (int64_t)e->n_nodes++;
}

static int add_child(enc_t *e, uint32_t parent, uint32_t child) {
    if (grow((void **)&e->pv->cells, &e->pv->cells_cap, e->n_cells + 1, sizeof(ecell))) return -2;
    e->cells = e->pv->cells;
    uint32_t c = (uint32_t)e->n_cells++;
    e->cells[c].node = child;
    e->cells[c].next = NIL_CELL;
    enode *p = &e->nodes[parent];
    if (p->last == NIL_CELL) p->first = c;
    else e->cells[p->last].next = c;
    p->last = c;
    p->count++;
    enode *ch = &e->nodes[child];
    if (!(ch->kind == N_INT && ch->ival >= 0 && ch->ival <= 255)) p->bytes_only = 0;
    return 0;
}

static uint64_t le_n(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int gkind_of(const uint8_t *mod, size_t ml, const uint8_t *name, size_t nl, uint8_t *g) {
    if (ml != 13 || memcmp(mod, "sshrpc._types", 13)) return -1;
#define G(s, k) if (nl == sizeof(s) - 1 && !memcmp(name, s, nl)) { *g = k; return 0; }
    G("Atom", G_ATOM)
    G("BitString", G_BITSTRING)
    G("ImproperList", G_IMPROPER)
    G("Map", G_MAP)
    G("Pid", G_OPAQUE)
    G("Port", G_OPAQUE)
    G("Reference", G_OPAQUE)
    G("Fun", G_OPAQUE)
    G("Export", G_OPAQUE)
#undef G
    return -1;
}

/* Parse the pickle stream into the tape; returns the root node or < 0. */
static int64_t tape(enc_t *e, const uint8_t *s, size_t len) {
    priv_t *pv = e->pv;
    size_t pos = 0, nv = 0, nm = 0, nmemo = pv->pre_memo;
    int64_t id;
#define VNEED(k) if (grow((void **)&pv->vstack, &pv->vstack_cap, nv + (k), sizeof(uint32_t))) return -2
#define PUSH(x) do { VNEED(1); pv->vstack[nv++] = (uint32_t)(x); } while (0)
#define POP(dst) do { if (nv <= (nm ? pv->marks[nm - 1] : 0)) return -1; (dst) = pv->vstack[--nv]; } while (0)
#define TAKE(k) if ((uint64_t)(k) > len - pos) return -1
#define NODE(kind) do { id = new_node(e, (kind)); if (id < 0) return id; } while (0)
    if (len > 0xFFFFFFF0u) return -1;
    for (;;) {
        TAKE(1);
        uint8_t op = s[pos++];
        switch (op) {
        case 0x80: TAKE(1); pos += 1; break;              /* PROTO */
        case 0x95: TAKE(8); pos += 8; break;              /* FRAME */
        case '.':                                        /* STOP */
            if (nv != 1 || nm || pos != len) return -1;
            e->nmemo = nmemo;
            return pv->vstack[0];
        case 0x94:                                       /* MEMOIZE */
            if (!nv) return -1;
            if (grow((void **)&pv->memo, &pv->memo_cap, nmemo + 1, sizeof(uint32_t))) return -2;
            pv->memo[nmemo++] = pv->vstack[nv - 1];
            break;
        case 'q': case 'r': {                            /* BINPUT, LONG_BINPUT */
            size_t k = op == 'q' ? 1 : 4;
            TAKE(k);
            uint64_t idx = le_n(s + pos, (int)k);
            pos += k;
            if (!nv || idx > 0xFFFFFFF0u) return -1;
            if (grow((void **)&pv->memo, &pv->memo_cap, idx + 1, sizeof(uint32_t))) return -2;
            while (nmemo <= idx) pv->memo[nmemo++] = 0xFFFFFFFFu;
            pv->memo[idx] = pv->vstack[nv - 1];
            break;
        }
        case 'h': case 'j': {                            /* BINGET, LONG_BINGET */
            size_t k = op == 'h' ? 1 : 4;
            TAKE(k);
            uint64_t idx = le_n(s + pos, (int)k);
            pos += k;
            if (idx >= nmemo || pv->memo[idx] == 0xFFFFFFFFu) return -1;
            PUSH(pv->memo[idx]);
            break;
        }
        case 'N': NODE(N_NONE); PUSH(id); break;
        case 0x88: NODE(N_TRUE); PUSH(id); break;
        case 0x89: NODE(N_FALSE); PUSH(id); break;
        case 'K': TAKE(1); NODE(N_INT); e->nodes[id].ival = s[pos]; pos += 1; PUSH(id); break;
        case 'M': TAKE(2); NODE(N_INT); e->nodes[id].ival = (int64_t)le_n(s + pos, 2); pos += 2; PUSH(id); break;
        case 'J': TAKE(4); NODE(N_INT); e->nodes[id].ival = (int32_t)(uint32_t)le_n(s + pos, 4); pos += 4; PUSH(id); break;
        case 0x8a: case 0x8b: {                          /* LONG1, LONG4 */
            size_t k = op == 0x8a ? 1 : 4;
            TAKE(k);
            uint64_t n = le_n(s + pos, (int)k);
            pos += k;
            TAKE(n);
            NODE(N_LONG);
            e->nodes[id].ptr = s + pos;
            e->nodes[id].len = n;
            pos += n;
            PUSH(id);
            break;
        }
        case 'G':
            TAKE(8);
            /* not finite: let the reference encoder raise */
            if ((((s[pos] & 0x7F) << 4) | (s[pos + 1] >> 4)) == 0x7FF) return -1;
            NODE(N_FLOAT);
            e->nodes[id].ptr = s + pos;
            pos += 8;
            PUSH(id);
            break;
        case 0x8c: case 'X': case 0x8d:                  /* str */
        case 'C': case 'B': case 0x8e: case 0x96: {      /* bytes, bytearray */
            size_t k = (op == 0x8c || op == 'C') ? 1 : (op == 'X' || op == 'B') ? 4 : 8;
            TAKE(k);
            uint64_t n = le_n(s + pos, (int)k);
            pos += k;
            TAKE(n);
            int is_str = op == 0x8c || op == 'X' || op == 0x8d;
            if (is_str) {
                /* pickle writes lone surrogates; str.encode("utf-8") refuses them */
                const uint8_t *q = s + pos, *end = s + pos + n;
                while ((q = memchr(q, 0xED, (size_t)(end - q))) != NULL) {
                    if (q + 1 < end && q[1] >= 0xA0) return -1;
                    q++;
                }
            }
            NODE(is_str ? N_STR : N_BYTES);
            e->nodes[id].ptr = s + pos;
            e->nodes[id].len = n;
            pos += n;
            PUSH(id);
            break;
        }
        case '(':
            if (grow((void **)&pv->marks, &pv->marks_cap, nm + 1, sizeof(size_t))) return -2;
            pv->marks[nm++] = nv;
            break;
        case ')': NODE(N_TUPLE); PUSH(id); break;
        case 0x85: case 0x86: case 0x87: case 't': {
            size_t base;
            if (op == 't') {
                if (!nm) return -1;
                base = pv->marks[--nm];
            } else {
                size_t k = (size_t)(op - 0x84);
                size_t floor = nm ? pv->marks[nm - 1] : 0;
                if (nv < floor + k) return -1;
                base = nv - k;
            }
            NODE(N_TUPLE);
            for (size_t i = base; i < nv; i++)
                if (add_child(e, (uint32_t)id, pv->vstack[i])) return -2;
            nv = base;
            PUSH(id);
            break;
        }
        case ']': NODE(N_LIST); PUSH(id); break;
        case '}': NODE(N_DICT); PUSH(id); break;
        case 'a': case 's': {                            /* APPEND, SETITEM */
            size_t k = op == 'a' ? 1 : 2;
            size_t floor = nm ? pv->marks[nm - 1] : 0;
            if (nv < floor + k + 1) return -1;
            uint32_t target = pv->vstack[nv - k - 1];
            if (e->nodes[target].kind != (op == 'a' ? N_LIST : N_DICT)) return -1;
            for (size_t i = nv - k; i < nv; i++)
                if (add_child(e, target, pv->vstack[i])) return -2;
            nv -= k;
            break;
        }
        case 'e': case 'u': {                            /* APPENDS, SETITEMS */
            if (!nm) return -1;
            size_t base = pv->marks[--nm];
            size_t floor = nm ? pv->marks[nm - 1] : 0;
            if (base < floor + 1) return -1;
            uint32_t target = pv->vstack[base - 1];
            if (e->nodes[target].kind != (op == 'e' ? N_LIST : N_DICT)) return -1;
            if (op == 'u' && (nv - base) % 2) return -1;
            for (size_t i = base; i < nv; i++)
                if (add_child(e, target, pv->vstack[i])) return -2;
            nv = base;
            break;
        }
        case 0x93: {                                     /* STACK_GLOBAL */
            uint32_t name, mod;
            POP(name);
            POP(mod);
            enode *nn = &e->nodes[name], *mn = &e->nodes[mod];
            if (nn->kind != N_STR || mn->kind != N_STR) return -1;
            uint8_t g;
            if (gkind_of(mn->ptr, mn->len, nn->ptr, nn->len, &g)) return -1;
            NODE(N_GLOBAL);
            e->nodes[id].gkind = g;
            PUSH(id);
            break;
        }
        case 'R': {                                      /* REDUCE */
            uint32_t args, fn;
            POP(args);
            POP(fn);
            enode *a = &e->nodes[args], *f = &e->nodes[fn];
            if (f->kind != N_GLOBAL || a->kind != N_TUPLE) return -1;
            uint32_t a0 = a->count ? e->cells[a->first].node : 0;
            uint32_t a1 = a->count > 1 ? e->cells[e->cells[a->first].next].node : 0;
            switch (f->gkind) {
            case G_ATOM:
                if (a->count != 1 || e->nodes[a0].kind != N_STR) return -1;
                NODE(N_ATOM);
                e->nodes[id].ptr = e->nodes[a0].ptr;
                e->nodes[id].len = e->nodes[a0].len;
                break;
            case G_OPAQUE:
                if (a->count != 1 || e->nodes[a0].kind != N_BYTES) return -1;
                NODE(N_OPAQUE);
                e->nodes[id].ptr = e->nodes[a0].ptr;
                e->nodes[id].len = e->nodes[a0].len;
                break;
            case G_BITSTRING:
                if (a->count != 2 || e->nodes[a0].kind != N_BYTES || e->nodes[a1].kind != N_INT ||
                    e->nodes[a1].ival < 0 || e->nodes[a1].ival > 255)
                    return -1;
                NODE(N_BITSTR);
                e->nodes[id].ptr = e->nodes[a0].ptr;
                e->nodes[id].len = e->nodes[a0].len;
                e->nodes[id].ival = e->nodes[a1].ival;
                break;
            case G_IMPROPER:
                if (a->count != 2 || e->nodes[a0].kind != N_LIST) return -1;
                NODE(N_IMPROPER);
                e->nodes[id].first = a0;
                e->nodes[id].last = a1;
                break;
            default: /* G_MAP */
                if (a->count != 1 || e->nodes[a0].kind != N_LIST) return -1;
                for (uint32_t c = e->nodes[a0].first; c != NIL_CELL; c = e->cells[c].next) {
                    enode *pair = &e->nodes[e->cells[c].node];
                    if (pair->kind != N_TUPLE || pair->count != 2) return -1;
                }
                NODE(N_MAP);
                e->nodes[id].first = a0;
                break;
            }
            PUSH(id);
            break;
        }
        default:
            return -1;
        }
    }
#undef VNEED
#undef PUSH
#undef POP
#undef TAKE
#undef NODE
}

static inline uint8_t *eroom(enc_t *e, size_t n) {
    if (n > e->cap - e->len) {
        if (e->len + n < e->len) return NULL;
        if (grow((void **)&e->io->out, &e->pv->out_cap, e->len + n, 1)) return NULL;
        if (e->fixed) { /* outgrew the caller's buffer: continue in ours */
            memcpy(e->io->out, e->base, e->len);
            e->fixed = 0;
        }
        e->base = e->io->out;
        e->cap = e->pv->out_cap;
    }
    uint8_t *w = e->base + e->len;
    e->len += n;
    return w;
}

#define EW(n)                            \
    uint8_t *w = eroom(e, (n));          \
    if (!w) return -2;

static inline void be32w(uint8_t *w, uint32_t v) {
    w[0] = (uint8_t)(v >> 24);
    w[1] = (uint8_t)(v >> 16);
    w[2] = (uint8_t)(v >> 8);
    w[3] = (uint8_t)v;
}

static int e_atom(enc_t *e, const uint8_t *name, size_t n) {
    size_t chars = 0;
    for (size_t i = 0; i < n; i++) chars += (name[i] & 0xC0) != 0x80;
    if (chars > 255) return -1;
    if (n <= 255) {
        EW(2 + n);
        w[0] = 119;
        w[1] = (uint8_t)n;
        memcpy(w + 2, name, n);
    } else {
        EW(3 + n);
        w[0] = 118;
        w[1] = (uint8_t)(n >> 8);
        w[2] = (uint8_t)n;
        memcpy(w + 3, name, n);
    }
    return 0;
}

static int e_int64(enc_t *e, int64_t v) {
    if (v >= 0 && v <= 255) {
        EW(2);
        w[0] = 97;
        w[1] = (uint8_t)v;
    } else if (v >= -2147483648LL && v <= 2147483647LL) {
        EW(5);
        w[0] = 98;
        be32w(w + 1, (uint32_t)(int32_t)v);
    } else {
        uint64_t m = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
        uint8_t n = 0;
        for (uint64_t t = m; t; t >>= 8) n++;
        EW(3 + n);
        w[0] = 110;
        w[1] = n;
        w[2] = v < 0;
        for (int i = 0; i < n; i++) w[3 + i] = (uint8_t)(m >> (8 * i));
    }
    return 0;
}

/* A two's complement little-endian integer (pickle LONG1/LONG4). */
static int e_long(enc_t *e, const uint8_t *p, size_t n) {
    if (n == 0) return e_int64(e, 0);
    int neg = p[n - 1] & 0x80;
    if (n <= 8) {
        uint64_t u = le_n(p, (int)n);
        if (neg && n < 8) u |= ~(uint64_t)0 << (8 * n);
        int64_t v = (int64_t)u;
        if (!(neg && n == 8 && v == INT64_MIN)) return e_int64(e, v);
    }
    /* magnitude: negate in place into the output */
    size_t m = n;
    uint8_t *tmp = malloc(n);
    if (!tmp) return -2;
    if (neg) {
        unsigned carry = 1;
        for (size_t i = 0; i < n; i++) {
            unsigned v = (uint8_t)~p[i] + carry;
            tmp[i] = (uint8_t)v;
            carry = v >> 8;
        }
    } else {
        memcpy(tmp, p, n);
    }
    while (m && !tmp[m - 1]) m--;
    uint8_t *w = eroom(e, 6 + m);
    if (!w) {
        free(tmp);
        return -2;
    }
    if (m <= 255) {
        w[0] = 110;
        w[1] = (uint8_t)m;
        w[2] = neg ? 1 : 0;
        memcpy(w + 3, tmp, m);
        e->len -= 3;
    } else {
        w[0] = 111;
        be32w(w + 1, (uint32_t)m);
        w[5] = neg ? 1 : 0;
        memcpy(w + 6, tmp, m);
    }
    free(tmp);
    return 0;
}

/* Binaries of SPLICE_MIN bytes or more are not copied: the caller joins
 * the output with slices of the pickle stream at the recorded splices
 * (output offset, stream offset, length), so the data is copied once. */
#define SPLICE_MIN 65536
static int e_binary(enc_t *e, uint8_t tag, const uint8_t *p, uint64_t n) {
    if (n > 0xFFFFFFFFu) return -1;
    if (n >= SPLICE_MIN) {
        sshrpc_io *io = e->io;
        EW(5);
        w[0] = tag;
        be32w(w + 1, (uint32_t)n);
        if (grow((void **)&io->oob, &e->pv->oob_cap, 3 * io->n_oob + 3, sizeof(uint64_t)))
            return -2;
        io->oob[3 * io->n_oob] = e->len;
        io->oob[3 * io->n_oob + 1] = (uint64_t)(p - e->stream);
        io->oob[3 * io->n_oob + 2] = n;
        io->n_oob++;
        e->spliced += n;
        return 0;
    }
    EW(5 + n);
    w[0] = tag;
    be32w(w + 1, (uint32_t)n);
    memcpy(w + 5, p, n);
    return 0;
}

/* Give back a large tape array, keeping its first `keep` entries. */
static int shrink(void **ptr, size_t *cap, size_t keep, size_t elem) {
    if (*cap <= 65536) return 0;
    size_t n = keep > 16 ? keep : 16;
    void *p = malloc(n * elem);
    if (!p) return -1;
    if (keep) memcpy(p, *ptr, keep * elem);
    free(*ptr);
    *ptr = p;
    *cap = n;
    return 0;
}

typedef struct {
    uint32_t node, cell;
    uint64_t depth;
    uint8_t sub;
} eframe;

static int emit_tape(enc_t *e, uint32_t root, uint64_t max_depth) {
    eframe *st = e->pv->estack;
    size_t nst = 0, cap = e->pv->estack_cap;
    int rc = 0;
    uint32_t cur = root;
    uint64_t depth = 0;
    for (;;) {
        /* emit `cur` at `depth` */
        enode *n = &e->nodes[cur];
        int push = 0;
        switch (n->kind) {
        case N_NONE: rc = e_atom(e, (const uint8_t *)"undefined", 9); break;
        case N_TRUE: rc = e_atom(e, (const uint8_t *)"true", 4); break;
        case N_FALSE: rc = e_atom(e, (const uint8_t *)"false", 5); break;
        case N_ATOM: rc = e_atom(e, n->ptr, n->len); break;
        case N_INT: rc = e_int64(e, n->ival); break;
        case N_LONG: rc = e_long(e, n->ptr, n->len); break;
        case N_FLOAT: {
            uint8_t *w = eroom(e, 9);
            if (!w) { rc = -2; break; }
            w[0] = 70;
            memcpy(w + 1, n->ptr, 8);
            break;
        }
        case N_STR: case N_BYTES: rc = e_binary(e, 109, n->ptr, n->len); break;
        case N_OPAQUE: {
            uint8_t *w = eroom(e, n->len);
            if (!w) { rc = -2; break; }
            memcpy(w, n->ptr, n->len);
            break;
        }
        case N_BITSTR: {
            if (n->len > 0xFFFFFFFFu) { rc = -1; break; }
            uint8_t *w = eroom(e, 6 + n->len);
            if (!w) { rc = -2; break; }
            w[0] = 77;
            be32w(w + 1, (uint32_t)n->len);
            w[5] = (uint8_t)n->ival;
            memcpy(w + 6, n->ptr, n->len);
            break;
        }
        case N_TUPLE: {
            if (depth >= max_depth) { rc = -1; break; }
            uint8_t *w = eroom(e, n->count <= 255 ? 2 : 5);
            if (!w) { rc = -2; break; }
            if (n->count <= 255) {
                w[0] = 104;
                w[1] = (uint8_t)n->count;
            } else {
                w[0] = 105;
                be32w(w + 1, n->count);
            }
            push = n->count > 0;
            break;
        }
        case N_LIST: {
            if (n->count == 0) {
                uint8_t *w = eroom(e, 1);
                if (!w) { rc = -2; break; }
                w[0] = 106;
                break;
            }
            if (n->bytes_only && n->count <= 65535) {
                uint8_t *w = eroom(e, 3 + n->count);
                if (!w) { rc = -2; break; }
                w[0] = 107;
                w[1] = (uint8_t)(n->count >> 8);
                w[2] = (uint8_t)n->count;
                size_t i = 3;
                for (uint32_t c = n->first; c != NIL_CELL; c = e->cells[c].next)
                    w[i++] = (uint8_t)e->nodes[e->cells[c].node].ival;
                break;
            }
            if (depth >= max_depth) { rc = -1; break; }
            uint8_t *w = eroom(e, 5);
            if (!w) { rc = -2; break; }
            w[0] = 108;
            be32w(w + 1, n->count);
            push = 1;
            break;
        }
        case N_DICT: case N_MAP: {
            if (depth >= max_depth) { rc = -1; break; }
            uint32_t count = n->kind == N_DICT ? n->count / 2 : e->nodes[n->first].count;
            uint8_t *w = eroom(e, 5);
            if (!w) { rc = -2; break; }
            w[0] = 116;
            be32w(w + 1, count);
            push = count > 0;
            break;
        }
        case N_IMPROPER: {
            if (depth >= max_depth) { rc = -1; break; }
            uint8_t *w = eroom(e, 5);
            if (!w) { rc = -2; break; }
            w[0] = 108;
            be32w(w + 1, e->nodes[n->first].count);
            push = 1;
            break;
        }
        default:
            rc = -1;
        }
        if (rc) break;
        if (push) {
            if (grow((void **)&st, &cap, nst + 1, sizeof(eframe))) { rc = -2; break; }
            eframe *f = &st[nst++];
            f->node = cur;
            f->depth = depth + 1;
            f->sub = 0;
            uint32_t items = (n->kind == N_IMPROPER || n->kind == N_MAP) ? n->first : cur;
            f->cell = e->nodes[items].first;
        }
        /* find the next node to emit */
        for (;;) {
            if (!nst) goto done;
            eframe *f = &st[nst - 1];
            enode *fn = &e->nodes[f->node];
            if (f->cell != NIL_CELL) {
                uint32_t child = e->cells[f->cell].node;
                if (fn->kind == N_MAP) {
                    enode *pair = &e->nodes[child];
                    uint32_t kc = pair->first;
                    if (f->sub == 0) {
                        cur = e->cells[kc].node;
                        f->sub = 1;
                    } else {
                        cur = e->cells[e->cells[kc].next].node;
                        f->sub = 0;
                        f->cell = e->cells[f->cell].next;
                    }
                } else {
                    cur = child;
                    f->cell = e->cells[f->cell].next;
                }
                depth = f->depth;
                break;
            }
            nst--;
            if (fn->kind == N_LIST) {
                uint8_t *w = eroom(e, 1);
                if (!w) { rc = -2; goto done; }
                w[0] = 106;
            } else if (fn->kind == N_IMPROPER) {
                cur = fn->last;
                depth = f->depth;
                break;
            }
        }
    }
done:
    e->pv->estack = st;
    e->pv->estack_cap = cap;
    if (shrink(&e->pv->estack, &e->pv->estack_cap, 0, sizeof(eframe)) && !rc) rc = -2;
    return rc;
}

int sshrpc_enc_preamble(sshrpc_io *io, const char *data, size_t len) {
    priv_t *pv = PRIV(io);
    enc_t ee;
    memset(&ee, 0, sizeof ee);
    ee.io = io;
    ee.pv = pv;
    pv->pre_nodes = pv->pre_cells = pv->pre_memo = 0;
    ee.nodes = pv->nodes;
    ee.cells = pv->cells;
    int64_t root = tape(&ee, (const uint8_t *)data, len);
    if (root < 0) return (int)root;
    pv->pre_nodes = ee.n_nodes;
    pv->pre_cells = ee.n_cells;
    pv->pre_memo = ee.nmemo;
    return 0;
}

int64_t sshrpc_pickle_to_etf(sshrpc_io *io, const char *data, size_t len, uint64_t max_depth,
                             size_t reserve, char *out, size_t cap) {
    priv_t *pv = PRIV(io);
    enc_t ee;
    memset(&ee, 0, sizeof ee);
    enc_t *e = &ee;
    e->io = io;
    e->pv = pv;
    e->nodes = pv->nodes;
    e->cells = pv->cells;
    e->n_nodes = pv->pre_nodes;
    e->n_cells = pv->pre_cells;
    e->base = (uint8_t *)out;
    e->cap = cap;
    e->fixed = 1;
    e->stream = (const uint8_t *)data;
    io->n_oob = 0;
    if (pv->out_cap > ((size_t)4 << 20)) {
        free(io->out);
        io->out = NULL;
        pv->out_cap = 0;
    }
    uint8_t *w = eroom(e, reserve + 1);
    if (!w) return -2;
    memset(w, 0, reserve);
    w[reserve] = 131;
    int64_t root = tape(e, (const uint8_t *)data, len);
    int rc = root < 0 ? (int)root : emit_tape(e, (uint32_t)root, max_depth);
    if (rc == 0 && reserve >= 4) {
        uint64_t n = e->len - reserve + e->spliced;
        if (n > 0xFFFFFFFFu) rc = -1;
        else be32w(e->base + reserve - 4, (uint32_t)n);
    }
    if (shrink((void **)&pv->nodes, &pv->nodes_cap, pv->pre_nodes, sizeof(enode)) ||
        shrink(&pv->cells, &pv->cells_cap, pv->pre_cells, sizeof(ecell)) ||
        shrink((void **)&pv->memo, &pv->memo_cap, pv->pre_memo, sizeof(uint32_t)))
        rc = -2;
    if (rc) return rc;
    io->out_len = e->len;
    return (int64_t)e->len * 4 + (io->n_oob ? 2 : 0) + (e->fixed ? 0 : 1);
}

const char *sshrpc_io_out(sshrpc_io *io) { return (const char *)io->out; }
