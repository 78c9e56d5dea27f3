// The emulator stands in for the CUDA runtime (emulated_cuda.h).
#pragma once
#include "emulated_cuda.h"
