/* Erlang External Term Format transcoders (csrc/README.md).  The text
 * between the cdef markers is also the cffi declaration, so it stays plain C
 * declarations that cffi can parse. */
#ifndef SSHRPC_ETF_H
#define SSHRPC_ETF_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define SSHRPC_C_VERSION 1
int sshrpc_c_version(void);
/* cdef-end */

#endif
