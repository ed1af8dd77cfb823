// The per-element math of FreqKV compression computed with FFTs instead of the L x N matrix P
// (kernels/cuda/freqkv_fft.cu), shared with its CPU test (tests/test_dct_fft_math.cpp), which
// rebuilds the DCTs and P from these functions and a naive DFT and checks them against
// kernels/freqkv_matrix.h to 1e-12.
//
// The method is Makhoul's (1980): the orthonormal DCT-II of a real x of length n is one real FFT of
// the reordered sequence v,
//     v[m] = x[2m] (m < ceil(n/2)),  v[n-1-j] = x[2j+1],
//     X_k = Re( e^{-i pi k / 2n} V_k ),  DCT(x)_k = a_k X_k,  V = FFT_n(v) (no normalisation),
// and the DCT-III (its inverse) runs the same steps backwards: from unnormalised coefficients X,
//     W_k = e^{+i pi k / 2n} (X_k - i X_{n-k})  (X_n = 0),  v = (1/n) IFFT_n(W),  x[2m] = v[m], ...
// A real FFT keeps the bins 0..n/2 only (V_{n-k} = conj(V_k)), so every function here takes that
// half spectrum.
//
// Compression N -> L (forward) and its adjoint L -> N (backward) are then one pipeline,
// "resample n_src -> n_dst": reorder, real FFT of length n_src, per output bin k <= n_dst/2 the
// coefficients k and n_dst - k mapped from the source spectrum (truncated to the L lowest, or
// zero-padded), inverse real FFT of length n_dst, reorder back. Since the orthonormal scales a_k
// of lengths n_src and n_dst differ by sqrt(n_dst/n_src) for every k, the whole scale
//     sqrt(L/N) * a_k(n_src) / a_k(n_dst) / n_dst
// is 1/N in both directions (dct_resample_gain).
//
// Every function is `inline FREQKV_HD` (see kernels/kernel_math.h): host and device alike.
// Complex numbers are any struct with members x and y (cufftComplex / float2 on the device,
// a {double x, y} in the test); the real type is that of x, and float computes in float.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kernels/dtype.h"

namespace freqkv {

// ---- Makhoul's reordering -----------------------------------------------------------------------
// Position m of the reordered sequence v holds element makhoul_source(m, n) of x: the even
// elements ascending, then the odd ones descending.
FREQKV_HD inline int64_t makhoul_source(int64_t m, int64_t n) {
  const int64_t n_even = (n + 1) / 2;
  return m < n_even ? 2 * m : 2 * (n - 1 - m) + 1;
}

// The inverse map: element i of x sits at position makhoul_position(i, n) of v.
FREQKV_HD inline int64_t makhoul_position(int64_t i, int64_t n) {
  return i % 2 == 0 ? i / 2 : n - 1 - (i - 1) / 2;
}

// ---- scales -------------------------------------------------------------------------------------
// a_k of the orthonormal DCT of length n: sqrt(1/n) for k = 0, sqrt(2/n) otherwise.
FREQKV_HD inline double dct_orthonormal_scale(int64_t k, int64_t n) {
  return sqrt((k == 0 ? 1.0 : 2.0) / static_cast<double>(n));
}

// sqrt(L/N) of compression N -> L, for either direction (n_src, n_dst) = (N, L) or (L, N): it
// keeps a constant sequence the same constant.
FREQKV_HD inline double freqkv_rescale(int64_t n_src, int64_t n_dst) {
  const double n_kept = static_cast<double>(n_src < n_dst ? n_src : n_dst);
  const double n_full = static_cast<double>(n_src < n_dst ? n_dst : n_src);
  return sqrt(n_kept / n_full);
}

// The factor taking an unnormalised DCT-II coefficient X_k of the length-n_src FFT to the
// unnormalised coefficient of length n_dst that the inverse FFT expects, including the inverse
// FFT's 1/n_dst: sqrt(L/N) a_k(n_src) / a_k(n_dst) / n_dst (the same for every k).
FREQKV_HD inline double dct_resample_gain(int64_t n_src, int64_t n_dst) {
  return freqkv_rescale(n_src, n_dst) * dct_orthonormal_scale(1, n_src) /
         dct_orthonormal_scale(1, n_dst) / static_cast<double>(n_dst);
}

// ---- twiddle factors ----------------------------------------------------------------------------
// cos and sin of the DCT twiddle angle pi k / 2n, where k / 2n is formed in the caller's real
// type. On the device sincospi keeps the float angle accurate (no rounding of pi k / 2n).
FREQKV_HD inline void dct_twiddle(int64_t k, int64_t n, float* c, float* s) {
  const float half_turns = static_cast<float>(k) / static_cast<float>(2 * n);
#if defined(__CUDA_ARCH__)
  sincospif(half_turns, s, c);
#else
  const double angle = 3.14159265358979323846 * static_cast<double>(half_turns);
  *c = static_cast<float>(cos(angle));
  *s = static_cast<float>(sin(angle));
#endif
}
FREQKV_HD inline void dct_twiddle(int64_t k, int64_t n, double* c, double* s) {
  const double half_turns = static_cast<double>(k) / static_cast<double>(2 * n);
#if defined(__CUDA_ARCH__)
  sincospi(half_turns, s, c);
#else
  const double angle = 3.14159265358979323846 * half_turns;
  *c = cos(angle);
  *s = sin(angle);
#endif
}

// ---- forward: DCT-II from the half spectrum -----------------------------------------------------
// Bin k (0 <= k < n) of the full spectrum of a real sequence, from the n/2 + 1 stored bins
// (bin b at half_spectrum[b * stride]): V_k, or conj(V_{n-k}) above n/2.
template <typename Complex>
FREQKV_HD inline Complex real_fft_bin(const Complex* half_spectrum, int64_t stride, int64_t k,
                                      int64_t n) {
  if (k <= n / 2) return half_spectrum[k * stride];
  Complex v = half_spectrum[(n - k) * stride];
  v.y = -v.y;
  return v;
}

// The unnormalised DCT-II coefficient X_k = Re(e^{-i pi k / 2n} V_k) of the sequence whose
// reordered FFT is stored in half_spectrum.
template <typename Complex>
FREQKV_HD inline auto dct2_coefficient(const Complex* half_spectrum, int64_t stride, int64_t k,
                                       int64_t n) -> decltype(Complex{}.x) {
  using Real = decltype(Complex{}.x);
  const Complex v = real_fft_bin(half_spectrum, stride, k, n);
  Real c, s;
  dct_twiddle(k, n, &c, &s);
  // Re((c - i s)(v.x + i v.y)) = c v.x + s v.y
  return c * v.x + s * v.y;
}

// ---- inverse: the DCT-III's FFT input -----------------------------------------------------------
// Bin k (0 <= k <= n/2) of W = e^{+i pi k / 2n} (X_k - i X_{n-k}) for the inverse real FFT of
// length n, from the unnormalised coefficients X_k and X_{n-k} (0 for k = 0: X_n does not exist).
template <typename Complex>
FREQKV_HD inline Complex dct3_bin(decltype(Complex{}.x) x_k, decltype(Complex{}.x) x_n_minus_k,
                                  int64_t k, int64_t n) {
  using Real = decltype(Complex{}.x);
  Real c, s;
  dct_twiddle(k, n, &c, &s);
  // (c + i s)(a - i b) = (c a + s b) + i (s a - c b)
  Complex w;
  w.x = c * x_k + s * x_n_minus_k;
  w.y = s * x_k - c * x_n_minus_k;
  return w;
}

// ---- the resampling N -> L (compression) or L -> N (its adjoint) --------------------------------
// Bin k (0 <= k <= n_dst/2) of the inverse FFT's input of length n_dst, from the half spectrum of
// the reordered source of length n_src: coefficients k and n_dst - k of the source DCT when they
// are among the min(n_src, n_dst) kept ones, else 0, times dct_resample_gain. `gain` is passed in
// (computed once per call, in the caller's real type).
template <typename Complex>
FREQKV_HD inline Complex dct_resample_bin(const Complex* src_half_spectrum, int64_t stride,
                                          int64_t k, int64_t n_src, int64_t n_dst,
                                          decltype(Complex{}.x) gain) {
  using Real = decltype(Complex{}.x);
  const int64_t n_kept = n_src < n_dst ? n_src : n_dst;
  const int64_t mirror = n_dst - k;
  const Real x_k =
      k < n_kept ? gain * dct2_coefficient(src_half_spectrum, stride, k, n_src) : Real(0);
  const Real x_mirror = k > 0 && mirror < n_kept
                            ? gain * dct2_coefficient(src_half_spectrum, stride, mirror, n_src)
                            : Real(0);
  return dct3_bin<Complex>(x_k, x_mirror, k, n_dst);
}

}  // namespace freqkv
