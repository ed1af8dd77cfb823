// The CPU backend of Kernels<T> for T = float (the default CPU path) and T = double (gradient
// checks). Memory is ordinary host memory; GEMMs go to OpenBLAS, row loops are parallelised with
// OpenMP. Each kernel is a free function template in namespace freqkv::cpu, one per source file
// (gemm.cpp, elementwise.cpp, ...), instantiated for float and double; CpuKernels forwards to them.
// The semantics of every call are those documented in kernels/kernels.h.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernels.h"

namespace freqkv {

namespace cpu {

// gemm.cpp
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, double beta, T* C, int64_t ldc);

// elementwise.cpp
template <typename T>
void add(T* out, const T* a, const T* b, int64_t n);
template <typename T>
void axpy(T* y, double alpha, const T* x, int64_t n);
template <typename T>
double sum_squares(const T* x, int64_t n);
template <typename T>
void scale(T* x, double alpha, int64_t n);
template <typename T>
void gather_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, const int64_t* map,
                 int64_t n_rows, int64_t width);
template <typename T>
void scatter_add_rows(T* dsrc, int64_t ld_src, const T* ddst, int64_t ld_dst, const int64_t* map,
                      int64_t n_rows, int64_t width);
template <typename T>
void adamw_update(float* master, float* m, float* v, T* param, const T* grad, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step,
                  double grad_scale);

// embedding.cpp
template <typename T>
void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t n_tokens,
                       int64_t dim);
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n_tokens,
                        int64_t dim);

// rmsnorm.cpp
template <typename T>
void rmsnorm_forward(T* out, Acc<T>* rstd, const T* x, const T* weight, int64_t n_rows, int64_t dim,
                     double eps);
template <typename T>
void rmsnorm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight,
                      const Acc<T>* rstd, int64_t n_rows, int64_t dim);

// rope.cpp
template <typename T>
void rope(T* out, int64_t ld_out, const T* x, int64_t ld_x, const int32_t* positions,
          int64_t n_rows, int n_heads, int head_dim, double theta, bool inverse);

// attention.cpp
template <typename T>
void attention_forward(T* out, int64_t ld_out, Acc<T>* lse, const T* q, int64_t ld_q, const T* k,
                       const T* v, int64_t ld_kv, const std::vector<AttnBlock>& blocks,
                       const AttnShape& shape);
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, int64_t ld_dout, const T* out,
                        const Acc<T>* lse, const T* q, int64_t ld_q, const T* k, const T* v,
                        int64_t ld_kv, const std::vector<AttnBlock>& blocks,
                        const AttnShape& shape);

// swiglu.cpp
template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, int64_t n);
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, int64_t n);

// cross_entropy.cpp
template <typename T>
void cross_entropy_stats(Acc<T>* lse, Acc<T>* target_logit, const T* logits, int64_t ld_logits,
                         const int32_t* targets, int64_t n_rows, int64_t vocab,
                         int64_t vocab_begin);
template <typename T>
void cross_entropy_grad(T* logits, int64_t ld_logits, const Acc<T>* lse, const int32_t* targets,
                        int64_t n_rows, int64_t vocab, int64_t vocab_begin, double grad_scale);
template <typename T>
void cross_entropy(Acc<T>* losses, T* logits, int64_t ld_logits, const int32_t* targets,
                   int64_t n_rows, int64_t vocab, double grad_scale);

}  // namespace cpu

template <typename T>
class CpuKernels final : public Kernels<T> {
 public:
  using acc_t = Acc<T>;

  std::string name() const override;

  void* allocate_bytes(size_t bytes) override;
  void free_bytes(void* p) override;
  void copy_to_device(void* dst, const void* host_src, size_t bytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void copy_on_device(void* dst, const void* src, size_t bytes) override;
  void fill_zero(void* dst, size_t bytes) override;
  void synchronize() override {}
  void upload(T* dst, const float* host_src, int64_t n) override;
  void upload(T* dst, const double* host_src, int64_t n) override;
  void download(float* host_dst, const T* src, int64_t n) override;
  void download(double* host_dst, const T* src, int64_t n) override;

  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const T* A,
            int64_t lda, const T* B, int64_t ldb, double beta, T* C, int64_t ldc) override {
    cpu::gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void add(T* out, const T* a, const T* b, int64_t n) override { cpu::add(out, a, b, n); }
  void axpy(T* y, double alpha, const T* x, int64_t n) override { cpu::axpy(y, alpha, x, n); }
  double sum_squares(const T* x, int64_t n) override { return cpu::sum_squares(x, n); }
  void scale(T* x, double alpha, int64_t n) override { cpu::scale(x, alpha, n); }

  void gather_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, const int64_t* map,
                   int64_t n_rows, int64_t width) override {
    cpu::gather_rows(dst, ld_dst, src, ld_src, map, n_rows, width);
  }
  void scatter_add_rows(T* dsrc, int64_t ld_src, const T* ddst, int64_t ld_dst, const int64_t* map,
                        int64_t n_rows, int64_t width) override {
    cpu::scatter_add_rows(dsrc, ld_src, ddst, ld_dst, map, n_rows, width);
  }

  void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t n_tokens,
                         int64_t dim) override {
    cpu::embedding_forward(out, table, tokens, n_tokens, dim);
  }
  void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n_tokens,
                          int64_t dim) override {
    cpu::embedding_backward(dtable, dout, tokens, n_tokens, dim);
  }

  void rmsnorm_forward(T* out, acc_t* rstd, const T* x, const T* weight, int64_t n_rows,
                       int64_t dim, double eps) override {
    cpu::rmsnorm_forward(out, rstd, x, weight, n_rows, dim, eps);
  }
  void rmsnorm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight,
                        const acc_t* rstd, int64_t n_rows, int64_t dim) override {
    cpu::rmsnorm_backward(dx, dweight, dout, x, weight, rstd, n_rows, dim);
  }

  void rope(T* out, int64_t ld_out, const T* x, int64_t ld_x, const int32_t* positions,
            int64_t n_rows, int n_heads, int head_dim, double theta, bool inverse) override {
    cpu::rope(out, ld_out, x, ld_x, positions, n_rows, n_heads, head_dim, theta, inverse);
  }

  void attention_forward(T* out, int64_t ld_out, acc_t* lse, const T* q, int64_t ld_q, const T* k,
                         const T* v, int64_t ld_kv, const std::vector<AttnBlock>& blocks,
                         const AttnShape& shape) override {
    cpu::attention_forward(out, ld_out, lse, q, ld_q, k, v, ld_kv, blocks, shape);
  }
  void attention_backward(T* dq, T* dk, T* dv, const T* dout, int64_t ld_dout, const T* out,
                          const acc_t* lse, const T* q, int64_t ld_q, const T* k, const T* v,
                          int64_t ld_kv, const std::vector<AttnBlock>& blocks,
                          const AttnShape& shape) override {
    cpu::attention_backward(dq, dk, dv, dout, ld_dout, out, lse, q, ld_q, k, v, ld_kv, blocks,
                            shape);
  }

  void swiglu_forward(T* out, const T* gate, const T* up, int64_t n) override {
    cpu::swiglu_forward(out, gate, up, n);
  }
  void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
                       int64_t n) override {
    cpu::swiglu_backward(dgate, dup, dout, gate, up, n);
  }

  void cross_entropy_stats(acc_t* lse, acc_t* target_logit, const T* logits, int64_t ld_logits,
                           const int32_t* targets, int64_t n_rows, int64_t vocab,
                           int64_t vocab_begin) override {
    cpu::cross_entropy_stats(lse, target_logit, logits, ld_logits, targets, n_rows, vocab,
                             vocab_begin);
  }
  void cross_entropy_grad(T* logits, int64_t ld_logits, const acc_t* lse, const int32_t* targets,
                          int64_t n_rows, int64_t vocab, int64_t vocab_begin,
                          double grad_scale) override {
    cpu::cross_entropy_grad(logits, ld_logits, lse, targets, n_rows, vocab, vocab_begin,
                            grad_scale);
  }
  void cross_entropy(acc_t* losses, T* logits, int64_t ld_logits, const int32_t* targets,
                     int64_t n_rows, int64_t vocab, double grad_scale) override {
    cpu::cross_entropy(losses, logits, ld_logits, targets, n_rows, vocab, grad_scale);
  }

  void freqkv_compress(T* out, int64_t ld_out, const T* in, int64_t ld_in, int64_t n_in,
                       int64_t n_out, int64_t channels) override;
  void freqkv_compress_backward(T* din, int64_t ld_in, const T* dout, int64_t ld_out, int64_t n_in,
                                int64_t n_out, int64_t channels) override;

  void adamw_update(float* master, float* m, float* v, T* param, const T* grad, int64_t n,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step, double grad_scale) override {
    cpu::adamw_update(master, m, v, param, grad, n, lr, beta1, beta2, eps, weight_decay, step,
                      grad_scale);
  }

 private:
  // The compression matrix P_{n_in -> n_out} in T, L x N row-major, built on first use. The map
  // never moves its elements, so a returned reference stays valid while others are inserted.
  const std::vector<T>& compression_matrix(int64_t n_in, int64_t n_out);

  std::mutex compression_mutex_;
  std::map<std::pair<int64_t, int64_t>, std::vector<T>> compression_matrices_;
};

// The CPU backend for T = float or double.
template <typename T>
std::unique_ptr<Kernels<T>> make_cpu_kernels();

}  // namespace freqkv
