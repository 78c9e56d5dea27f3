// The emulator stands in for the CUDA runtime API (emulated_runtime.h).
#pragma once
#include "emulated_runtime.h"
