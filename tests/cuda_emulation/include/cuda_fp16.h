// float16 for the emulator: the compiler's IEEE binary16 (_Float16), rounded to nearest even.
#pragma once

struct __half {
  _Float16 value;
};

inline float __half2float(__half v) { return float(v.value); }
inline __half __float2half(float f) { return {static_cast<_Float16>(f)}; }
