/* pyaudit.c: the text of the node's per-call audit lines, in one call per
 * read (src/sshrpc/_auditlog.py, AuditStream.write_calls).
 *
 * Installed like pydec.c: the one cffi function, sshrpc_pyaudit_install,
 * takes the GIL and puts a builtin into a dict the caller names by address.
 *
 * format_calls(calls, starts, offset, tail) -> str, or None
 *
 * `calls` is a list of (name, start, end) tuples (start and end floats,
 * time.perf_counter() readings), `starts` a dict name -> str (the line up to
 * its duration), `offset` the float to add to `end` for its time.time(),
 * `tail` the str between the time stamp and the line (" logger LEVEL ").
 * Returns the lines, each
 *
 *     YYYY-MM-DD HH:MM:SS,mmm<tail><starts[name]><duration in ms, %.3f>\n
 *
 * exactly as the Python of AuditStream.write writes them (logging's
 * format): the stamp from time.localtime(int(when)) and
 * int((when - int(when)) * 1000), the duration from (end - start) * 1000.0
 * (the same IEEE double operations) formatted by Python's own
 * PyOS_double_to_string, as format(duration, ".3f") does.  None when a name is not in `starts` (the caller adds
 * it and asks again), when an argument has another type or a value is out
 * of range (the caller then formats in Python).  Only the stable ABI (3.11)
 * is used.
 */
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pyaudit.h"

typedef struct {
    char *s;
    size_t len, cap;
} buf;

static int put(buf *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *s2 = realloc(b->s, cap);
        if (!s2) return -1;
        b->s = s2;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    return 0;
}

static PyObject *format_calls(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "format_calls(calls, starts, offset, tail)");
        return NULL;
    }
    PyObject *calls = args[0], *starts = args[1];
    if (!PyList_CheckExact(calls) || !PyDict_CheckExact(starts) || !PyFloat_CheckExact(args[2]) ||
        !PyUnicode_CheckExact(args[3]))
        Py_RETURN_NONE;
    double offset = PyFloat_AsDouble(args[2]);
    Py_ssize_t tail_len;
    const char *tail = PyUnicode_AsUTF8AndSize(args[3], &tail_len);
    if (!tail) return NULL;
    Py_ssize_t n = PyList_Size(calls);
    buf b = {NULL, 0, 0};
    long long stamp_second = -1;
    char stamp[64];
    size_t stamp_len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GetItem(calls, i); /* borrowed */
        if (!item || !PyTuple_CheckExact(item) || PyTuple_Size(item) != 3) goto fallback;
        PyObject *name = PyTuple_GetItem(item, 0);
        PyObject *t0 = PyTuple_GetItem(item, 1);
        PyObject *t1 = PyTuple_GetItem(item, 2);
        if (!name || !t0 || !t1 || !PyFloat_CheckExact(t0) || !PyFloat_CheckExact(t1))
            goto fallback;
        PyObject *start = PyDict_GetItemWithError(starts, name); /* borrowed */
        if (!start) {
            if (PyErr_Occurred()) goto error;
            goto fallback;
        }
        if (!PyUnicode_CheckExact(start)) goto fallback;
        Py_ssize_t start_len;
        const char *start_s = PyUnicode_AsUTF8AndSize(start, &start_len);
        if (!start_s) goto error;
        double when = PyFloat_AsDouble(t1) + offset;
        double duration = (PyFloat_AsDouble(t1) - PyFloat_AsDouble(t0)) * 1000.0;
        if (!(when >= 0.0 && when < 9e15)) goto fallback; /* int(when) fits, positive */
        long long second = (long long)when;
        long long msecs = (long long)((when - (double)second) * 1000.0);
        if (second != stamp_second) {
            time_t t = (time_t)second;
            struct tm tm;
            if (!localtime_r(&t, &tm)) goto fallback;
            stamp_len = strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
            if (!stamp_len) goto fallback;
            stamp_second = second;
        }
        char num[64];
        int m;
        if (msecs >= 0 && msecs <= 999) {
            num[0] = ',';
            num[1] = (char)('0' + msecs / 100);
            num[2] = (char)('0' + msecs / 10 % 10);
            num[3] = (char)('0' + msecs % 10);
            m = 4;
        } else {
            m = snprintf(num, sizeof num, ",%03lld", msecs);
            if (m < 0 || (size_t)m >= sizeof num) goto fallback;
        }
        /* Python's own float formatting: f"{duration:.3f}" exactly. */
        char *dur = PyOS_double_to_string(duration, 'f', 3, 0, NULL);
        if (!dur) goto error;
        int failed = put(&b, stamp, stamp_len) || put(&b, num, (size_t)m) ||
                     put(&b, tail, (size_t)tail_len) || put(&b, start_s, (size_t)start_len) ||
                     put(&b, dur, strlen(dur)) || put(&b, "\n", 1);
        PyMem_Free(dur);
        if (failed) {
            PyErr_NoMemory();
            goto error;
        }
    }
    PyObject *text = PyUnicode_DecodeUTF8(b.s ? b.s : "", (Py_ssize_t)b.len, "strict");
    free(b.s);
    return text;
fallback:
    free(b.s);
    Py_RETURN_NONE;
error:
    free(b.s);
    return NULL;
}

static PyMethodDef format_calls_def = {
    "format_calls", (PyCFunction)(void (*)(void))format_calls, METH_FASTCALL,
    "format_calls(calls, starts, offset, tail) -> the audit lines of calls, or None "
    "(csrc/pyaudit.c)"};

int sshrpc_pyaudit_install(void *target) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    PyObject *fn = PyCFunction_NewEx(&format_calls_def, NULL, NULL);
    if (fn) rc = PyDict_SetItemString((PyObject *)target, "format_calls", fn);
    Py_XDECREF(fn);
    if (rc) PyErr_Clear();
    PyGILState_Release(gil);
    return rc;
}
