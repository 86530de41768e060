/* pyenc.h: the direct encoder's one cffi entry point (pyenc.c). */
#ifndef SSHRPC_PYENC_H
#define SSHRPC_PYENC_H

/* cdef-begin */
/* Take the GIL and store the builtin encode_direct(obj, max_depth, reserve)
 * in the dict at `target` (a PyObject * passed as its address); `atom` is the
 * sshrpc Atom type (PyObject *), fixed by the first call.  0 or -1. */
int sshrpc_pyenc_install(void *target, void *atom);
/* cdef-end */

#endif
