/* pynode.h: the node's plain-call loop's one cffi entry point (pynode.c). */
#ifndef SSHRPC_PYNODE_H
#define SSHRPC_PYNODE_H

/* cdef-begin */
/* Take the GIL and store the builtin run_plain(kit, events, costs, pos) in
 * the dict at `target` (a PyObject * passed as its address); `config` is a
 * tuple (encode_direct, max_depth, Context.copy, Context.run,
 * ContextVar.set, ContextVar.reset, CoroutineType) (PyObject *), kept by the
 * first call.  0 or -1. */
int sshrpc_pynode_install(void *target, void *config);
/* cdef-end */

#endif
