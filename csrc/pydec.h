/* pydec.h: the direct decoder's one cffi entry point (pydec.c). */
#ifndef SSHRPC_PYDEC_H
#define SSHRPC_PYDEC_H

/* cdef-begin */
/* Take the GIL and store the builtin
 * decode_direct(data, max_depth, max_big, max_cost, want_cost) in the dict at
 * `target` (a PyObject * passed as its address); `atom` is the sshrpc Atom
 * type (PyObject *), fixed by the first call.  0 or -1. */
int sshrpc_pydec_install(void *target, void *atom);
/* Take the GIL and store the builtins plain_call(data, max_depth, max_big,
 * max_cost) and plain_calls(read, pos, max_frame, small, opened, max_open,
 * plain, max_depth, max_big, max_cost, events, costs) in the dict at
 * `target`; only after sshrpc_pydec_install set the Atom type.  0 or -1. */
int sshrpc_pydec_install_plain_call(void *target);
/* cdef-end */

#endif
