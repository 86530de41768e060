/* pyreq.c: the client's per-request bookkeeping in C (src/sshrpc/_request.py,
 * client.py; src/sshrpc/_reqc.py installs it).
 *
 * ``RequestFields`` is the storage of ``sshrpc.Request``: a type with one
 * object field per attribute (the names of the pure-Python fallback's
 * ``__slots__``), each a member descriptor, so Python code reads and writes
 * them as it would slots, and the builtins below reach them by offset:
 *
 *     new_requests(cls, ids, conn, slot, owner, labels, pending, members)
 *         -> list of new ``cls`` instances (``cls`` a subclass of
 *         RequestFields adding no fields), one per id of the list ``ids``,
 *         as ``Request(id, conn, label)`` makes them with ``slot`` and
 *         ``_owner`` set; each stored in the dict ``pending`` under its id
 *         and added to the set ``members`` (unless None).
 *     finish_replies(terms, start, pending, slots, done, tasks)
 *         -> (stop, freed, counted, owner): the client's dispatch of plain
 *         replies, from terms[start] on, for as long as it can decide alone
 *         (see the function).
 *     take_answers(ready, members, count) -> list of (label, value): the
 *         leading answered-ok requests of the iterable ``ready`` (at most
 *         ``count``), each removed from the set ``members``, marked
 *         received and taken out of its set (``_owner`` None); the caller
 *         pops them off ``ready``.
 *
 * Only the stable ABI (3.11) is used.
 */
#define Py_LIMITED_API 0x030B0000
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <string.h>

#include "pyreq.h"

typedef struct {
    PyObject_HEAD
    PyObject *id, *label, *done, *ok, *value, *error, *abandoned, *counted, *received, *chunks,
        *chunk_event, *slot, *conn, *owner, *task;
} Req;

#define NFIELDS 15
#define FIELDS(r) (&(r)->id)

static PyTypeObject *req_type;

static int req_traverse(PyObject *self, visitproc visit, void *arg) {
    Req *r = (Req *)self;
    PyObject **f = FIELDS(r);
    for (int k = 0; k < NFIELDS; k++) Py_VISIT(f[k]);
    Py_VISIT((PyObject *)Py_TYPE(self));
    return 0;
}

static int req_clear(PyObject *self) {
    Req *r = (Req *)self;
    PyObject **f = FIELDS(r);
    for (int k = 0; k < NFIELDS; k++) Py_CLEAR(f[k]);
    return 0;
}

static void req_dealloc(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    req_clear(self);
    freefunc free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    free(self);
    Py_DECREF(tp);
}

#define MEMBER(name, field) {name, T_OBJECT_EX, offsetof(Req, field), 0, NULL}
static PyMemberDef req_members[] = {
    MEMBER("id", id),
    MEMBER("label", label),
    MEMBER("done", done),
    MEMBER("ok", ok),
    MEMBER("value", value),
    MEMBER("error", error),
    MEMBER("abandoned", abandoned),
    MEMBER("counted", counted),
    MEMBER("received", received),
    MEMBER("chunks", chunks),
    MEMBER("chunk_event", chunk_event),
    MEMBER("slot", slot),
    MEMBER("_conn", conn),
    MEMBER("_owner", owner),
    MEMBER("_task", task),
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot req_slots[] = {
    {Py_tp_dealloc, req_dealloc},
    {Py_tp_traverse, req_traverse},
    {Py_tp_clear, req_clear},
    {Py_tp_members, req_members},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_doc, "The fields of sshrpc.Request (csrc/pyreq.c)."},
    {0, NULL},
};

static PyType_Spec req_spec = {
    "sshrpc._request.RequestFields",
    sizeof(Req),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    req_slots,
};

/* Replace a field (steals nothing: increfs `v`). */
static inline void set(PyObject **field, PyObject *v) {
    PyObject *old = *field;
    Py_INCREF(v);
    *field = v;
    Py_XDECREF(old);
}

static inline int is_req(PyObject *obj) { return PyObject_TypeCheck(obj, req_type); }

/* new_requests(cls, ids, conn, slot, owner, labels, pending, members) */
static PyObject *pyreq_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8 || !PyType_Check(args[0]) || !PyList_Check(args[1]) ||
        (args[5] != Py_None && !PyList_Check(args[5])) || !PyDict_Check(args[6]) ||
        (args[7] != Py_None && !PySet_Check(args[7]))) {
        PyErr_SetString(PyExc_TypeError,
                        "new_requests(cls, ids: list, conn, slot, owner, labels: list | None, "
                        "pending: dict, members: set | None)");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    if (!PyType_IsSubtype(cls, req_type)) {
        PyErr_SetString(PyExc_TypeError, "new_requests: cls must subclass RequestFields");
        return NULL;
    }
    PyObject *ids = args[1], *conn = args[2], *slot = args[3], *owner = args[4];
    PyObject *labels = args[5], *pending = args[6], *members = args[7];
    Py_ssize_t n = PyList_Size(ids);
    if (labels != Py_None && PyList_Size(labels) < n) {
        PyErr_SetString(PyExc_ValueError, "new_requests: fewer labels than ids");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(cls, Py_tp_alloc);
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        Req *r = (Req *)alloc(cls, 0);
        if (r == NULL) goto fail;
        PyList_SetItem(out, k, (PyObject *)r); /* steals */
        PyObject *id = PyList_GetItem(ids, k);
        PyObject *label = labels == Py_None ? Py_None : PyList_GetItem(labels, k);
        set(&r->id, id);
        set(&r->label, label);
        set(&r->done, Py_False);
        set(&r->ok, Py_False);
        set(&r->value, Py_None);
        set(&r->error, Py_None);
        set(&r->abandoned, Py_False);
        set(&r->counted, conn == Py_None ? Py_True : Py_False);
        set(&r->received, Py_False);
        set(&r->chunks, Py_None);
        set(&r->chunk_event, Py_None);
        set(&r->slot, slot);
        set(&r->conn, conn);
        set(&r->owner, owner);
        set(&r->task, Py_None);
        if (PyDict_SetItem(pending, id, (PyObject *)r) < 0) goto fail;
        if (members != Py_None && PySet_Add(members, (PyObject *)r) < 0) goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* finish_replies(terms, start, pending, slots, done, tasks)
 *     -> (stop, freed, counted, owner)
 *
 * For terms[start], terms[start + 1], ... (``terms`` a list) that are
 * exact 3-tuples (reply, Id, Value) -- plain replies whose ids the protocol
 * core has checked open -- with ``pending[Id]`` a request whose ``slot``
 * is None or ``slots`` (pass None when the slots have waiters), whose
 * ``chunk_event`` is None and whose ``_owner`` is None or the same set as
 * the other requests' of this run: takes the request out of ``pending``,
 * sets ``ok``, ``value`` and ``done``, clears ``slot`` (counted in
 * ``freed``: the caller gives the slots back) and ``_task`` (the task
 * appended to the list ``tasks``: the caller reschedules it), counts it
 * in ``counted`` when ``counted and not abandoned`` (the caller's
 * undelivered count), and appends it to the list ``done`` when it has an
 * owner (returned as ``owner``: the caller completes them there).  Stops
 * at the first term it cannot decide alone (``stop`` its index; the
 * caller's own path takes it).  The work done up to ``stop`` is whole. */
static PyObject *pyreq_finish(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyList_Check(args[0]) || !PyDict_Check(args[2]) || !PyList_Check(args[4]) ||
        !PyList_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError,
                        "finish_replies(terms: list, start, pending: dict, slots, done: list, "
                        "tasks: list)");
        return NULL;
    }
    PyObject *terms = args[0], *pending = args[2], *slots = args[3];
    PyObject *done = args[4], *tasks = args[5];
    Py_ssize_t k = PyLong_AsSsize_t(args[1]);
    if (k == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t n = PyList_Size(terms), freed = 0, counted = 0;
    PyObject *owner = Py_None;
    for (; k < n; k++) {
        PyObject *term = PyList_GetItem(terms, k);
        if (!PyTuple_CheckExact(term) || PyTuple_Size(term) != 3) break;
        PyObject *id = PyTuple_GetItem(term, 1);
        PyObject *obj = PyDict_GetItemWithError(pending, id); /* borrowed */
        if (obj == NULL) {
            if (PyErr_Occurred()) return NULL;
            break;
        }
        if (!is_req(obj)) break;
        Req *r = (Req *)obj;
        if (r->slot == NULL || r->chunk_event == NULL || r->owner == NULL || r->task == NULL ||
            r->counted == NULL || r->abandoned == NULL)
            break;
        if (r->slot != Py_None && (slots == Py_None || r->slot != slots)) break;
        if (r->chunk_event != Py_None) break;
        if (r->owner != Py_None) {
            if (owner == Py_None)
                owner = r->owner;
            else if (r->owner != owner)
                break;
        }
        int c = PyObject_IsTrue(r->counted);
        if (c < 0) return NULL;
        if (c) {
            int a = PyObject_IsTrue(r->abandoned);
            if (a < 0) return NULL;
            if (!a) counted++;
        }
        if (r->owner != Py_None && PyList_Append(done, obj) < 0) return NULL;
        if (r->task != Py_None) {
            if (PyList_Append(tasks, r->task) < 0) return NULL;
            set(&r->task, Py_None);
        }
        Py_INCREF(obj);
        if (PyDict_DelItem(pending, id) < 0) {
            Py_DECREF(obj);
            return NULL;
        }
        if (r->slot != Py_None) {
            set(&r->slot, Py_None);
            freed++;
        }
        set(&r->ok, Py_True);
        set(&r->value, PyTuple_GetItem(term, 2));
        set(&r->done, Py_True);
        Py_DECREF(obj);
    }
    return Py_BuildValue("(nnnO)", k, freed, counted, owner);
}

/* take_answers(ready, members, count) -> list of (label, value) */
static PyObject *pyreq_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "take_answers(ready, members: set, count)");
        return NULL;
    }
    PyObject *members = args[1];
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (count == -1 && PyErr_Occurred()) return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    PyObject *it = PyObject_GetIter(args[0]);
    if (it == NULL) goto fail;
    PyObject *obj;
    while (PyList_Size(out) < count && (obj = PyIter_Next(it)) != NULL) {
        Req *r = (Req *)obj;
        if (!is_req(obj) || r->ok == NULL || r->label == NULL || r->value == NULL) {
            Py_DECREF(obj);
            break;
        }
        int ok = PyObject_IsTrue(r->ok);
        if (ok <= 0) {
            Py_DECREF(obj);
            if (ok < 0) goto fail_it;
            break;
        }
        PyObject *pair = PyTuple_Pack(2, r->label, r->value);
        int rc = pair == NULL ? -1 : PyList_Append(out, pair);
        Py_XDECREF(pair);
        if (rc == 0 && PySet_Discard(members, obj) < 0) rc = -1;
        if (rc == 0) {
            set(&r->owner, Py_None);
            set(&r->received, Py_True);
        }
        Py_DECREF(obj);
        if (rc < 0) goto fail_it;
    }
    if (PyErr_Occurred()) goto fail_it;
    Py_DECREF(it);
    return out;
fail_it:
    Py_DECREF(it);
fail:
    Py_DECREF(out);
    return NULL;
}

/* batch_frames(chunk, pos, small, max_frame) -> (batch, count, end)
 *
 * The client read's batch in one pass over one buffered read (``chunk``,
 * exact bytes, from offset ``pos``): the complete frames there whose
 * payload (1 < length <= ``small``, and <= ``max_frame``) starts with the
 * version byte 131 and is not compressed (second byte 80), up to the first
 * frame that is not one (a keepalive, a large or compressed frame, an
 * incomplete frame, the end), joined as ``join_batch`` joins payloads: 131,
 * LIST_EXT of their count, each payload without its version byte, NIL.
 * ``end`` is the offset after the last frame taken; ``(None, count, pos)``
 * when fewer than two qualify (one frame needs no joining).  Decides nothing else: the caller's frame buffer moves
 * on to ``end`` only once the batch decoded. */
static PyObject *pyreq_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "batch_frames(chunk: bytes, pos, small, max_frame)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t small = PyLong_AsSsize_t(args[2]);
    if (small == -1 && PyErr_Occurred()) return NULL;
    long long max_frame = PyLong_AsLongLong(args[3]);
    if (max_frame == -1 && PyErr_Occurred()) return NULL;
    char *buf;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(args[0], &buf, &size) < 0) return NULL;
    if (pos < 0 || pos > size) {
        PyErr_SetString(PyExc_ValueError, "batch_frames: pos outside the chunk");
        return NULL;
    }
    const unsigned char *b = (const unsigned char *)buf;
    Py_ssize_t at = pos, count = 0;
    size_t total = 7;
    while (size - at >= 4 && count < 0xFFFFFFFFLL) {
        long long len = ((long long)b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3];
        if (len <= 1 || len > small || len > max_frame || size - at - 4 < len) break;
        if (b[at + 4] != 131 || b[at + 5] == 80) break;
        total += (size_t)len - 1;
        at += 4 + (Py_ssize_t)len;
        count++;
    }
    if (count < 2) return Py_BuildValue("(Onn)", Py_None, count, pos); /* (nothing to join) */
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL) return NULL;
    unsigned char *o = (unsigned char *)PyBytes_AsString(out);
    *o++ = 131;
    *o++ = 108; /* LIST_EXT */
    *o++ = (unsigned char)((size_t)count >> 24);
    *o++ = (unsigned char)((size_t)count >> 16);
    *o++ = (unsigned char)((size_t)count >> 8);
    *o++ = (unsigned char)count;
    for (Py_ssize_t p = pos; p < at;) {
        Py_ssize_t len = ((Py_ssize_t)b[p] << 24) | (b[p + 1] << 16) | (b[p + 2] << 8) | b[p + 3];
        memcpy(o, b + p + 5, (size_t)len - 1);
        o += len - 1;
        p += 4 + len;
    }
    *o = 106; /* NIL_EXT */
    PyObject *res = Py_BuildValue("(Onn)", out, count, at);
    Py_DECREF(out);
    return res;
}

static PyMethodDef pyreq_defs[] = {
    {"batch_frames", (PyCFunction)(void (*)(void))pyreq_batch, METH_FASTCALL,
     "batch_frames(chunk, pos, small, max_frame) -> (batch | None, count, end)"},
    {"new_requests", (PyCFunction)(void (*)(void))pyreq_new, METH_FASTCALL,
     "new_requests(cls, ids, conn, slot, owner, labels, pending, members) -> list of requests"},
    {"finish_replies", (PyCFunction)(void (*)(void))pyreq_finish, METH_FASTCALL,
     "finish_replies(terms, start, pending, slots, done, tasks) -> (stop, freed, counted, owner)"},
    {"take_answers", (PyCFunction)(void (*)(void))pyreq_take, METH_FASTCALL,
     "take_answers(ready, members, count) -> list of (label, value)"},
};

int sshrpc_pyreq_install(void *target) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = 0;
    if (req_type == NULL) {
        req_type = (PyTypeObject *)PyType_FromSpec(&req_spec);
        if (req_type == NULL) rc = -1; /* (kept for the process's life) */
    }
    if (rc == 0) rc = PyDict_SetItemString((PyObject *)target, "RequestFields", (PyObject *)req_type);
    for (size_t m = 0; rc == 0 && m < sizeof pyreq_defs / sizeof pyreq_defs[0]; m++) {
        PyObject *fn = PyCFunction_NewEx(&pyreq_defs[m], NULL, NULL);
        if (fn == NULL) {
            rc = -1;
            break;
        }
        rc = PyDict_SetItemString((PyObject *)target, pyreq_defs[m].ml_name, fn);
        Py_DECREF(fn);
    }
    if (rc) PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
