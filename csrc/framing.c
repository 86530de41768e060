#include "sshrpc.h"
