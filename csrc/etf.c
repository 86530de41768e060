#include "etf.h"

int sshrpc_c_version(void) { return SSHRPC_C_VERSION; }
