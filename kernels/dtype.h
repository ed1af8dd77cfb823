// Element types shared by the CPU and CUDA backends.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FREQKV_HD __host__ __device__
#else
#define FREQKV_HD
#endif

namespace freqkv {

// bfloat16 with round-to-nearest-even, usable on the host and (as plain storage) on the device.
// The CUDA backend reinterprets it as __nv_bfloat16, which has the same layout.
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  FREQKV_HD explicit bf16(float f) : bits(from_float(f)) {}
  FREQKV_HD explicit operator float() const { return to_float(bits); }

  FREQKV_HD static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return 0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  FREQKV_HD static float to_float(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

// The type of per-row statistics (norms, log-sum-exp, losses) for an element type.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using Acc = typename AccType<T>::type;

}  // namespace freqkv
