#include "framing.h"
