// The LLaMA MLP's gated activation: out = silu(gate) * up.
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernel_math.h"

namespace freqkv::cpu {

namespace {

constexpr int64_t kParallelMinElements = int64_t{1} << 15;

}  // namespace

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, int64_t n) {
#pragma omp parallel for simd if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) out[i] = silu(gate[i]) * up[i];
}

// d out / d gate = silu'(gate) * up,  d out / d up = silu(gate).
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, int64_t n) {
#pragma omp parallel for simd if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    const T dy = dout[i];
    // Read everything before writing: dgate or dup may alias dout.
    const T new_dgate = dy * up[i] * silu_derivative(g);
    const T new_dup = dy * silu(g);
    dgate[i] = new_dgate;
    dup[i] = new_dup;
  }
}

template void swiglu_forward<float>(float*, const float*, const float*, int64_t);
template void swiglu_forward<double>(double*, const double*, const double*, int64_t);
template void swiglu_backward<float>(float*, float*, const float*, const float*, const float*,
                                     int64_t);
template void swiglu_backward<double>(double*, double*, const double*, const double*, const double*,
                                      int64_t);

}  // namespace freqkv::cpu
