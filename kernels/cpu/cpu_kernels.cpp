#include "kernels/cpu/cpu_kernels.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "kernels/freqkv_matrix.h"

namespace freqkv {

namespace {

// Cache-line (and AVX-512 vector) alignment for every allocation.
constexpr size_t kAlignment = 64;

}  // namespace

template <typename T>
std::string CpuKernels<T>::name() const {
  return sizeof(T) == sizeof(float) ? "cpu-fp32" : "cpu-fp64";
}

template <typename T>
void* CpuKernels<T>::allocate_bytes(size_t bytes) {
  // std::aligned_alloc wants a multiple of the alignment, and a size of 0 is implementation
  // defined: round up, with one line at least, so every call returns a distinct live pointer.
  const size_t rounded =
      bytes == 0 ? kAlignment : (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* p = std::aligned_alloc(kAlignment, rounded);
  if (p == nullptr) {
    throw std::runtime_error(name() + ": failed to allocate " + std::to_string(bytes) +
                             " bytes of host memory");
  }
  std::memset(p, 0, rounded);
  return p;
}

template <typename T>
void CpuKernels<T>::free_bytes(void* p) {
  std::free(p);
}

template <typename T>
void CpuKernels<T>::copy_to_device(void* dst, const void* host_src, size_t bytes) {
  if (bytes > 0) std::memcpy(dst, host_src, bytes);
}

template <typename T>
void CpuKernels<T>::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memcpy(host_dst, src, bytes);
}

template <typename T>
void CpuKernels<T>::copy_on_device(void* dst, const void* src, size_t bytes) {
  // memmove: a copy within one buffer may overlap.
  if (bytes > 0) std::memmove(dst, src, bytes);
}

template <typename T>
void CpuKernels<T>::fill_zero(void* dst, size_t bytes) {
  if (bytes > 0) std::memset(dst, 0, bytes);
}

template <typename T>
void CpuKernels<T>::upload(T* dst, const float* host_src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(host_src[i]);
}

template <typename T>
void CpuKernels<T>::upload(T* dst, const double* host_src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(host_src[i]);
}

template <typename T>
void CpuKernels<T>::download(float* host_dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) host_dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void CpuKernels<T>::download(double* host_dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) host_dst[i] = static_cast<double>(src[i]);
}

template <typename T>
const std::vector<T>& CpuKernels<T>::compression_matrix(int64_t n_in, int64_t n_out) {
  std::lock_guard<std::mutex> lock(compression_mutex_);
  const auto key = std::make_pair(n_in, n_out);
  auto it = compression_matrices_.find(key);
  if (it == compression_matrices_.end()) {
    // Computed in double, rounded to T once.
    const std::vector<double> p = freqkv_compression_matrix(n_in, n_out);
    it = compression_matrices_.emplace(key, std::vector<T>(p.begin(), p.end())).first;
  }
  return it->second;
}

template <typename T>
void CpuKernels<T>::freqkv_compress(T* out, int64_t ld_out, const T* in, int64_t ld_in,
                                    int64_t n_in, int64_t n_out, int64_t channels) {
  const std::vector<T>& p = compression_matrix(n_in, n_out);
  // out[L, C] = P[L, N] in[N, C]
  cpu::gemm<T>(false, false, n_out, channels, n_in, 1.0, p.data(), n_in, in, ld_in, 0.0, out,
               ld_out);
}

template <typename T>
void CpuKernels<T>::freqkv_compress_backward(T* din, int64_t ld_in, const T* dout, int64_t ld_out,
                                             int64_t n_in, int64_t n_out, int64_t channels) {
  const std::vector<T>& p = compression_matrix(n_in, n_out);
  // din[N, C] += P^T[N, L] dout[L, C]; P is stored L x N, hence trans_a with lda = N.
  cpu::gemm<T>(true, false, n_in, channels, n_out, 1.0, p.data(), n_in, dout, ld_out, 1.0, din,
               ld_in);
}

template <typename T>
std::unique_ptr<Kernels<T>> make_cpu_kernels() {
  return std::make_unique<CpuKernels<T>>();
}

template class CpuKernels<float>;
template class CpuKernels<double>;
template std::unique_ptr<Kernels<float>> make_cpu_kernels<float>();
template std::unique_ptr<Kernels<double>> make_cpu_kernels<double>();

}  // namespace freqkv
