// Tiny per-element formulas shared by the CPU backend and its CUDA twin, so both compute the same
// thing the same way. Every function is `inline FREQKV_HD` and uses only the C math library
// (exp/expf, ...), which exists on the host and in device code alike. Float and double overloads
// are separate on purpose: a float kernel must not silently widen to double on the device.
#pragma once

#include <math.h>

#include "kernels/dtype.h"

namespace freqkv {

// ---- SiLU (the gate of LLaMA's SwiGLU MLP)
// -------------------------------------------------------- sigmoid(x) = 1 / (1 + e^-x): for very
// negative x, e^-x overflows to +inf and the result is an exact 0 (never NaN), so no branch is
// needed.
FREQKV_HD inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
FREQKV_HD inline double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// silu(x) = x * sigmoid(x)
FREQKV_HD inline float silu(float x) { return x * sigmoid(x); }
FREQKV_HD inline double silu(double x) { return x * sigmoid(x); }

// d silu / dx = s + x s (1 - s) = s (1 + x (1 - s)), with s = sigmoid(x).
FREQKV_HD inline float silu_derivative(float x) {
  const float s = sigmoid(x);
  return s * (1.0f + x * (1.0f - s));
}
FREQKV_HD inline double silu_derivative(double x) {
  const double s = sigmoid(x);
  return s * (1.0 + x * (1.0 - s));
}

// ---- RoPE (Hugging Face rotate-half) ------------------------------------------------------------
// The frequency of pair i of a head of size head_dim: theta^(-2i / head_dim). Always in double:
// positions reach tens of thousands, and an fp32 angle p * f_i would lose several digits.
FREQKV_HD inline double rope_inv_freq(int pair_index, int head_dim, double theta) {
  return pow(theta, -2.0 * pair_index / head_dim);
}

// Rotates the pair (x[i], x[i + D/2]) by the angle whose cosine and sine are given:
//   y_lo = x_lo cos - x_hi sin,   y_hi = x_hi cos + x_lo sin.
// The inverse rotation is the same call with -sin.
template <typename A>
FREQKV_HD inline void rope_rotate_pair(A x_lo, A x_hi, A cos_a, A sin_a, A* y_lo, A* y_hi) {
  *y_lo = x_lo * cos_a - x_hi * sin_a;
  *y_hi = x_hi * cos_a + x_lo * sin_a;
}

// ---- bf16 ---------------------------------------------------------------------------------------
// Rounds a float to the nearest bf16 value (ties to even) and back: what storing to bf16 does.
FREQKV_HD inline float round_to_bf16(float x) { return bf16::to_float(bf16::from_float(x)); }

}  // namespace freqkv
