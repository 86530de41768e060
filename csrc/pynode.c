/* pynode.c: the node's loop over a read's plain calls (node.py
 * ``_Channel._plain_calls``) in one C call.
 *
 * Installed like pycall.c (a builtin put into a dict the caller names by
 * address; never called through cffi).  The builtin
 *
 *     run_plain(kit, events, costs, pos) -> None
 *
 * dispatches ``events[pos[0]:]`` (decoded plain calls, ``costs`` theirs)
 * for as long as each is an allowed inline function or ``async def`` the
 * channel has room for, exactly as the Python loop does: the same
 * contexts, charges, answers, audit entries and early flushes, in the same
 * order.  It stops, without touching the event, at the first one the
 * Python loop must take (another event, a full outbox, a name with no fast
 * entry, a closing channel, no free call slot, a charge over the key's
 * limit, an ``async`` function that is not a plain ``async def``), and
 * after an ``async def`` whose first step waited (handed to ``kit``'s
 * ``wait``).  ``pos[0]`` is kept at the next event to dispatch, also when a
 * function raises a ``BaseException`` that is not an ``Exception`` (it
 * propagates); ``pos[1]`` gets the number of answers encoded here (the
 * protocol's ``replies_sent``).  Python keeps every decision that is not
 * mechanical: a failed call (``failed``), an answer with no Erlang term
 * (``unencodable``), an answer the protocol's own ``send_reply`` must build
 * (an id not open, a state a reply changes, a frame too large or one the
 * direct encoder leaves to the reference).
 *
 * ``kit`` is the tuple node.py builds per loop; see ``KIT_*`` below.  Only
 * the stable ABI (3.11) is used: the context calls go through the method
 * descriptors given at install.
 */
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <time.h>

#include "pynode.h"

typedef PyObject *(*fastcall_fn)(PyObject *, PyObject *const *, Py_ssize_t);

/* Exported by CPython since 3.9 and in the stable ABI from 3.12: declared
 * here, as 3.11's limited headers do not (a call without an argument
 * tuple). */
PyAPI_FUNC(PyObject *) PyObject_Vectorcall(PyObject *callable, PyObject *const *args,
                                           size_t nargsf, PyObject *kwnames);

static PyObject *call_n(PyObject *f, PyObject *const *argv, size_t n) {
    return PyObject_Vectorcall(f, argv, n, NULL);
}

/* f(*args) for a list args (held by the caller while f runs). */
static PyObject *call_list(PyObject *f, PyObject *args) {
    PyObject *argv[8];
    Py_ssize_t n = PyList_Size(args);
    if (n < 0) return NULL;
    if (n > 8) {
        PyObject *t = PyList_AsTuple(args);
        PyObject *r = t ? PyObject_Call(f, t, NULL) : NULL;
        Py_XDECREF(t);
        return r;
    }
    for (Py_ssize_t i = 0; i < n; i++) argv[i] = PyList_GetItem(args, i);
    return call_n(f, argv, (size_t)n);
}

enum {
    KIT_FAST,          /* dict: (module, function, arity) -> (fn, how) */
    KIT_CALLS,         /* dict: the channel's open calls */
    KIT_MAX_CALLS,     /* int */
    KIT_ACCOUNT,       /* the key's account: .held, .limit */
    KIT_CHANNEL,       /* .closing, ._context_base, ._call_context() */
    KIT_OUTBOX,        /* .nbytes, .limit */
    KIT_APPEND,        /* outbox.frames.append */
    KIT_FRAMES,        /* outbox.frames */
    KIT_OUT_ACCOUNT,   /* outbox.account or None */
    KIT_PUT,           /* put(data), or None: put_batched here */
    KIT_FLUSH_AT,      /* int */
    KIT_RUNNABLE,      /* () -> int */
    KIT_FLUSH,         /* () -> None */
    KIT_AUDITED,       /* list of (name, start, end) */
    KIT_CURRENT,       /* the ContextVar an inline call sees */
    KIT_CONTEXT,       /* its value */
    KIT_SEND_REPLY,    /* send_reply(call_id, value) -> bytes */
    KIT_FAILED,        /* failed(plain, exc, start) */
    KIT_UNENCODABLE,   /* unencodable(call_id, value) */
    KIT_WAIT,          /* wait(plain, cost, it, context, trap, start) */
    KIT_REPLY,         /* (conn, state, opened, send_limit, reply_atom) or None */
    KIT_SIZE
};

enum { HOW_INLINE = 0, HOW_PLAIN_COROUTINE = 1 };

/* The tuple given to the first install; strong reference, never released. */
static PyObject *config;
static fastcall_fn encode_direct;
static PyObject *encoder, *max_depth, *four, *ctx_copy, *ctx_run, *var_set, *var_reset,
    *coro_type, *step_fn;
static PyObject *s_nbytes, *s_limit, *s_held, *s_closing, *s_base, *s_call_context, *s_state,
    *s_await, *s_send, *s_value;
/* What the last ``step`` got from PyIter_Send (read right after it returns). */
static int step_rc;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* obj.name as a C long long; -1 with an error set on failure. */
static int get_ll(PyObject *obj, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* obj.name += delta */
static int add_ll(PyObject *obj, PyObject *name, long long delta) {
    long long v;
    if (get_ll(obj, name, &v) < 0) return -1;
    PyObject *n = PyLong_FromLongLong(v + delta);
    if (n == NULL) return -1;
    int rc = PyObject_SetAttr(obj, name, n);
    Py_DECREF(n);
    return rc;
}

/* step(it): one PyIter_Send(it, None) inside Context.run; its outcome is
 * left in step_rc. */
static PyObject *step(PyObject *self, PyObject *it) {
    PyObject *res = NULL;
    step_rc = PyIter_Send(it, Py_None, &res);
    return res;
}

static PyMethodDef step_def = {"_step", step, METH_O, "one step of a coroutine (pynode.c)"};

/* The raised exception if it is an ``Exception`` (taken, a new
 * reference), else NULL with the error left set. */
static PyObject *take_exception(void) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (value == NULL) value = Py_NewRef(Py_None);
    return value;
}

/* Call cb(*args) (the leading non-NULL ones) for its side effect; -1 with
 * the error set if it raised. */
static int notify(PyObject *cb, PyObject *a, PyObject *b, PyObject *c, PyObject *d,
                  PyObject *e, PyObject *f) {
    PyObject *argv[6] = {a, b, c, d, e, f};
    size_t n = 0;
    while (n < 6 && argv[n] != NULL) n++;
    PyObject *r = call_n(cb, argv, n);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The frame answering call_id with value, as the protocol's send_reply
 * would build it, or NULL: with an error set if it raised, without one if
 * the answer was handed to ``unencodable``.  *counted is set when the
 * answer was encoded here (the protocol's frame count is then the
 * caller's to add). */
static PyObject *reply_frame(PyObject *kit, PyObject *call_id, PyObject *value, int *counted) {
    PyObject *rk = PyTuple_GetItem(kit, KIT_REPLY);
    *counted = 0;
    if (rk != Py_None && PyLong_CheckExact(call_id)) {
        PyObject *conn = PyTuple_GetItem(rk, 0), *opened = PyTuple_GetItem(rk, 2);
        PyObject *state = PyObject_GetAttr(conn, s_state);
        if (state == NULL) return NULL;
        int same = state == PyTuple_GetItem(rk, 1);
        Py_DECREF(state);
        int open = same ? PyDict_Contains(opened, call_id) : 0;
        if (open < 0) return NULL;
        if (open) {
            PyObject *term = PyTuple_Pack(3, PyTuple_GetItem(rk, 4), call_id, value);
            if (term == NULL) return NULL;
            PyObject *argv[3] = {term, max_depth, four};
            PyObject *frame = encode_direct(encoder, argv, 3);
            Py_DECREF(term);
            if (frame == NULL) {
                PyObject *exc = take_exception();
                if (exc == NULL) return NULL;
                Py_DECREF(exc);
                notify(PyTuple_GetItem(kit, KIT_UNENCODABLE), call_id, value, NULL, NULL, NULL,
                       NULL);
                return NULL;
            }
            if (frame != Py_None) {
                long long limit = PyLong_AsLongLong(PyTuple_GetItem(rk, 3));
                if (limit == -1 && PyErr_Occurred()) {
                    Py_DECREF(frame);
                    return NULL;
                }
                if (PyBytes_Size(frame) - 4 <= limit) {
                    if (PyDict_DelItem(opened, call_id) < 0) {
                        Py_DECREF(frame);
                        return NULL;
                    }
                    *counted = 1;
                    return frame;
                }
            }
            Py_DECREF(frame); /* None, or too large: the protocol decides */
        }
    }
    PyObject *argv[2] = {call_id, value};
    PyObject *frame = call_n(PyTuple_GetItem(kit, KIT_SEND_REPLY), argv, 2);
    if (frame != NULL) return frame;
    PyObject *exc = take_exception();
    if (exc == NULL) return NULL;
    Py_DECREF(exc);
    notify(PyTuple_GetItem(kit, KIT_UNENCODABLE), call_id, value, NULL, NULL, NULL, NULL);
    return NULL;
}

/* Queue frame as the loop's ``put`` does. */
static int put(PyObject *kit, PyObject *frame) {
    PyObject *p = PyTuple_GetItem(kit, KIT_PUT);
    if (p != Py_None) return notify(p, frame, NULL, NULL, NULL, NULL, NULL);
    if (notify(PyTuple_GetItem(kit, KIT_APPEND), frame, NULL, NULL, NULL, NULL, NULL) < 0)
        return -1;
    Py_ssize_t n = PyBytes_Check(frame) ? PyBytes_Size(frame) : PyObject_Length(frame);
    if (n < 0) return -1;
    if (add_ll(PyTuple_GetItem(kit, KIT_OUTBOX), s_nbytes, n) < 0) return -1;
    PyObject *acc = PyTuple_GetItem(kit, KIT_OUT_ACCOUNT);
    return acc == Py_None ? 0 : add_ll(acc, s_held, n);
}

/* Answer a call that returned value: its audit entry, its frame.  -1 if
 * something raised that the loop must propagate. */
static int answer(PyObject *kit, PyObject *name, double start, PyObject *call_id,
                  PyObject *value, Py_ssize_t *replies) {
    PyObject *t0 = PyFloat_FromDouble(start), *t1 = PyFloat_FromDouble(now());
    PyObject *entry = (t0 && t1) ? PyTuple_Pack(3, name, t0, t1) : NULL;
    Py_XDECREF(t0);
    Py_XDECREF(t1);
    if (entry == NULL) return -1;
    int rc = PyList_Append(PyTuple_GetItem(kit, KIT_AUDITED), entry);
    Py_DECREF(entry);
    if (rc < 0) return -1;
    int counted;
    PyObject *frame = reply_frame(kit, call_id, value, &counted);
    if (frame == NULL) return PyErr_Occurred() ? -1 : 0;
    *replies += counted;
    rc = put(kit, frame);
    Py_DECREF(frame);
    return rc;
}

/* A call whose function raised exc (taken): ``failed`` answers it. */
static int fail(PyObject *kit, PyObject *plain, PyObject *exc, double start) {
    PyObject *t0 = PyFloat_FromDouble(start);
    int rc = t0 ? notify(PyTuple_GetItem(kit, KIT_FAILED), plain, exc, t0, NULL, NULL, NULL) : -1;
    Py_XDECREF(t0);
    Py_DECREF(exc);
    return rc;
}

/* 1 if the call can be taken here (its checks passed), 0 if the Python
 * loop must take it, -1 on error. */
static int takes(PyObject *kit, PyObject *fast_entry, long long cost) {
    PyObject *closing = PyObject_GetAttr(PyTuple_GetItem(kit, KIT_CHANNEL), s_closing);
    if (closing == NULL) return -1;
    int is_closing = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (is_closing) return is_closing < 0 ? -1 : 0;
    long long max_calls = PyLong_AsLongLong(PyTuple_GetItem(kit, KIT_MAX_CALLS));
    if (max_calls == -1 && PyErr_Occurred()) return -1;
    if (PyDict_Size(PyTuple_GetItem(kit, KIT_CALLS)) >= max_calls) return 0;
    if (cost > 0) {
        long long held, limit;
        PyObject *account = PyTuple_GetItem(kit, KIT_ACCOUNT);
        if (get_ll(account, s_held, &held) < 0 || get_ll(account, s_limit, &limit) < 0) return -1;
        if (held + cost > limit) return 0;
    }
    PyObject *how = PyTuple_GetItem(fast_entry, 1);
    long h = PyLong_AsLong(how);
    if (h == -1 && PyErr_Occurred()) return -1;
    return h == HOW_INLINE || h == HOW_PLAIN_COROUTINE;
}

/* The async def call's first step, in its own context.  -1 to propagate. */
static int run_coroutine(PyObject *kit, PyObject *plain, PyObject *fn, PyObject *call_args,
                         PyObject *name, PyObject *cost_obj, long long cost, double start,
                         Py_ssize_t *replies, int *waited) {
    PyObject *ch = PyTuple_GetItem(kit, KIT_CHANNEL), *account = PyTuple_GetItem(kit, KIT_ACCOUNT);
    PyObject *call_id = PyTuple_GetItem(plain, 0);
    PyObject *base = PyObject_GetAttr(ch, s_base);
    if (base == NULL) return -1;
    PyObject *context = base == Py_None
                            ? PyObject_CallMethodObjArgs(ch, s_call_context, NULL)
                            : call_n(ctx_copy, &base, 1);
    Py_DECREF(base);
    if (context == NULL) return -1;
    if (add_ll(account, s_held, cost) < 0) {
        Py_DECREF(context);
        return -1;
    }
    int rc = 0;
    PyObject *it = NULL, *res = NULL;
    PyObject *coro = call_list(fn, call_args);
    int state = -1; /* the step's PySendResult, -1: raised before it */
    if (coro != NULL) {
        if (Py_TYPE(coro) == (PyTypeObject *)coro_type) {
            it = coro;
            step_rc = -3;
            PyObject *argv[3] = {context, step_fn, it};
            res = call_n(ctx_run, argv, 3);
            state = res == NULL ? -1 : step_rc;
            if (res != NULL && state != PYGEN_NEXT && state != PYGEN_RETURN) {
                /* (not possible: a step that raised returns NULL) */
                Py_DECREF(res);
                res = NULL;
                PyErr_SetString(PyExc_SystemError, "pynode: lost coroutine step");
            }
        } else {
            /* (as node.py: ``it = coro.__await__()``, ``context.run(it.send, None)``) */
            it = PyObject_CallMethodObjArgs(coro, s_await, NULL);
            Py_DECREF(coro);
            PyObject *send = it ? PyObject_GetAttr(it, s_send) : NULL;
            if (send != NULL) {
                PyObject *argv[3] = {context, send, Py_None};
                res = call_n(ctx_run, argv, 3);
                Py_DECREF(send);
                state = PYGEN_NEXT;
                if (res == NULL) {
                    state = -1;
                    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
                        PyObject *stop = take_exception();
                        res = stop ? PyObject_GetAttr(stop, s_value) : NULL;
                        Py_XDECREF(stop);
                        if (res != NULL) state = PYGEN_RETURN;
                    }
                }
            }
        }
    }
    if (state == PYGEN_NEXT) {
        PyObject *t0 = PyFloat_FromDouble(start);
        rc = t0 ? notify(PyTuple_GetItem(kit, KIT_WAIT), plain, cost_obj, it, context, res, t0)
                : -1;
        Py_XDECREF(t0);
        *waited = 1;
    } else {
        /* Given back: the call ran to its end or raised. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        rc = add_ll(account, s_held, -cost);
        if (rc < 0) {
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        } else {
            PyErr_Restore(type, value, tb);
            if (state == PYGEN_RETURN) {
                rc = answer(kit, name, start, call_id, res, replies);
            } else {
                PyObject *exc = take_exception();
                rc = exc == NULL ? -1 : fail(kit, plain, exc, start);
            }
        }
    }
    Py_XDECREF(res);
    Py_XDECREF(it);
    Py_DECREF(context);
    return rc;
}

static PyObject *run_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyTuple_Check(args[0]) || PyTuple_Size(args[0]) != KIT_SIZE ||
        !PyList_Check(args[1]) || !PyList_Check(args[2]) || !PyList_Check(args[3]) ||
        PyList_Size(args[3]) != 2) {
        PyErr_SetString(PyExc_TypeError, "run_plain(kit, events, costs, pos)");
        return NULL;
    }
    PyObject *kit = args[0], *events = args[1], *costs = args[2], *pos = args[3];
    Py_ssize_t at = PyLong_AsSsize_t(PyList_GetItem(pos, 0));
    if (at == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t end = PyList_Size(events), replies = 0;
    if (PyList_Size(costs) < end) end = PyList_Size(costs);
    PyObject *fast = PyTuple_GetItem(kit, KIT_FAST), *outbox = PyTuple_GetItem(kit, KIT_OUTBOX);
    long long flush_at = PyLong_AsLongLong(PyTuple_GetItem(kit, KIT_FLUSH_AT));
    if (flush_at == -1 && PyErr_Occurred()) return NULL;
    int failed = 0;
    while (at < end) {
        PyObject *plain = PyList_GetItem(events, at);
        if (!PyTuple_CheckExact(plain) || PyTuple_Size(plain) != 7) break;
        long long nbytes, limit;
        if (get_ll(outbox, s_nbytes, &nbytes) < 0 || get_ll(outbox, s_limit, &limit) < 0) {
            failed = 1;
            break;
        }
        if (nbytes >= limit) break;
        long long cost = PyLong_AsLongLong(PyList_GetItem(costs, at));
        PyObject *call_args = PyTuple_GetItem(plain, 3);
        if ((cost == -1 && PyErr_Occurred()) || !PyList_CheckExact(call_args)) {
            PyErr_Clear();
            break;
        }
        PyObject *arity = PyLong_FromSsize_t(PyList_Size(call_args));
        PyObject *name = arity ? PyTuple_Pack(3, PyTuple_GetItem(plain, 1),
                                              PyTuple_GetItem(plain, 2), arity)
                               : NULL;
        Py_XDECREF(arity);
        if (name == NULL) {
            failed = 1;
            break;
        }
        PyObject *entry = PyDict_GetItemWithError(fast, name);
        Py_XINCREF(entry);
        int ok = entry == NULL ? (PyErr_Occurred() ? -1 : 0) : takes(kit, entry, cost);
        if (ok <= 0) {
            Py_XDECREF(entry);
            Py_DECREF(name);
            failed = ok < 0;
            break;
        }
        /* Taken: from here on the call is this loop's. */
        at += 1;
        PyObject *next = PyLong_FromSsize_t(at);
        if (next == NULL || PyList_SetItem(pos, 0, next) < 0) {
            Py_DECREF(entry);
            Py_DECREF(name);
            failed = 1;
            break;
        }
        PyObject *fn = PyTuple_GetItem(entry, 0);
        long how = PyLong_AsLong(PyTuple_GetItem(entry, 1));
        double start = now();
        int rc = 0, waited = 0;
        if (how == HOW_INLINE) {
            PyObject *cur = PyTuple_GetItem(kit, KIT_CURRENT);
            PyObject *set_argv[2] = {cur, PyTuple_GetItem(kit, KIT_CONTEXT)};
            PyObject *token = call_n(var_set, set_argv, 2);
            if (token == NULL) {
                rc = -1;
            } else {
                PyObject *value = call_list(fn, call_args);
                PyObject *type, *exc_v, *tb;
                PyErr_Fetch(&type, &exc_v, &tb);
                PyObject *reset_argv[2] = {cur, token};
                PyObject *r = call_n(var_reset, reset_argv, 2);
                Py_DECREF(token);
                if (r == NULL) {
                    Py_XDECREF(type);
                    Py_XDECREF(exc_v);
                    Py_XDECREF(tb);
                    Py_XDECREF(value);
                    rc = -1;
                } else {
                    Py_DECREF(r);
                    PyErr_Restore(type, exc_v, tb);
                    if (value != NULL) {
                        rc = answer(kit, name, start, PyTuple_GetItem(plain, 0), value, &replies);
                        Py_DECREF(value);
                    } else {
                        PyObject *exc = take_exception();
                        rc = exc == NULL ? -1 : fail(kit, plain, exc, start);
                    }
                }
            }
        } else {
            rc = run_coroutine(kit, plain, fn, call_args, name, PyList_GetItem(costs, at - 1), cost, start,
                               &replies, &waited);
        }
        Py_DECREF(entry);
        Py_DECREF(name);
        if (rc < 0) {
            failed = 1;
            break;
        }
        if (waited) break;
        Py_ssize_t queued = PyObject_Length(PyTuple_GetItem(kit, KIT_FRAMES));
        if (queued < 0) {
            failed = 1;
            break;
        }
        if (queued >= flush_at) {
            PyObject *r = PyObject_CallNoArgs(PyTuple_GetItem(kit, KIT_RUNNABLE));
            int busy = r ? PyObject_IsTrue(r) : -1;
            Py_XDECREF(r);
            if (busy < 0 || (!busy && notify(PyTuple_GetItem(kit, KIT_FLUSH), NULL, NULL, NULL,
                                             NULL, NULL, NULL) < 0)) {
                failed = 1;
                break;
            }
        }
    }
    /* pos[0] is the next event (set as each call was taken); the count of
     * answers encoded here goes to pos[1], also when raising. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *count = PyLong_FromSsize_t(replies);
    if (count == NULL || PyList_SetItem(pos, 1, count) < 0) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return NULL;
    }
    PyErr_Restore(type, value, tb);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef run_plain_def = {
    "run_plain", (PyCFunction)(void (*)(void))run_plain, METH_FASTCALL,
    "run_plain(kit, events, costs, pos): dispatch a read's plain calls (node.py)"};

static PyObject *intern(const char *s) { return PyUnicode_InternFromString(s); }

static int take_config(PyObject *cfg) {
    if (!PyTuple_Check(cfg) || PyTuple_Size(cfg) != 7) return -1;
    PyObject *enc = PyTuple_GetItem(cfg, 0);
    if (!PyCFunction_Check(enc)) return -1;
    if (!(PyCFunction_GetFlags(enc) & METH_FASTCALL) || (PyCFunction_GetFlags(enc) & METH_KEYWORDS))
        return -1;
    if (!PyLong_Check(PyTuple_GetItem(cfg, 1))) return -1;
    four = PyLong_FromLong(4);
    step_fn = PyCFunction_NewEx(&step_def, NULL, NULL);
    s_nbytes = intern("nbytes");
    s_limit = intern("limit");
    s_held = intern("held");
    s_closing = intern("closing");
    s_base = intern("_context_base");
    s_call_context = intern("_call_context");
    s_state = intern("_state");
    s_await = intern("__await__");
    s_send = intern("send");
    s_value = intern("value");
    if (!four || !step_fn || !s_nbytes || !s_limit || !s_held || !s_closing || !s_base ||
        !s_call_context || !s_state || !s_await || !s_send || !s_value)
        return -1;
    Py_INCREF(cfg);
    config = cfg;
    encoder = enc;
    encode_direct = (fastcall_fn)(void (*)(void))PyCFunction_GetFunction(enc);
    max_depth = PyTuple_GetItem(cfg, 1);
    ctx_copy = PyTuple_GetItem(cfg, 2);
    ctx_run = PyTuple_GetItem(cfg, 3);
    var_set = PyTuple_GetItem(cfg, 4);
    var_reset = PyTuple_GetItem(cfg, 5);
    coro_type = PyTuple_GetItem(cfg, 6);
    return 0;
}

int sshrpc_pynode_install(void *target, void *cfg) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    if (config != NULL || take_config((PyObject *)cfg) == 0) {
        PyObject *fn = PyCFunction_NewEx(&run_plain_def, NULL, NULL);
        if (fn) {
            rc = PyDict_SetItemString((PyObject *)target, "run_plain", fn);
            Py_DECREF(fn);
        }
    }
    if (rc) PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
