/* pycall.c: one sshrpc call frame in one C call (the client's per-call path,
 * protocol/_connection.py ``send_call``).
 *
 * Installed like pyenc.c (a builtin put into a dict the caller names by
 * address; never called through cffi).  The builtin
 *
 *     call_frame(call_id, names, args, timeout) -> bytes | None
 *
 * writes the whole frame: the 4-byte length, then ``{call, Id, M, F, Args}``
 * or ``{call, Id, M, F, Args, #{timeout => T}}``, where ``names`` is the
 * cached encoding of the two atoms M and F (no version bytes) and ``args``
 * is encoded by pyenc.c's ``encode_direct`` (called through its C function
 * pointer, no Python call).  It returns None, having written nothing, when
 * the reference path must decide: an id or timeout that is not an int in
 * 0..2**31-1, ``names`` not bytes, or ``args`` the direct encoder does not
 * take (its None).  The caller checks the frame size against its limit.
 * ``call_frames`` (below) is its batch form, and ``plain_replies`` the
 * client's read side:
 * how many decoded terms of a read are plain replies to open calls.
 * Only the stable ABI (3.11) is used.
 */
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "pycall.h"

typedef PyObject *(*fastcall_fn)(PyObject *, PyObject *const *, Py_ssize_t);

/* The tuple given to the first install: (encode_direct, max_depth, head5,
 * head6, timeout_opts); strong reference, never released. */
static PyObject *config;
static fastcall_fn encode_direct;
static PyObject *encoder, *max_depth, *zero;
static const char *head5, *head6, *topts;
static Py_ssize_t head5_n, head6_n, topts_n;

#define INT31 2147483648LL

/* An exact int in 0..2**31-1 as a long long, -1 for anything else
 * (None, bool and other int subclasses included), with no error left set. */
static long long small_int(PyObject *obj) {
    if (!PyLong_CheckExact(obj)) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (overflow || v < 0 || v >= INT31) return -1;
    return v;
}

static size_t int_size(long long v) { return v < 256 ? 2 : 5; }

static unsigned char *put_int(unsigned char *p, long long v) {
    if (v < 256) {
        *p++ = 97; /* SMALL_INTEGER_EXT */
        *p++ = (unsigned char)v;
    } else {
        *p++ = 98; /* INTEGER_EXT */
        *p++ = (unsigned char)(v >> 24);
        *p++ = (unsigned char)(v >> 16);
        *p++ = (unsigned char)(v >> 8);
        *p++ = (unsigned char)v;
    }
    return p;
}

/* The size (without the 4 length bytes) of one call's payload with args'
 * encoding `b_n` bytes long (version byte dropped). */
static size_t payload_size(long long call_id, Py_ssize_t names_n, Py_ssize_t b_n,
                           long long timeout) {
    size_t size = int_size(call_id) + (size_t)names_n + (size_t)b_n;
    return size + (timeout < 0 ? (size_t)head5_n : (size_t)head6_n + (size_t)topts_n + int_size(timeout));
}

static unsigned char *put_frame(unsigned char *p, size_t size, long long call_id,
                                const char *names, Py_ssize_t names_n, const char *b,
                                Py_ssize_t b_n, long long timeout) {
    p[0] = (unsigned char)(size >> 24);
    p[1] = (unsigned char)(size >> 16);
    p[2] = (unsigned char)(size >> 8);
    p[3] = (unsigned char)size;
    p += 4;
    if (timeout < 0) {
        memcpy(p, head5, (size_t)head5_n);
        p += head5_n;
    } else {
        memcpy(p, head6, (size_t)head6_n);
        p += head6_n;
    }
    p = put_int(p, call_id);
    memcpy(p, names, (size_t)names_n);
    p += names_n;
    memcpy(p, b, (size_t)b_n);
    p += b_n;
    if (timeout >= 0) {
        memcpy(p, topts, (size_t)topts_n);
        p += topts_n;
        p = put_int(p, timeout);
    }
    return p;
}

static PyObject *pycall_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "call_frame(call_id, names, args, timeout)");
        return NULL;
    }
    long long call_id = small_int(args[0]);
    if (call_id < 0 || !PyBytes_Check(args[1])) Py_RETURN_NONE;
    long long timeout = -1;
    if (args[3] != Py_None) {
        timeout = small_int(args[3]);
        if (timeout < 0) Py_RETURN_NONE;
    }
    char *names;
    Py_ssize_t names_n;
    if (PyBytes_AsStringAndSize(args[1], &names, &names_n) < 0) return NULL;
    PyObject *enc_args[3] = {args[2], max_depth, zero};
    PyObject *body = encode_direct(encoder, enc_args, 3);
    if (body == NULL) return NULL; /* MemoryError */
    if (!PyBytes_Check(body)) {
        Py_DECREF(body);
        Py_RETURN_NONE;
    }
    char *b;
    Py_ssize_t b_n;
    if (PyBytes_AsStringAndSize(body, &b, &b_n) < 0 || b_n < 1) {
        Py_DECREF(body);
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    b += 1; /* the version byte */
    b_n -= 1;
    size_t size = payload_size(call_id, names_n, b_n, timeout);
    if (size > 0xFFFFFFFFu) {
        Py_DECREF(body);
        Py_RETURN_NONE;
    }
    PyObject *frame = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(size + 4));
    if (frame == NULL) {
        Py_DECREF(body);
        return NULL;
    }
    put_frame((unsigned char *)PyBytes_AsString(frame), size, call_id, names, names_n, b, b_n,
              timeout);
    Py_DECREF(body);
    return frame;
}

/* plain_replies(terms, opened, reply) -> int: how many of the list `terms`,
 * from its start, are a client's plain replies to open calls -- exact
 * 3-tuples (reply, Id, Value) whose first item is an exact ``Atom`` equal
 * to `reply` (an exact Atom) and whose Id is an exact int that is a key of
 * the dict `opened` -- deleting each such Id from `opened` as it goes and
 * stopping at the first term that is not one.  Raises only MemoryError
 * (or for arguments of the wrong types). */
static PyObject *pycall_replies(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "plain_replies(terms: list, opened: dict, reply)");
        return NULL;
    }
    PyObject *terms = args[0], *opened = args[1], *reply = args[2];
    PyTypeObject *atom = Py_TYPE(reply);
    Py_ssize_t n = PyList_Size(terms), k = 0;
    for (; k < n; k++) {
        PyObject *term = PyList_GetItem(terms, k);
        if (!PyTuple_Check(term) || PyTuple_Size(term) != 3) break;
        PyObject *tag = PyTuple_GetItem(term, 0), *id = PyTuple_GetItem(term, 1);
        if (Py_TYPE(tag) != atom || !PyLong_CheckExact(id)) break;
        if (tag != reply) {
            int eq = PyUnicode_Compare(tag, reply);
            if (eq == -1 && PyErr_Occurred()) return NULL;
            if (eq != 0) break;
        }
        PyObject *open = PyDict_GetItemWithError(opened, id); /* borrowed */
        if (open == NULL) {
            if (PyErr_Occurred()) return NULL;
            break;
        }
        if (PyDict_DelItem(opened, id) < 0) return NULL;
    }
    return PyLong_FromSsize_t(k);
}

/* Whether a frame's payload goes into a read's batch decode (as
 * ``_next_batch`` checks it): exact bytes, 1 < length <= small, the version
 * byte 131 and not compressed (80). */
static int batchable(PyObject *payload, Py_ssize_t small) {
    if (!PyBytes_CheckExact(payload)) return 0;
    Py_ssize_t n = PyBytes_Size(payload);
    if (n <= 1 || n > small) return 0;
    const unsigned char *b = (const unsigned char *)PyBytes_AsString(payload);
    return b[0] == 131 && b[1] != 80;
}

/* take_batchable(ready, payloads, small) -> None: moves the payloads at
 * the head of the deque `ready` that are batchable onto the list
 * `payloads`, in order, stopping at the first that is not (left in
 * `ready`) or when `ready` is empty. */
static PyObject *pycall_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "take_batchable(ready, payloads: list, small)");
        return NULL;
    }
    PyObject *ready = args[0], *payloads = args[1];
    Py_ssize_t small = PyLong_AsSsize_t(args[2]);
    if (small == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t n = PySequence_Size(ready);
    if (n < 0) return NULL;
    for (; n > 0; n--) {
        PyObject *head = PySequence_GetItem(ready, 0);
        if (head == NULL) return NULL;
        int ok = batchable(head, small);
        Py_DECREF(head);
        if (!ok) break;
        PyObject *taken = PyObject_CallMethod(ready, "popleft", NULL);
        if (taken == NULL) return NULL;
        int rc = PyList_Append(payloads, taken);
        Py_DECREF(taken);
        if (rc < 0) return NULL;
    }
    Py_RETURN_NONE;
}

/* join_batch(payloads) -> bytes: the payloads (each an exact bytes with
 * its version byte first) as one list term: 131, LIST_EXT of their count,
 * each payload without its version byte, NIL. */
static PyObject *pycall_join(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "join_batch(payloads: list)");
        return NULL;
    }
    PyObject *payloads = args[0];
    Py_ssize_t n = PyList_Size(payloads);
    size_t total = 7;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *p = PyList_GetItem(payloads, k);
        if (!PyBytes_CheckExact(p) || PyBytes_Size(p) < 1) {
            PyErr_SetString(PyExc_TypeError, "join_batch: payloads must be non-empty bytes");
            return NULL;
        }
        total += (size_t)PyBytes_Size(p) - 1;
    }
    if (n > 0xFFFFFFFFLL || total > (size_t)PY_SSIZE_T_MAX) return PyErr_NoMemory();
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL) return NULL;
    unsigned char *o = (unsigned char *)PyBytes_AsString(out);
    *o++ = 131;
    *o++ = 108; /* LIST_EXT */
    *o++ = (unsigned char)((size_t)n >> 24);
    *o++ = (unsigned char)((size_t)n >> 16);
    *o++ = (unsigned char)((size_t)n >> 8);
    *o++ = (unsigned char)n;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *p = PyList_GetItem(payloads, k);
        Py_ssize_t len = PyBytes_Size(p) - 1;
        memcpy(o, PyBytes_AsString(p) + 1, (size_t)len);
        o += len;
    }
    *o = 106; /* NIL_EXT */
    return out;
}

static PyMethodDef pycall_take_def = {
    "take_batchable", (PyCFunction)(void (*)(void))pycall_take, METH_FASTCALL,
    "take_batchable(ready, payloads, small): move the leading batchable payloads"};
static PyMethodDef pycall_join_def = {
    "join_batch", (PyCFunction)(void (*)(void))pycall_join, METH_FASTCALL,
    "join_batch(payloads) -> the payloads as one list term"};

static PyMethodDef pycall_replies_def = {
    "plain_replies", (PyCFunction)(void (*)(void))pycall_replies, METH_FASTCALL,
    "plain_replies(terms, opened, reply) -> how many leading terms are plain replies "
    "to open calls (their ids taken out of opened)"};

/* call_frames(call_ids, names, arglists, timeout, limit) -> bytes | None:
 * call_frame for each pair of the lists `call_ids` and `arglists` (of equal
 * length, each args an exact list), the frames joined in order.  None,
 * having decided nothing, when call_frame would answer None for one of
 * them, an args is not an exact list, or a payload is above `limit` (the
 * caller's own path then raises the right error). */
static PyObject *pycall_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_Check(args[0]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "call_frames(call_ids: list, names, arglists: list, timeout, limit)");
        return NULL;
    }
    PyObject *ids = args[0], *arglists = args[2];
    Py_ssize_t n = PyList_Size(ids);
    if (n != PyList_Size(arglists) || !PyBytes_Check(args[1])) Py_RETURN_NONE;
    long long timeout = -1;
    if (args[3] != Py_None) {
        timeout = small_int(args[3]);
        if (timeout < 0) Py_RETURN_NONE;
    }
    int overflow = 0;
    long long limit = PyLong_Check(args[4]) ? PyLong_AsLongLongAndOverflow(args[4], &overflow) : -1;
    if (limit == -1 && PyErr_Occurred()) PyErr_Clear();
    if (overflow > 0) limit = 0xFFFFFFFFLL;
    if (limit < 0 || overflow < 0) Py_RETURN_NONE;
    char *names;
    Py_ssize_t names_n;
    if (PyBytes_AsStringAndSize(args[1], &names, &names_n) < 0) return NULL;
    PyObject *bodies = PyList_New(n);
    if (bodies == NULL) return NULL;
    PyObject *result = NULL;
    size_t total = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        long long call_id = small_int(PyList_GetItem(ids, k));
        PyObject *a = PyList_GetItem(arglists, k);
        if (call_id < 0 || !PyList_CheckExact(a)) goto fallback;
        PyObject *enc_args[3] = {a, max_depth, zero};
        PyObject *body = encode_direct(encoder, enc_args, 3);
        if (body == NULL) goto done;
        PyList_SetItem(bodies, k, body); /* steals */
        if (!PyBytes_Check(body) || PyBytes_Size(body) < 1) goto fallback;
        size_t size = payload_size(call_id, names_n, PyBytes_Size(body) - 1, timeout);
        if (size > (unsigned long long)limit) goto fallback;
        total += size + 4;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (result == NULL) goto done;
    unsigned char *p = (unsigned char *)PyBytes_AsString(result);
    for (Py_ssize_t k = 0; k < n; k++) {
        long long call_id = small_int(PyList_GetItem(ids, k));
        PyObject *body = PyList_GetItem(bodies, k);
        const char *b = PyBytes_AsString(body) + 1;
        Py_ssize_t b_n = PyBytes_Size(body) - 1;
        size_t size = payload_size(call_id, names_n, b_n, timeout);
        p = put_frame(p, size, call_id, names, names_n, b, b_n, timeout);
    }
    goto done;
fallback:
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(bodies);
    return result;
}

static PyMethodDef pycall_frames_def = {
    "call_frames", (PyCFunction)(void (*)(void))pycall_frames, METH_FASTCALL,
    "call_frames(call_ids, names, arglists, timeout, limit) -> the frames joined, or None "
    "to fall back"};

static PyMethodDef pycall_def = {
    "call_frame", (PyCFunction)(void (*)(void))pycall_frame, METH_FASTCALL,
    "call_frame(call_id, names, args, timeout) -> the frame bytes, or None to fall back"};

static int take_config(PyObject *cfg) {
    if (!PyTuple_Check(cfg) || PyTuple_Size(cfg) != 5) return -1;
    PyObject *enc = PyTuple_GetItem(cfg, 0);
    if (!PyCFunction_Check(enc)) return -1;
    if (!(PyCFunction_GetFlags(enc) & METH_FASTCALL) || (PyCFunction_GetFlags(enc) & METH_KEYWORDS))
        return -1;
    PyObject *h5 = PyTuple_GetItem(cfg, 2), *h6 = PyTuple_GetItem(cfg, 3),
             *to = PyTuple_GetItem(cfg, 4);
    if (!PyLong_Check(PyTuple_GetItem(cfg, 1)) || !PyBytes_Check(h5) || !PyBytes_Check(h6) ||
        !PyBytes_Check(to))
        return -1;
    char *s;
    if (PyBytes_AsStringAndSize(h5, &s, &head5_n) < 0) return -1;
    head5 = s;
    if (PyBytes_AsStringAndSize(h6, &s, &head6_n) < 0) return -1;
    head6 = s;
    if (PyBytes_AsStringAndSize(to, &s, &topts_n) < 0) return -1;
    topts = s;
    zero = PyLong_FromLong(0);
    if (zero == NULL) return -1;
    Py_INCREF(cfg);
    config = cfg;
    encoder = enc;
    encode_direct = (fastcall_fn)(void (*)(void))PyCFunction_GetFunction(enc);
    max_depth = PyTuple_GetItem(cfg, 1);
    return 0;
}

int sshrpc_pycall_install(void *target, void *cfg) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    if (config != NULL || take_config((PyObject *)cfg) == 0) {
        PyObject *fn = PyCFunction_NewEx(&pycall_def, NULL, NULL);
        if (fn) {
            rc = PyDict_SetItemString((PyObject *)target, "call_frame", fn);
            Py_DECREF(fn);
        }
        fn = rc ? NULL : PyCFunction_NewEx(&pycall_frames_def, NULL, NULL);
        if (fn) {
            rc = PyDict_SetItemString((PyObject *)target, "call_frames", fn);
            Py_DECREF(fn);
        } else {
            rc = -1;
        }
        PyMethodDef *more[] = {&pycall_take_def, &pycall_join_def};
        for (int m = 0; m < 2 && rc == 0; m++) {
            fn = PyCFunction_NewEx(more[m], NULL, NULL);
            if (fn) {
                rc = PyDict_SetItemString((PyObject *)target, more[m]->ml_name, fn);
                Py_DECREF(fn);
            } else {
                rc = -1;
            }
        }
        fn = rc ? NULL : PyCFunction_NewEx(&pycall_replies_def, NULL, NULL);
        if (fn) {
            rc = PyDict_SetItemString((PyObject *)target, "plain_replies", fn);
            Py_DECREF(fn);
        } else {
            rc = -1;
        }
    }
    if (rc) PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
