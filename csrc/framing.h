/* Frame reassembly (csrc/README.md).  The text between the cdef markers is
 * also the cffi declaration. */
#ifndef SSHRPC_FRAMING_H
#define SSHRPC_FRAMING_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
/* cdef-end */

#endif
