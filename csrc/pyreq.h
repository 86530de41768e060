/* pyreq.h: the client's request records' one cffi entry point (pyreq.c). */
#ifndef SSHRPC_PYREQ_H
#define SSHRPC_PYREQ_H

/* cdef-begin */
/* Take the GIL and store the type RequestFields and the builtins
 * new_requests, finish_replies, take_answers and batch_frames in the dict at `target` (a
 * PyObject * passed as its address).  0 or -1. */
int sshrpc_pyreq_install(void *target);
/* cdef-end */

#endif
