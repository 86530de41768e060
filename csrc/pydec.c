/* pydec.c: a direct decoder for the common small terms (csrc/README.md,
 * "decode, first: the direct decoder").
 *
 * The mirror image of pyenc.c, installed the same way: the one cffi function
 * it exports, sshrpc_pydec_install, takes the GIL and puts two builtins (a
 * PyCFunction over a static PyMethodDef) into a dict the caller names by
 * address: decode_direct, below, and entry, which makes the public
 * sshrpc.decode / sshrpc.decode_cost (keyword arguments as the Python
 * signature; a call they cannot take, or a term the direct decoder hands on,
 * goes unchanged to a Python fallback function).  Python then calls them
 * directly, with the GIL held.
 *
 * decode_direct(data, max_depth, max_big, max_cost, want_cost) builds
 * the Python objects straight from ETF for the tags SMALL_INTEGER, INTEGER,
 * SMALL_BIG (at most 8 digit bytes, fitting a C long long or unsigned long
 * long), NEW_FLOAT, the four atom tags, SMALL_TUPLE/LARGE_TUPLE, NIL, STRING,
 * LIST (with a NIL tail only), BINARY and MAP (keys that are not tuples,
 * lists or maps, all distinct in Python), nested at most 256 levels.  It
 * returns the value (want_cost False) or (value, cost) (want_cost True), or
 * NotImplemented for anything else: another tag, a compressed term, any
 * malformed input, nesting at max_depth, a cost past max_cost, a bignum past
 * max_big, a list tail other than NIL, a map whose keys collide.  The caller
 * then takes the transcoder path (etf.c), which gives the same value or
 * raises the reference's exact error.  NotImplemented is never a decoded
 * value, so it can mark "not handled" even where None (the atom undefined)
 * is one.  It never raises: any Python error while building (MemoryError)
 * is cleared and the call answers NotImplemented, so the transcoder path
 * decides that case too.
 *
 * The cost is the reference's (sshrpc._etf.TERM_COST): each tag read as a
 * term, list tails included, adds its cost; past max_cost the call gives up.
 *
 * Atoms are cached per process in a fixed table (at most PYDEC_ATOMS
 * entries, never evicted, never grown), keyed by their raw bytes and
 * encoding; a peer sending new atoms past that costs one Atom per use.  The
 * table is only read and written with the GIL held and without any Python
 * code in between (a lookup, or a re-probe and insert after the new Atom is
 * built), so threads and re-entrant calls from finalizers see a consistent
 * table.  Only the stable ABI (3.11) is used, because the cffi module is
 * built as abi3.
 */
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pydec.h"

/* Recursion on the C stack is bounded by this; deeper terms fall back. */
#define PYDEC_MAX_NEST 256
/* Atoms the process keeps ready (the transcoder's per-thread ATOM_CACHE). */
#define PYDEC_ATOMS 4096
#define PYDEC_SLOTS 8192 /* a power of two, at least twice PYDEC_ATOMS */
/* Terms at least this long decode with the cyclic GC paused (as
 * _codec.GC_PAUSE_MIN for the transcoder's path). */
#define PYDEC_GC_PAUSE_MIN (64 * 1024)

static PyObject *atom_type; /* sshrpc._types.Atom, a strong reference */

typedef struct {
    PyObject *atom; /* a strong reference, NULL for an empty slot */
    unsigned char *raw;
    uint32_t hash;
    uint16_t len;
    uint8_t kind; /* 0 ASCII, 1 Latin-1, 2 UTF-8 */
} atom_slot;

static atom_slot atom_table[PYDEC_SLOTS];
static unsigned atom_count;

typedef struct {
    const unsigned char *s;
    size_t len, pos;
    uint64_t max_depth, max_big, max_cost, cost;
} dec;

/* The reference's TERM_COST for the tags handled here (sshrpc._etf). */
enum {
    C_SMALL_INT = 6,
    C_INT = 16,
    C_FLOAT = 32,
    C_ATOM = 80,
    C_TUPLE = 64,
    C_NIL = 72,
    C_STRING = 256,
    C_LIST = 256,
    C_BINARY = 48,
    C_BIG = 48,
    C_MAP = 256,
};

#define CHARGE(d, c)                                  \
    do {                                              \
        (d)->cost += (c);                             \
        if ((d)->cost > (d)->max_cost) return NULL;   \
    } while (0)

#define NEED(d, n)                                    \
    do {                                              \
        if ((d)->len - (d)->pos < (size_t)(n)) return NULL; \
    } while (0)

static inline uint32_t get32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static PyObject *atom(dec *d, int utf8, size_t n) {
    NEED(d, n);
    const unsigned char *raw = d->s + d->pos;
    d->pos += n;
    /* The reference maps these three by name, whatever the tag. */
    if (n == 4 && memcmp(raw, "true", 4) == 0) return Py_NewRef(Py_True);
    if (n == 5 && memcmp(raw, "false", 5) == 0) return Py_NewRef(Py_False);
    if (n == 9 && memcmp(raw, "undefined", 9) == 0) return Py_NewRef(Py_None);
    /* Over 255 characters is the reference's error: Latin-1 has a character
     * per byte, UTF-8 at most four bytes per character. */
    if (n > (utf8 ? 1020u : 255u)) return NULL;
    uint32_t h = 2166136261u;
    int ascii = 1;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ raw[i]) * 16777619u;
        ascii &= raw[i] < 128;
    }
    uint8_t kind = ascii ? 0 : (utf8 ? 2 : 1);
    h ^= kind;
    unsigned i = h & (PYDEC_SLOTS - 1);
    for (;;) {
        atom_slot *a = &atom_table[i];
        if (!a->atom) break;
        if (a->hash == h && a->len == n && a->kind == kind && memcmp(a->raw, raw, n) == 0)
            return Py_NewRef(a->atom);
        i = (i + 1) & (PYDEC_SLOTS - 1);
    }
    PyObject *name = utf8 ? PyUnicode_DecodeUTF8((const char *)raw, (Py_ssize_t)n, NULL)
                          : PyUnicode_DecodeLatin1((const char *)raw, (Py_ssize_t)n, NULL);
    if (!name) return NULL; /* not UTF-8: the reference's error */
    if (PyUnicode_GetLength(name) > 255) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *result = PyObject_CallFunctionObjArgs(atom_type, name, NULL);
    Py_DECREF(name);
    if (!result || atom_count >= PYDEC_ATOMS || Py_TYPE(result) != (PyTypeObject *)atom_type)
        return result;
    /* Building the atom may have run other code (a collection, a finalizer,
     * another thread) that changed the table: probe again before inserting. */
    i = h & (PYDEC_SLOTS - 1);
    for (;;) {
        atom_slot *a = &atom_table[i];
        if (!a->atom) break;
        if (a->hash == h && a->len == n && a->kind == kind && memcmp(a->raw, raw, n) == 0)
            return result;
        i = (i + 1) & (PYDEC_SLOTS - 1);
    }
    unsigned char *copy = malloc(n ? n : 1);
    if (!copy) return result; /* not cached; the value is still right */
    memcpy(copy, raw, n);
    atom_slot *a = &atom_table[i];
    a->raw = copy;
    a->hash = h;
    a->len = (uint16_t)n;
    a->kind = kind;
    a->atom = Py_NewRef(result);
    atom_count++;
    return result;
}

static PyObject *term(dec *d, uint64_t depth);

/* The items of a tuple or list of n elements, after its header. */
static PyObject *fill(dec *d, PyObject *seq, size_t n, int is_tuple, uint64_t depth) {
    for (size_t i = 0; i < n; i++) {
        PyObject *item = term(d, depth + 1);
        if (!item) {
            Py_DECREF(seq);
            return NULL;
        }
        /* Both steal the reference, also when they fail. */
        if ((is_tuple ? PyTuple_SetItem(seq, (Py_ssize_t)i, item)
                      : PyList_SetItem(seq, (Py_ssize_t)i, item)) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    return seq;
}

static int nestable(dec *d, uint64_t depth) {
    return depth < d->max_depth && depth < PYDEC_MAX_NEST;
}

static PyObject *map(dec *d, uint64_t depth) {
    NEED(d, 4);
    uint32_t n = get32(d->s + d->pos);
    d->pos += 4;
    if ((uint64_t)n * 2 > d->len - d->pos || !nestable(d, depth)) return NULL;
    PyObject *dict = PyDict_New();
    if (!dict) return NULL;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *key = term(d, depth + 1);
        if (!key) goto fail;
        /* Only keys whose hashing and comparison run no Python code and
         * cannot fail: containers (a tuple may hold a list) take the
         * transcoder's path. */
        PyTypeObject *t = Py_TYPE(key);
        if (t == &PyTuple_Type || t == &PyList_Type || t == &PyDict_Type) {
            Py_DECREF(key);
            goto fail;
        }
        PyObject *value = term(d, depth + 1);
        if (!value) {
            Py_DECREF(key);
            goto fail;
        }
        int rc = PyDict_SetItem(dict, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) goto fail;
    }
    /* Keys equal in Python (1, 1.0 and true; one atom in both encodings)
     * make a Map in the reference: the transcoder's path builds it. */
    if (PyDict_Size(dict) != (Py_ssize_t)n) goto fail;
    return dict;
fail:
    Py_DECREF(dict);
    return NULL;
}

static PyObject *term(dec *d, uint64_t depth) {
    NEED(d, 1);
    unsigned tag = d->s[d->pos++];
    const unsigned char *p = d->s + d->pos;
    switch (tag) {
    case 97: /* SMALL_INTEGER_EXT */
        CHARGE(d, C_SMALL_INT);
        NEED(d, 1);
        d->pos += 1;
        return PyLong_FromLong(p[0]);
    case 98: /* INTEGER_EXT */
        CHARGE(d, C_INT);
        NEED(d, 4);
        d->pos += 4;
        return PyLong_FromLong((long)(int32_t)get32(p));
    case 70: { /* NEW_FLOAT_EXT */
        CHARGE(d, C_FLOAT);
        NEED(d, 8);
        uint64_t bits = ((uint64_t)get32(p) << 32) | get32(p + 4);
        double v;
        memcpy(&v, &bits, 8);
        if (!isfinite(v)) return NULL;
        d->pos += 8;
        return PyFloat_FromDouble(v);
    }
    case 110: { /* SMALL_BIG_EXT */
        CHARGE(d, C_BIG);
        NEED(d, 2);
        size_t n = p[0];
        unsigned sign = p[1];
        if (n > d->max_big || n > 8 || sign > 1) return NULL;
        d->pos += 2;
        NEED(d, n);
        uint64_t mag = 0;
        for (size_t i = n; i-- > 0;) mag = (mag << 8) | p[2 + i];
        d->pos += n;
        if (!sign) return PyLong_FromUnsignedLongLong(mag);
        if (mag > (uint64_t)1 << 63) return NULL;
        return PyLong_FromLongLong(mag == (uint64_t)1 << 63 ? INT64_MIN : -(long long)mag);
    }
    case 100: /* ATOM_EXT */
    case 118: /* ATOM_UTF8_EXT */
        CHARGE(d, C_ATOM);
        NEED(d, 2);
        d->pos += 2;
        return atom(d, tag == 118, ((size_t)p[0] << 8) | p[1]);
    case 115: /* SMALL_ATOM_EXT */
    case 119: /* SMALL_ATOM_UTF8_EXT */
        CHARGE(d, C_ATOM);
        NEED(d, 1);
        d->pos += 1;
        return atom(d, tag == 119, p[0]);
    case 104: /* SMALL_TUPLE_EXT */
    case 105: { /* LARGE_TUPLE_EXT */
        CHARGE(d, C_TUPLE);
        size_t n;
        if (tag == 104) {
            NEED(d, 1);
            n = p[0];
            d->pos += 1;
        } else {
            NEED(d, 4);
            n = get32(p);
            d->pos += 4;
        }
        if (n > d->len - d->pos || !nestable(d, depth)) return NULL;
        PyObject *t = PyTuple_New((Py_ssize_t)n);
        if (!t) return NULL;
        return fill(d, t, n, 1, depth);
    }
    case 106: /* NIL_EXT */
        CHARGE(d, C_NIL);
        return PyList_New(0);
    case 107: { /* STRING_EXT: a list of small integers */
        CHARGE(d, C_STRING);
        NEED(d, 2);
        size_t n = ((size_t)p[0] << 8) | p[1];
        d->pos += 2;
        NEED(d, n);
        PyObject *list = PyList_New((Py_ssize_t)n);
        if (!list) return NULL;
        for (size_t i = 0; i < n; i++) {
            PyObject *item = PyLong_FromLong(p[2 + i]);
            if (!item || PyList_SetItem(list, (Py_ssize_t)i, item) < 0) {
                Py_DECREF(list);
                return NULL;
            }
        }
        d->pos += n;
        return list;
    }
    case 108: { /* LIST_EXT, with a NIL tail only */
        CHARGE(d, C_LIST);
        NEED(d, 4);
        size_t n = get32(p);
        d->pos += 4;
        if (n > d->len - d->pos || !nestable(d, depth)) return NULL;
        PyObject *list = PyList_New((Py_ssize_t)n);
        if (!list || !fill(d, list, n, 0, depth)) return NULL;
        if (d->pos >= d->len || d->s[d->pos] != 106) {
            /* another tail (improper, or a list to join): the transcoder */
            Py_DECREF(list);
            return NULL;
        }
        d->pos += 1;
        d->cost += C_NIL;
        if (d->cost > d->max_cost) {
            Py_DECREF(list);
            return NULL;
        }
        return list;
    }
    case 109: { /* BINARY_EXT */
        CHARGE(d, C_BINARY);
        NEED(d, 4);
        size_t n = get32(p);
        d->pos += 4;
        NEED(d, n);
        d->pos += n;
        return PyBytes_FromStringAndSize((const char *)p + 4, (Py_ssize_t)n);
    }
    case 116: /* MAP_EXT */
        CHARGE(d, C_MAP);
        return map(d, depth);
    default:
        return NULL; /* other tags, compressed terms: the transcoder */
    }
}

static int get_limit(PyObject *arg, uint64_t *out) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (overflow || v < 0) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* The direct decoder proper: value, (value, cost), or NotImplemented.
 * Never raises. */
static PyObject *run(PyObject *data, PyObject *max_depth, PyObject *max_big, PyObject *max_cost,
                     int want_cost) {
    dec d;
    char *s;
    Py_ssize_t n;
    if (!PyBytes_CheckExact(data) || PyBytes_AsStringAndSize(data, &s, &n) < 0 ||
        get_limit(max_depth, &d.max_depth) || get_limit(max_big, &d.max_big) ||
        get_limit(max_cost, &d.max_cost)) {
        PyErr_Clear();
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (n < 2 || (unsigned char)s[0] != 131) Py_RETURN_NOTIMPLEMENTED;
    d.s = (const unsigned char *)s;
    d.len = (size_t)n;
    d.pos = 1;
    d.cost = 0;
    /* A term is a tree: collections while its many containers are built
     * only slow it down (_codec.GC_PAUSE_MIN, docs/security.md). */
    int paused = n >= PYDEC_GC_PAUSE_MIN && PyGC_Disable();
    PyObject *value = term(&d, 0);
    if (paused) PyGC_Enable();
    if (value && d.pos != d.len) Py_CLEAR(value); /* trailing bytes */
    if (!value) {
        PyErr_Clear();
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (!want_cost) return value;
    PyObject *cost = PyLong_FromUnsignedLongLong(d.cost);
    PyObject *pair = cost ? PyTuple_Pack(2, value, cost) : NULL;
    Py_DECREF(value);
    Py_XDECREF(cost);
    if (!pair) {
        PyErr_Clear();
        Py_RETURN_NOTIMPLEMENTED;
    }
    return pair;
}

/* decode_direct(data, max_depth, max_big, max_cost, want_cost) */
static PyObject *pydec_direct(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "decode_direct(data, max_depth, max_big, max_cost, want_cost)");
        return NULL;
    }
    return run(args[0], args[1], args[2], args[3], args[4] == Py_True);
}

/* The public entry points sshrpc.decode and sshrpc.decode_cost.
 * entry_cfg[want_cost] is the tuple (fallback, want_cost, default max_depth,
 * default max_big_bytes, default max_cost), a strong reference set by
 * entry() at import.  A call that is one positional argument and the known
 * keywords goes to run(); anything else, and whatever run() does not
 * handle, is passed unchanged to `fallback` (the Python function with the
 * same signature), which decides: the value, or the reference's error. */
static PyObject *entry_cfg[2];

static PyObject *pydec_entry(int want_cost, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    PyObject *cfg = entry_cfg[want_cost];
    if (!cfg) {
        PyErr_SetString(PyExc_RuntimeError, "sshrpc's direct decoder is not set up");
        return NULL;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    if (nargs == 1 && nkw >= 0) {
        PyObject *lim[3] = {PyTuple_GetItem(cfg, 2), PyTuple_GetItem(cfg, 3),
                            PyTuple_GetItem(cfg, 4)};
        Py_ssize_t i;
        for (i = 0; i < nkw; i++) {
            PyObject *key = PyTuple_GetItem(kwnames, i);
            if (!key) break;
            if (PyUnicode_CompareWithASCIIString(key, "max_depth") == 0)
                lim[0] = args[1 + i];
            else if (PyUnicode_CompareWithASCIIString(key, "max_big_bytes") == 0)
                lim[1] = args[1 + i];
            else if (PyUnicode_CompareWithASCIIString(key, "max_cost") == 0)
                lim[2] = args[1 + i];
            else if (PyUnicode_CompareWithASCIIString(key, "max_inflated") != 0)
                break; /* max_inflated matters only to compressed terms */
        }
        if (i == nkw && lim[0] && lim[1] && lim[2]) {
            PyObject *r = run(args[0], lim[0], lim[1], lim[2], want_cost);
            if (r != Py_NotImplemented) return r;
            Py_DECREF(r);
        }
        PyErr_Clear();
    }
    /* The fallback may run any code, even a re-import that replaces
     * entry_cfg: hold what is used. */
    PyObject *fallback = PyTuple_GetItem(cfg, 0);
    if (!fallback) return NULL;
    Py_INCREF(fallback);
    PyObject *pos = PyTuple_New(nargs);
    if (!pos) {
        Py_DECREF(fallback);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SetItem(pos, i, args[i]);
    }
    PyObject *kw = NULL;
    if (nkw > 0) {
        kw = PyDict_New();
        for (Py_ssize_t i = 0; kw && i < nkw; i++) {
            PyObject *key = PyTuple_GetItem(kwnames, i);
            if (!key || PyDict_SetItem(kw, key, args[nargs + i]) < 0) Py_CLEAR(kw);
        }
        if (!kw) {
            Py_DECREF(fallback);
            Py_DECREF(pos);
            return NULL;
        }
    }
    PyObject *result = PyObject_Call(fallback, pos, kw);
    Py_DECREF(fallback);
    Py_DECREF(pos);
    Py_XDECREF(kw);
    return result;
}

static PyObject *pydec_entry_value(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames) {
    return pydec_entry(0, args, nargs, kwnames);
}

static PyObject *pydec_entry_cost(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    return pydec_entry(1, args, nargs, kwnames);
}

static PyMethodDef pydec_direct_def = {
    "decode_direct", (PyCFunction)(void (*)(void))pydec_direct, METH_FASTCALL,
    "decode_direct(data, max_depth, max_big, max_cost, want_cost) -> value, "
    "(value, cost), or NotImplemented to fall back"};

static PyMethodDef pydec_decode_def = {
    "decode", (PyCFunction)(void (*)(void))pydec_entry_value, METH_FASTCALL | METH_KEYWORDS,
    "decode(data, *, max_depth=1000, max_big_bytes=8192, "
    "max_inflated=67108864, max_cost=67108864)\n--\n\n"
    "Decode one complete term, version byte included.\n\n"
    "Exactly ``sshrpc._etf.decode``: raises ``TermError`` (and nothing else)\n"
    "for anything that is not one valid term within the limits.  Common small\n"
    "terms are built directly in C (csrc/pydec.c); everything else goes\n"
    "through ``sshrpc._codec._decode_py``."};

static PyMethodDef pydec_decode_cost_def = {
    "decode_cost", (PyCFunction)(void (*)(void))pydec_entry_cost, METH_FASTCALL | METH_KEYWORDS,
    "decode_cost(data, *, max_depth=1000, max_big_bytes=8192, "
    "max_inflated=67108864, max_cost=67108864)\n--\n\n"
    "``decode``, and the term's cost: the sum of its tags'\n"
    "``sshrpc._etf.TERM_COST``, an estimate of the bytes of objects it became\n"
    "(exactly ``sshrpc._etf.decode_cost``)."};

/* entry(fallback, want_cost, max_depth, max_big_bytes, max_cost, module)
 * -> the public decode (want_cost False) or decode_cost (True) builtin,
 * whose __module__ is `module` (so it pickles by name). */
static PyObject *pydec_make_entry(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "entry(fallback, want_cost, max_depth, max_big_bytes, max_cost, module)");
        return NULL;
    }
    int want_cost = args[1] == Py_True;
    PyObject *cfg = PyTuple_New(5);
    if (!cfg) return NULL;
    for (Py_ssize_t i = 0; i < 5; i++) {
        Py_INCREF(args[i]);
        PyTuple_SetItem(cfg, i, args[i]);
    }
    PyObject *fn = PyCFunction_NewEx(want_cost ? &pydec_decode_cost_def : &pydec_decode_def,
                                     NULL, args[5]);
    if (!fn) {
        Py_DECREF(cfg);
        return NULL;
    }
    PyObject *old = entry_cfg[want_cost];
    entry_cfg[want_cost] = cfg;
    Py_XDECREF(old);
    return fn;
}

static PyMethodDef pydec_make_entry_def = {
    "entry", (PyCFunction)(void (*)(void))pydec_make_entry, METH_FASTCALL,
    "entry(fallback, want_cost, max_depth, max_big_bytes, max_cost, module) -> builtin"};

int sshrpc_pydec_install(void *target, void *atom) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    PyObject *fn = PyCFunction_NewEx(&pydec_direct_def, NULL, NULL);
    PyObject *make = PyCFunction_NewEx(&pydec_make_entry_def, NULL, NULL);
    if (fn && make) {
        if (!atom_type) {
            Py_INCREF((PyObject *)atom);
            atom_type = (PyObject *)atom;
        }
        if (atom_type == (PyObject *)atom &&
            PyDict_SetItemString((PyObject *)target, "decode_direct", fn) == 0)
            rc = PyDict_SetItemString((PyObject *)target, "entry", make);
    }
    Py_XDECREF(fn);
    Py_XDECREF(make);
    if (rc) PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}

/* ---- plain_call: the server's common call, decoded and checked at once ----
 *
 * plain_call(data, max_depth, max_big, max_cost) -> decode_direct(data,
 * max_depth, max_big, max_cost, True), i.e. (value, cost) or NotImplemented,
 * except for a value of the common call's shape, as the first branch of
 * protocol/_connection.py's _srv_call checks it: a tuple {call, Id, M, F,
 * Args} or {call, Id, M, F, Args, #{timeout => Ms}} with `call`, M and F
 * exactly Atoms, Id an exact int in 0..2**64-1, Args an exact list, the
 * options a dict of that one key and Ms an exact int >= 0.  For that it
 * returns the 7-tuple (Id, M, F, Args, Ms or None, cost, value): the
 * protocol's PlainCall.  (Connection.next_events_each; the checks that
 * depend on the connection's state stay there.) */
static PyObject *timeout_key; /* the str "timeout" */

static int is_plain_call(PyObject *v, PyObject **timeout) {
    if (!PyTuple_CheckExact(v)) return 0;
    Py_ssize_t n = PyTuple_Size(v);
    if (n != 5 && n != 6) return 0;
    PyObject *tag = PyTuple_GetItem(v, 0), *id = PyTuple_GetItem(v, 1);
    if (!tag || !id || (PyObject *)Py_TYPE(tag) != atom_type ||
        PyUnicode_CompareWithASCIIString(tag, "call") != 0 || !PyLong_CheckExact(id))
        return 0;
    unsigned long long idv = PyLong_AsUnsignedLongLong(id);
    if (idv == (unsigned long long)-1 && PyErr_Occurred()) { /* negative or past 2**64-1 */
        PyErr_Clear();
        return 0;
    }
    PyObject *m = PyTuple_GetItem(v, 2), *f = PyTuple_GetItem(v, 3), *a = PyTuple_GetItem(v, 4);
    if (!m || !f || !a || (PyObject *)Py_TYPE(m) != atom_type ||
        (PyObject *)Py_TYPE(f) != atom_type || !PyList_CheckExact(a))
        return 0;
    *timeout = Py_None;
    if (n == 5) return 1;
    PyObject *opts = PyTuple_GetItem(v, 5);
    if (!opts || !PyDict_CheckExact(opts) || PyDict_Size(opts) != 1) return 0;
    PyObject *ms = PyDict_GetItemWithError(opts, timeout_key); /* borrowed */
    if (!ms) {
        PyErr_Clear();
        return 0;
    }
    if (!PyLong_CheckExact(ms)) return 0;
    int overflow = 0;
    long long msv = PyLong_AsLongLongAndOverflow(ms, &overflow);
    if (msv == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (overflow < 0 || (!overflow && msv < 0)) return 0;
    *timeout = ms;
    return 1;
}

static PyObject *pydec_plain_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "plain_call(data, max_depth, max_big, max_cost)");
        return NULL;
    }
    PyObject *pair = run(args[0], args[1], args[2], args[3], 1);
    if (!pair || pair == Py_NotImplemented) return pair;
    PyObject *value = PyTuple_GetItem(pair, 0), *cost = PyTuple_GetItem(pair, 1);
    PyObject *timeout = NULL;
    if (!value || !cost || !is_plain_call(value, &timeout)) {
        PyErr_Clear();
        return pair;
    }
    PyObject *out = PyTuple_New(7);
    if (!out) {
        PyErr_Clear();
        return pair;
    }
    PyObject *items[7] = {PyTuple_GetItem(value, 1), PyTuple_GetItem(value, 2),
                          PyTuple_GetItem(value, 3), PyTuple_GetItem(value, 4),
                          timeout, cost, value};
    for (Py_ssize_t i = 0; i < 7; i++) {
        Py_INCREF(items[i]);
        PyTuple_SetItem(out, i, items[i]);
    }
    Py_DECREF(pair);
    return out;
}

static PyMethodDef pydec_plain_call_def = {
    "plain_call", (PyCFunction)(void (*)(void))pydec_plain_call, METH_FASTCALL,
    "plain_call(data, max_depth, max_big, max_cost) -> (Id, M, F, Args, Ms, cost, value) for "
    "the common call, else decode_direct's (value, cost) or NotImplemented"};

/* ---- plain_calls: a read's run of common calls, decoded in place ----
 *
 * plain_calls(read, pos, max_frame, small, opened, max_open, plain,
 *             max_depth, max_big, max_cost, events, costs) -> end
 *
 * The loop of Connection.next_events_each over the common calls of one
 * channel read, without a bytes object per frame: it walks the frames of
 * `read` (exact bytes) from offset `pos` in place (4-byte big-endian length,
 * then the payload; length 0 is a keepalive and is skipped, as
 * FrameBuffer.next_frame skips it) and, for each frame that
 *
 *   - is complete and at most max_frame long,
 *   - is 2..small bytes, starts with 131 and is not compressed (80),
 *   - decodes (decode_direct, within max_depth, max_big and max_cost) to the
 *     common call's shape (plain_call, above), and
 *   - has an id not in the dict `opened`, while len(opened) < max_open,
 *
 * appends its PlainCall (Id, M, F, Args, Ms or None, cost, value) to the
 * list `events` and its cost to the list `costs`, and sets opened[Id] =
 * plain; exactly what the Python loop does for such a frame.  It stops at
 * the first frame that is anything else (incomplete, too large, another
 * term, a bad term, a known id, max_open reached), which it leaves
 * untouched, and returns the offset just past the last frame (or keepalive)
 * it took: the caller's frame buffer goes on from there, and the Python
 * path takes the frame it stopped at, with the errors it raises now.
 *
 * It never raises for the bytes: an error while building (MemoryError)
 * undoes that frame's appends, is cleared, and ends the walk there (the
 * Python path then meets the same frame).  Wrong argument types raise
 * TypeError; a number that is negative or past 2**63-1 takes nothing (it
 * returns `pos` as given). */
static PyObject *pydec_plain_calls(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError,
                        "plain_calls(read, pos, max_frame, small, opened, max_open, plain, "
                        "max_depth, max_big, max_cost, events, costs)");
        return NULL;
    }
    PyObject *read = args[0], *opened = args[4], *plain = args[6], *events = args[10],
             *costs = args[11];
    uint64_t pos, max_frame, small, max_open;
    dec d;
    if (!PyBytes_CheckExact(read) || !PyDict_CheckExact(opened) || !PyList_CheckExact(events) ||
        !PyList_CheckExact(costs) || !PyLong_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "plain_calls: read must be bytes, pos an int, opened a dict, events and "
                        "costs lists");
        return NULL;
    }
    if (get_limit(args[1], &pos) || get_limit(args[2], &max_frame) ||
        get_limit(args[3], &small) || get_limit(args[5], &max_open) ||
        get_limit(args[7], &d.max_depth) || get_limit(args[8], &d.max_big) ||
        get_limit(args[9], &d.max_cost))
        return Py_NewRef(args[1]); /* a limit this walk cannot hold: nothing taken */
    char *base;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(read, &base, &size) < 0) return NULL;
    const unsigned char *s = (const unsigned char *)base;
    size_t n = (size_t)size;
    if (pos > n) pos = n;
    while (n - pos >= 4) {
        size_t length = get32(s + pos);
        if (length > max_frame || n - pos - 4 < length) break;
        if (length == 0) { /* a keepalive */
            pos += 4;
            continue;
        }
        const unsigned char *p = s + pos + 4;
        if (length < 2 || length > small || p[0] != 131 || p[1] == 80) break;
        d.s = p;
        d.len = length;
        d.pos = 1;
        d.cost = 0;
        int paused = length >= PYDEC_GC_PAUSE_MIN && PyGC_Disable();
        PyObject *value = term(&d, 0);
        if (paused) PyGC_Enable();
        if (value && d.pos != d.len) Py_CLEAR(value);
        PyObject *timeout = NULL, *cost = NULL, *out = NULL;
        if (!value || !is_plain_call(value, &timeout)) goto stop;
        PyObject *id = PyTuple_GetItem(value, 1);
        int known = id ? PyDict_Contains(opened, id) : -1;
        if (known != 0 || (uint64_t)PyDict_Size(opened) >= max_open) goto stop;
        cost = PyLong_FromUnsignedLongLong(d.cost);
        out = cost ? PyTuple_New(7) : NULL;
        if (!out) goto stop;
        PyObject *items[7] = {id, PyTuple_GetItem(value, 2), PyTuple_GetItem(value, 3),
                              PyTuple_GetItem(value, 4), timeout, cost, value};
        for (Py_ssize_t i = 0; i < 7; i++) {
            Py_INCREF(items[i]);
            PyTuple_SetItem(out, i, items[i]);
        }
        if (PyList_Append(events, out) < 0) goto stop;
        if (PyList_Append(costs, cost) < 0) {
            PyList_SetSlice(events, PyList_Size(events) - 1, PyList_Size(events), NULL);
            goto stop;
        }
        if (PyDict_SetItem(opened, id, plain) < 0) {
            PyList_SetSlice(events, PyList_Size(events) - 1, PyList_Size(events), NULL);
            PyList_SetSlice(costs, PyList_Size(costs) - 1, PyList_Size(costs), NULL);
            goto stop;
        }
        Py_DECREF(out);
        Py_DECREF(cost);
        Py_DECREF(value);
        pos += 4 + length;
        continue;
    stop:
        Py_XDECREF(out);
        Py_XDECREF(cost);
        Py_XDECREF(value);
        PyErr_Clear();
        break;
    }
    return PyLong_FromSize_t((size_t)pos);
}

static PyMethodDef pydec_plain_calls_def = {
    "plain_calls", (PyCFunction)(void (*)(void))pydec_plain_calls, METH_FASTCALL,
    "plain_calls(read, pos, max_frame, small, opened, max_open, plain, max_depth, max_big, "
    "max_cost, events, costs) -> the offset past the common calls taken from read[pos:]"};

int sshrpc_pydec_install_plain_call(void *target) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    if (!timeout_key) timeout_key = PyUnicode_FromString("timeout");
    PyObject *fn = timeout_key && atom_type ? PyCFunction_NewEx(&pydec_plain_call_def, NULL, NULL)
                                            : NULL;
    PyObject *batch = fn ? PyCFunction_NewEx(&pydec_plain_calls_def, NULL, NULL) : NULL;
    if (batch && PyDict_SetItemString((PyObject *)target, "plain_calls", batch) == 0)
        rc = PyDict_SetItemString((PyObject *)target, "plain_call", fn);
    Py_XDECREF(fn);
    Py_XDECREF(batch);
    if (rc) PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
