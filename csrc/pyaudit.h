/* pyaudit.h: the audit line formatter's one cffi entry point (pyaudit.c). */
#ifndef SSHRPC_PYAUDIT_H
#define SSHRPC_PYAUDIT_H

/* cdef-begin */
/* Take the GIL and store the builtin
 * format_calls(calls, starts, offset, tail) in the dict at `target` (a
 * PyObject * passed as its address).  0 or -1. */
int sshrpc_pyaudit_install(void *target);
/* cdef-end */

#endif
