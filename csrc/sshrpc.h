/* The C surface of sshrpc's fast path.  Everything between the cdef markers
 * is also read by csrc/build_sshrpc.py as the cffi declarations, so it must
 * stay plain C declarations that cffi can parse. */
#ifndef SSHRPC_H
#define SSHRPC_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define SSHRPC_C_VERSION 1
int sshrpc_c_version(void);
/* cdef-end */

#endif
