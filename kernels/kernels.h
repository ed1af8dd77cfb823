// The kernel interface: every numerical operation the model performs, behind one abstract class.
//
// Model code is written once against Kernels<T> and never asks which device it runs on.
//   T = float   CPU backend (fp32, BLAS GEMMs): the default CPU path, tests and CI.
//   T = double  CPU backend in double precision: finite-difference gradient checks.
//   T = bf16    CUDA backend (bf16 storage, fp32 accumulation), see kernels/cuda.
// Small per-row statistics (RMSNorm's 1/rms, attention's log-sum-exp, per-token losses) are kept
// in Acc<T> (float, or double for T = double) so that double-precision checks stay exact.
//
// Conventions, for every function below:
//   - Matrices are row-major; `ld*` is the distance in elements between consecutive rows, so a
//     column block of a wider buffer can be read or written in place.
//   - Pointers point to memory of this backend (host memory for CPU, device memory for CUDA).
//   - Forward outputs are overwritten. Backward outputs say whether they overwrite (`=`) or
//     accumulate (`+=`): parameter gradients always accumulate, like llm.c.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"

namespace freqkv {

// One block of varlen attention (as flash-attention's cu_seqlens): queries are rows
// [q_start, q_start + n_q) of q/out, keys and values are rows [kv_start, kv_start + n_kv) of k/v.
// Causal, bottom-right aligned: query i (0-based within the block) sees keys j <= i + n_kv - n_q.
// FreqKV chunks have n_kv = sink + memory + n_q; plain causal attention has n_kv = n_q.
struct AttnBlock {
  int64_t q_start;
  int64_t n_q;
  int64_t kv_start;
  int64_t n_kv;
};

// Shapes shared by the attention calls: Hq query heads and Hkv key/value heads of size D
// (grouped-query attention: query head h reads key/value head h / (Hq / Hkv)).
struct AttnShape {
  int n_heads;     // Hq
  int n_kv_heads;  // Hkv, divides Hq
  int head_dim;    // D
  double scale;    // softmax scale, usually 1/sqrt(D)
};

template <typename T>
class Kernels {
 public:
  using acc_t = Acc<T>;
  virtual ~Kernels() = default;

  virtual std::string name() const = 0;  // "cpu-fp32", "cpu-fp64", "cuda-bf16", ...

  // ---- memory accounting --------------------------------------------------------------------
  // Bytes held now by the Buffers of this backend (parameters, gradients, optimiser state,
  // activations, scratch: everything the model and trainer allocate; library workspaces such as
  // cuBLAS's are not counted), and the most held at once since reset_peak_memory().
  int64_t memory_in_use() const { return bytes_in_use_; }
  int64_t peak_memory() const { return peak_bytes_; }
  void reset_peak_memory() { peak_bytes_ = bytes_in_use_; }
  // Buffer's bookkeeping: +bytes when it allocates, -bytes when it frees.
  void count_buffer_bytes(int64_t delta) {
    bytes_in_use_ += delta;
    if (bytes_in_use_ > peak_bytes_) peak_bytes_ = bytes_in_use_;
  }

  // ---- memory -------------------------------------------------------------------------------
  // Raw allocation on this backend (zero-filled); Buffer<U> below wraps it.
  virtual void* allocate_bytes(size_t bytes) = 0;
  virtual void free_bytes(void* p) = 0;
  virtual void copy_to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy_on_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // Conversions between host double/float arrays and T arrays on the device.
  virtual void upload(T* dst, const float* host_src, int64_t n) = 0;
  virtual void upload(T* dst, const double* host_src, int64_t n) = 0;
  virtual void download(float* host_dst, const T* src, int64_t n) = 0;
  virtual void download(double* host_dst, const T* src, int64_t n) = 0;

  // ---- dense algebra ------------------------------------------------------------------------
  // C[M,N] = alpha * op(A) * op(B) + beta * C, op(A) is M x K, op(B) is K x N (row-major).
  // trans_a: A is stored K x M; trans_b: B is stored N x K (a Linear weight [out, in] gives
  // y = x W^T with trans_b = true).
  virtual void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                    const T* A, int64_t lda, const T* B, int64_t ldb, double beta, T* C,
                    int64_t ldc) = 0;
  // out[i] = a[i] + b[i]
  virtual void add(T* out, const T* a, const T* b, int64_t n) = 0;
  // y[i] += alpha * x[i]
  virtual void axpy(T* y, double alpha, const T* x, int64_t n) = 0;
  // Sum of squares of x in double (reduced on the device, one scalar back to the host).
  virtual double sum_squares(const T* x, int64_t n) = 0;
  // x[i] *= alpha
  virtual void scale(T* x, double alpha, int64_t n) = 0;

  // ---- rows -------------------------------------------------------------------------------
  // dst[r, :width] = src[map[r], :width] for map[r] >= 0; rows with map[r] < 0 are left as they
  // are. `map` is a device array of n_rows indices.
  virtual void gather_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src,
                           const int64_t* map, int64_t n_rows, int64_t width) = 0;
  // The adjoint of gather_rows: dsrc[map[r], :] += ddst[r, :] for map[r] >= 0 (several rows may
  // map to one source row: they all add up).
  virtual void scatter_add_rows(T* dsrc, int64_t ld_src, const T* ddst, int64_t ld_dst,
                                const int64_t* map, int64_t n_rows, int64_t width) = 0;

  // ---- embedding ------------------------------------------------------------------------------
  // out[n, :] = table[tokens[n], :]   (tokens: device int32 array; checked against vocab on host)
  virtual void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t n_tokens,
                                 int64_t dim) = 0;
  // dtable[tokens[n], :] += dout[n, :]
  virtual void embedding_backward(T* dtable, const T* dout, const int32_t* tokens,
                                  int64_t n_tokens, int64_t dim) = 0;

  // ---- RMSNorm (LLaMA: y = w * x / sqrt(mean(x^2) + eps), statistics in Acc<T>) ----------------
  virtual void rmsnorm_forward(T* out, acc_t* rstd, const T* x, const T* weight, int64_t n_rows,
                               int64_t dim, double eps) = 0;
  // dx += d/dx, dweight += d/dweight.
  virtual void rmsnorm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight,
                                const acc_t* rstd, int64_t n_rows, int64_t dim) = 0;

  // ---- RoPE (Hugging Face rotate-half convention) ----------------------------------------------
  // For each row r and head h, with p = positions[r] and i < D/2, f_i = theta^(-2i/D):
  //   out[i]       = x[i] cos(p f_i) - x[i + D/2] sin(p f_i)
  //   out[i + D/2] = x[i + D/2] cos(p f_i) + x[i] sin(p f_i)
  // `inverse` rotates by -p f_i: the backward of the forward rotation (it is orthogonal).
  // out may equal x (in place). positions: device int32 array of n_rows.
  virtual void rope(T* out, int64_t ld_out, const T* x, int64_t ld_x, const int32_t* positions,
                    int64_t n_rows, int n_heads, int head_dim, double theta, bool inverse) = 0;

  // ---- attention ------------------------------------------------------------------------------
  // out[r, h*D:(h+1)*D] = softmax(scale * q_h k_g^T + causal mask) v_g over the block holding r;
  // lse[r * Hq + h] = the log-sum-exp of the scaled scores (kept for the backward).
  // `blocks` is a host array; the blocks' query ranges do not overlap and cover all query rows.
  virtual void attention_forward(T* out, int64_t ld_out, acc_t* lse, const T* q, int64_t ld_q,
                                 const T* k, const T* v, int64_t ld_kv,
                                 const std::vector<AttnBlock>& blocks, const AttnShape& shape) = 0;
  // dq = , dk = , dv = (rows of k/v outside every block are left as they are; k rows used by
  // one block only, as FreqKV lays them out).
  virtual void attention_backward(T* dq, T* dk, T* dv, const T* dout, int64_t ld_dout,
                                  const T* out, const acc_t* lse, const T* q, int64_t ld_q,
                                  const T* k, const T* v, int64_t ld_kv,
                                  const std::vector<AttnBlock>& blocks,
                                  const AttnShape& shape) = 0;

  // ---- SwiGLU (LLaMA MLP: silu(gate) * up) ------------------------------------------------------
  virtual void swiglu_forward(T* out, const T* gate, const T* up, int64_t n) = 0;
  // dgate = , dup =
  virtual void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
                               int64_t n) = 0;

  // ---- cross-entropy over the vocabulary --------------------------------------------------------
  // For each row n with targets[n] >= 0: losses[n] = logsumexp(logits[n]) - logits[n, targets[n]];
  // rows with targets[n] < 0 get loss 0. If grad_scale != 0, logits are overwritten in place by
  // grad_scale * (softmax(logits[n]) - onehot(targets[n])) (zero for ignored rows): the gradient
  // of grad_scale * sum(losses), fused like llm.c's classifier so logits are never stored twice.
  virtual void cross_entropy(acc_t* losses, T* logits, int64_t ld_logits, const int32_t* targets,
                             int64_t n_rows, int64_t vocab, double grad_scale) = 0;

  // ---- vocabulary-parallel cross-entropy (Megatron's) ------------------------------------------------
  // This rank holds the logits of vocabulary ids [vocab_begin, vocab_begin + vocab). Per row:
  // lse[n] = logsumexp of the local logits, target_logit[n] = the target's logit when the target
  // is local, else 0. The caller combines the ranks (global lse = log sum_r exp(lse_r); the
  // target logit is a sum) and calls cross_entropy_grad with the global lse.
  // The defaults run on the host through download/upload: a correct fallback for a backend
  // without its own kernels.
  virtual void cross_entropy_stats(acc_t* lse, acc_t* target_logit, const T* logits,
                                   int64_t ld_logits, const int32_t* targets, int64_t n_rows,
                                   int64_t vocab, int64_t vocab_begin);
  // logits[n, c] = grad_scale * (exp(logits[n, c] - lse[n]) - [targets[n] == vocab_begin + c])
  // for rows with targets[n] >= 0, and 0 for the others.
  virtual void cross_entropy_grad(T* logits, int64_t ld_logits, const acc_t* lse,
                                  const int32_t* targets, int64_t n_rows, int64_t vocab,
                                  int64_t vocab_begin, double grad_scale);

  // ---- FreqKV compression ------------------------------------------------------------------------
  // out[L, C] = P_{N->L} in[N, C], P = sqrt(L/N) D_L^T D_N[0:L, :] (see kernels/freqkv_matrix.h).
  // The CPU backend multiplies by P; the CUDA backend also has cuFFT DCTs, O(N log N) per channel
  // (kernels/compression_impl.h chooses, kernels/dct_fft_math.h holds their math).
  virtual void freqkv_compress(T* out, int64_t ld_out, const T* in, int64_t ld_in, int64_t n_in,
                               int64_t n_out, int64_t channels) = 0;
  // din[N, C] += P^T dout[L, C]   (the adjoint of freqkv_compress)
  virtual void freqkv_compress_backward(T* din, int64_t ld_in, const T* dout, int64_t ld_out,
                                        int64_t n_in, int64_t n_out, int64_t channels) = 0;

  // ---- optimiser ----------------------------------------------------------------------------------
  // One AdamW step (decoupled weight decay, bias-corrected, PyTorch's torch.optim.AdamW) on fp32
  // master weights; the gradient is multiplied by grad_scale first (clipping, accumulation), and
  // the updated master weights are written back to the model's copy `param` in T. `step` >= 1.
  virtual void adamw_update(float* master, float* m, float* v, T* param, const T* grad, int64_t n,
                            double lr, double beta1, double beta2, double eps,
                            double weight_decay, int64_t step, double grad_scale) = 0;

 private:
  int64_t bytes_in_use_ = 0, peak_bytes_ = 0;
};

template <typename T>
void Kernels<T>::cross_entropy_stats(acc_t* lse, acc_t* target_logit, const T* logits,
                                     int64_t ld_logits, const int32_t* targets, int64_t n_rows,
                                     int64_t vocab, int64_t vocab_begin) {
  std::vector<double> row(static_cast<size_t>(vocab));
  std::vector<int32_t> t(static_cast<size_t>(n_rows));
  std::vector<acc_t> out_lse(static_cast<size_t>(n_rows)), out_target(static_cast<size_t>(n_rows));
  if (n_rows > 0) copy_to_host(t.data(), targets, t.size() * sizeof(int32_t));
  for (int64_t n = 0; n < n_rows; ++n) {
    download(row.data(), logits + n * ld_logits, vocab);
    double mx = row[0], sum = 0;
    for (double v : row) mx = v > mx ? v : mx;
    for (double v : row) sum += std::exp(v - mx);
    out_lse[n] = static_cast<acc_t>(mx + std::log(sum));
    const int64_t local = static_cast<int64_t>(t[n]) - vocab_begin;
    out_target[n] = static_cast<acc_t>(t[n] >= 0 && local >= 0 && local < vocab ? row[local] : 0.0);
  }
  if (n_rows > 0) {
    copy_to_device(lse, out_lse.data(), out_lse.size() * sizeof(acc_t));
    copy_to_device(target_logit, out_target.data(), out_target.size() * sizeof(acc_t));
  }
}

template <typename T>
void Kernels<T>::cross_entropy_grad(T* logits, int64_t ld_logits, const acc_t* lse,
                                    const int32_t* targets, int64_t n_rows, int64_t vocab,
                                    int64_t vocab_begin, double grad_scale) {
  std::vector<double> row(static_cast<size_t>(vocab));
  std::vector<int32_t> t(static_cast<size_t>(n_rows));
  std::vector<acc_t> l(static_cast<size_t>(n_rows));
  if (n_rows > 0) {
    copy_to_host(t.data(), targets, t.size() * sizeof(int32_t));
    copy_to_host(l.data(), lse, l.size() * sizeof(acc_t));
  }
  for (int64_t n = 0; n < n_rows; ++n) {
    download(row.data(), logits + n * ld_logits, vocab);
    for (int64_t c = 0; c < vocab; ++c)
      row[c] = t[n] < 0 ? 0.0
                        : grad_scale * (std::exp(row[c] - static_cast<double>(l[n])) -
                                        (t[n] == vocab_begin + c ? 1.0 : 0.0));
    upload(logits + n * ld_logits, row.data(), vocab);
  }
}

// A typed array in a backend's memory, freed with it. Movable, not copyable.
template <typename U>
class Buffer {
 public:
  Buffer() = default;
  template <typename T>
  Buffer(Kernels<T>& k, int64_t n) : size_(n) {
    if (n > 0) {
      Kernels<T>* kp = &k;
      const int64_t bytes = n * static_cast<int64_t>(sizeof(U));
      ptr_ = std::shared_ptr<void>(k.allocate_bytes(static_cast<size_t>(bytes)),
                                   [kp, bytes](void* p) {
                                     kp->free_bytes(p);
                                     kp->count_buffer_bytes(-bytes);
                                   });
      k.count_buffer_bytes(bytes);
    }
  }
  U* data() const { return static_cast<U*>(ptr_.get()); }
  int64_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

 private:
  std::shared_ptr<void> ptr_;
  int64_t size_ = 0;
};

// Copies a host vector into a new buffer of the backend.
template <typename U, typename T>
Buffer<U> upload_array(Kernels<T>& k, const std::vector<U>& host) {
  Buffer<U> b(k, static_cast<int64_t>(host.size()));
  if (!host.empty()) k.copy_to_device(b.data(), host.data(), host.size() * sizeof(U));
  return b;
}

}  // namespace freqkv
