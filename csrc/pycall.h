/* pycall.h: the client's call-frame builder's one cffi entry point (pycall.c). */
#ifndef SSHRPC_PYCALL_H
#define SSHRPC_PYCALL_H

/* cdef-begin */
/* Take the GIL and store the builtins call_frame(call_id, names, args,
 * timeout) and plain_replies(terms, opened, reply) in the dict at `target`
 * (a PyObject * passed as its address); `config` is a tuple (encode_direct, max_depth, head5, head6, timeout_opts) (PyObject *),
 * kept by the first call.  0 or -1. */
int sshrpc_pycall_install(void *target, void *config);
/* cdef-end */

#endif
