/* pyenc.c: a direct encoder for the common exact types (csrc/README.md,
 * "encode: the direct path").
 *
 * cffi cannot pass Python objects to C, and every cffi call releases the
 * GIL.  So this file is not called through cffi at all: the one cffi
 * function it exports, sshrpc_pyenc_install, takes the GIL and puts a
 * builtin function (a PyCFunction over a static PyMethodDef) into a dict the
 * caller names by address.  Python then calls that builtin directly, with
 * the GIL held and without cffi's conversions.
 *
 * The builtin, encode(obj, max_depth, reserve), writes canonical ETF for
 * exact None/bool/int (64-bit)/float/str/bytes/Atom/tuple/list/dict and
 * returns bytes, or returns None for anything else (a subclass, a big int, a
 * non-finite float, an atom over 255 characters, a lone surrogate, a large
 * binary, nesting at the limit, ...) so the caller takes the pickle path or
 * the reference encoder, which produce the same bytes or raise the right
 * error.  It never raises except MemoryError.
 *
 * No Python code runs while it walks the value: it creates no objects that
 * the cyclic GC tracks (str UTF-8 conversions of non-atoms make a temporary
 * bytes, which is not tracked), and calls no __hash__/__eq__/__index__, so
 * the borrowed references it holds stay valid.  Only the stable ABI
 * (3.11) is used, because the cffi module is built as abi3.
 */
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "etf.h"

/* Recursion on the C stack is bounded by this; deeper values fall back. */
#define PYENC_MAX_NEST 256
/* Binaries at least this long fall back (the pickle path joins them in
 * without a copy through C). */
#define PYENC_BIG_BINARY (64 * 1024)

static PyObject *atom_type; /* sshrpc._types.Atom, a strong reference */

typedef struct {
    unsigned char *buf;
    size_t len, cap;
    int heap;
} outbuf;

enum { OK = 0, FALLBACK = -1, NOMEM = -2 };

static int grow(outbuf *o, size_t need) {
    size_t cap = o->cap * 2;
    while (cap < o->len + need) cap *= 2;
    unsigned char *nb;
    if (o->heap) {
        nb = realloc(o->buf, cap);
        if (!nb) return NOMEM;
    } else {
        nb = malloc(cap);
        if (!nb) return NOMEM;
        memcpy(nb, o->buf, o->len);
        o->heap = 1;
    }
    o->buf = nb;
    o->cap = cap;
    return OK;
}

#define NEED(o, n)                                                \
    do {                                                          \
        if ((o)->len + (n) > (o)->cap) {                          \
            int rc_ = grow((o), (n));                             \
            if (rc_) return rc_;                                  \
        }                                                         \
    } while (0)

static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static int put_atom(outbuf *o, const char *s, Py_ssize_t n) {
    NEED(o, (size_t)n + 3);
    unsigned char *p = o->buf + o->len;
    if (n <= 255) {
        p[0] = 119; /* SMALL_ATOM_UTF8_EXT */
        p[1] = (unsigned char)n;
        memcpy(p + 2, s, (size_t)n);
        o->len += (size_t)n + 2;
    } else {
        p[0] = 118; /* ATOM_UTF8_EXT */
        p[1] = (unsigned char)(n >> 8);
        p[2] = (unsigned char)n;
        memcpy(p + 3, s, (size_t)n);
        o->len += (size_t)n + 3;
    }
    return OK;
}

static int put_binary(outbuf *o, const char *s, Py_ssize_t n) {
    if (n >= PYENC_BIG_BINARY) return FALLBACK;
    NEED(o, (size_t)n + 5);
    unsigned char *p = o->buf + o->len;
    p[0] = 109; /* BINARY_EXT */
    put32(p + 1, (uint32_t)n);
    memcpy(p + 5, s, (size_t)n);
    o->len += (size_t)n + 5;
    return OK;
}

static int put_int(outbuf *o, PyObject *obj) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow) return FALLBACK; /* beyond 64 bits: the pickle path */
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return FALLBACK;
    }
    NEED(o, 11);
    unsigned char *p = o->buf + o->len;
    if (v >= 0 && v <= 255) {
        p[0] = 97; /* SMALL_INTEGER_EXT */
        p[1] = (unsigned char)v;
        o->len += 2;
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
        p[0] = 98; /* INTEGER_EXT */
        put32(p + 1, (uint32_t)(int32_t)v);
        o->len += 5;
    } else {
        uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
        int n = 0;
        p[0] = 110; /* SMALL_BIG_EXT */
        p[2] = v < 0;
        while (mag) {
            p[3 + n++] = (unsigned char)mag;
            mag >>= 8;
        }
        p[1] = (unsigned char)n;
        o->len += 3 + (size_t)n;
    }
    return OK;
}

static int put_float(outbuf *o, PyObject *obj) {
    double d = PyFloat_AsDouble(obj);
    if (!isfinite(d)) return FALLBACK; /* the reference raises TermError */
    uint64_t bits;
    memcpy(&bits, &d, 8);
    NEED(o, 9);
    unsigned char *p = o->buf + o->len;
    p[0] = 70; /* NEW_FLOAT_EXT */
    put32(p + 1, (uint32_t)(bits >> 32));
    put32(p + 5, (uint32_t)bits);
    o->len += 9;
    return OK;
}

static int enc(outbuf *o, PyObject *obj, long long depth, long long max_depth);

static int enc_seq_items(outbuf *o, PyObject *seq, Py_ssize_t n, int is_tuple,
                         long long depth, long long max_depth) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = is_tuple ? PyTuple_GetItem(seq, i) : PyList_GetItem(seq, i);
        if (!item) {
            PyErr_Clear();
            return FALLBACK;
        }
        int rc = enc(o, item, depth + 1, max_depth);
        if (rc) return rc;
    }
    return OK;
}

static int enc(outbuf *o, PyObject *obj, long long depth, long long max_depth) {
    PyTypeObject *t = Py_TYPE(obj);
    if (obj == Py_None) return put_atom(o, "undefined", 9);
    if (obj == Py_True) return put_atom(o, "true", 4);
    if (obj == Py_False) return put_atom(o, "false", 5);
    if (t == &PyLong_Type) return put_int(o, obj);
    if (t == &PyFloat_Type) return put_float(o, obj);
    if (t == &PyBytes_Type) {
        char *s;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(obj, &s, &n) < 0) {
            PyErr_Clear();
            return FALLBACK;
        }
        return put_binary(o, s, n);
    }
    if ((PyObject *)t == atom_type) {
        if (PyUnicode_GetLength(obj) > 255) return FALLBACK;
        /* Atoms are short and recur: caching their UTF-8 form in the object
         * (what PyUnicode_AsUTF8AndSize does for non-ASCII text) is cheap. */
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
        if (!s) {
            PyErr_Clear();
            return FALLBACK;
        }
        return put_atom(o, s, n);
    }
    if (t == &PyUnicode_Type) {
        /* A temporary bytes (not cached in the str, so a large non-ASCII
         * text does not keep a second copy alive). */
        PyObject *raw = PyUnicode_AsUTF8String(obj);
        if (!raw) {
            PyErr_Clear(); /* a lone surrogate: the reference's error */
            return FALLBACK;
        }
        char *s;
        Py_ssize_t n;
        int rc = PyBytes_AsStringAndSize(raw, &s, &n) < 0 ? FALLBACK : put_binary(o, s, n);
        Py_DECREF(raw);
        if (PyErr_Occurred()) PyErr_Clear();
        return rc;
    }
    if (depth >= max_depth || depth >= PYENC_MAX_NEST) return FALLBACK;
    if (t == &PyTuple_Type) {
        Py_ssize_t n = PyTuple_Size(obj);
        if (n < 0 || n > (Py_ssize_t)0xFFFFFFFF) return FALLBACK;
        NEED(o, 5);
        unsigned char *p = o->buf + o->len;
        if (n <= 255) {
            p[0] = 104; /* SMALL_TUPLE_EXT */
            p[1] = (unsigned char)n;
            o->len += 2;
        } else {
            p[0] = 105; /* LARGE_TUPLE_EXT */
            put32(p + 1, (uint32_t)n);
            o->len += 5;
        }
        return enc_seq_items(o, obj, n, 1, depth, max_depth);
    }
    if (t == &PyList_Type) {
        Py_ssize_t n = PyList_Size(obj);
        if (n < 0 || n > (Py_ssize_t)0xFFFFFFFF) return FALLBACK;
        if (n == 0) {
            NEED(o, 1);
            o->buf[o->len++] = 106; /* NIL_EXT */
            return OK;
        }
        if (n <= 65535) {
            /* STRING_EXT when every item is an exact int in 0..255. */
            Py_ssize_t i;
            for (i = 0; i < n; i++) {
                PyObject *item = PyList_GetItem(obj, i);
                if (!item || Py_TYPE(item) != &PyLong_Type) break;
                int overflow = 0;
                long v = PyLong_AsLongAndOverflow(item, &overflow);
                if (overflow || v < 0 || v > 255) break;
            }
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return FALLBACK;
            }
            if (i == n) {
                NEED(o, (size_t)n + 3);
                unsigned char *p = o->buf + o->len;
                p[0] = 107; /* STRING_EXT */
                p[1] = (unsigned char)(n >> 8);
                p[2] = (unsigned char)n;
                for (i = 0; i < n; i++)
                    p[3 + i] = (unsigned char)PyLong_AsLong(PyList_GetItem(obj, i));
                o->len += (size_t)n + 3;
                return OK;
            }
        }
        NEED(o, 5);
        unsigned char *p = o->buf + o->len;
        p[0] = 108; /* LIST_EXT */
        put32(p + 1, (uint32_t)n);
        o->len += 5;
        int rc = enc_seq_items(o, obj, n, 0, depth, max_depth);
        if (rc) return rc;
        NEED(o, 1);
        o->buf[o->len++] = 106;
        return OK;
    }
    if (t == &PyDict_Type) {
        Py_ssize_t n = PyDict_Size(obj);
        if (n < 0 || n > (Py_ssize_t)0xFFFFFFFF) return FALLBACK;
        NEED(o, 5);
        unsigned char *p = o->buf + o->len;
        p[0] = 116; /* MAP_EXT */
        put32(p + 1, (uint32_t)n);
        o->len += 5;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(obj, &pos, &key, &value)) {
            int rc = enc(o, key, depth + 1, max_depth);
            if (rc) return rc;
            rc = enc(o, value, depth + 1, max_depth);
            if (rc) return rc;
        }
        return OK;
    }
    return FALLBACK; /* subclasses, Map, ImproperList, opaque types, ... */
}

static PyObject *pyenc_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode(obj, max_depth, reserve)");
        return NULL;
    }
    int overflow = 0;
    long long max_depth = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (overflow || max_depth < 0) {
        if (PyErr_Occurred()) PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (max_depth == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    long reserve = PyLong_AsLong(args[2]);
    if (reserve != 0 && reserve != 4) {
        if (PyErr_Occurred()) PyErr_Clear();
        Py_RETURN_NONE;
    }
    unsigned char stack[4096];
    outbuf o = {stack, 0, sizeof stack, 0};
    memset(stack, 0, (size_t)reserve);
    o.len = (size_t)reserve;
    stack[o.len++] = 131; /* the version byte */
    int rc = enc(&o, args[0], 0, max_depth);
    PyObject *result = NULL;
    if (rc == OK && o.len - (size_t)reserve > 0xFFFFFFFFu) rc = FALLBACK;
    if (rc == OK) {
        if (reserve) put32(o.buf, (uint32_t)(o.len - (size_t)reserve));
        result = PyBytes_FromStringAndSize((const char *)o.buf, (Py_ssize_t)o.len);
    } else if (rc == NOMEM) {
        PyErr_NoMemory();
    } else {
        result = Py_NewRef(Py_None);
    }
    if (o.heap) free(o.buf);
    return result;
}

static PyMethodDef pyenc_def = {
    "encode_direct", (PyCFunction)(void (*)(void))pyenc_encode, METH_FASTCALL,
    "encode_direct(obj, max_depth, reserve) -> bytes, or None to fall back"};

int sshrpc_pyenc_install(void *target, void *atom) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    PyObject *fn = PyCFunction_NewEx(&pyenc_def, NULL, NULL);
    if (fn) {
        if (!atom_type) {
            Py_INCREF((PyObject *)atom);
            atom_type = (PyObject *)atom;
        }
        if (atom_type == (PyObject *)atom)
            rc = PyDict_SetItemString((PyObject *)target, "encode_direct", fn);
        Py_DECREF(fn);
    }
    if (rc) PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
