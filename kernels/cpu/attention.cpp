// Varlen causal attention with grouped-query heads (see AttnBlock in kernels/kernels.h).
//
// Naive but cache-friendly: one query row at a time, scores over its visible keys, a stable
// softmax, the weighted sum of values. The backward recomputes the probabilities from the saved
// log-sum-exp (as flash-attention does) instead of storing them.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/attention_checks.h"
#include "kernels/cpu/cpu_kernels.h"

namespace freqkv::cpu {

namespace {

// Query rows per forward task: small enough to balance the triangle of a causal block over the
// threads, large enough to amortise the scratch set-up.
constexpr int64_t kForwardRowTile = 32;

template <typename A, typename T, typename U>
inline A dot(const T* a, const U* b, int n) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int d = 0; d < n; ++d) sum += static_cast<A>(a[d]) * static_cast<A>(b[d]);
  return sum;
}

}  // namespace

template <typename T>
void attention_forward(T* out, int64_t ld_out, Acc<T>* lse, const T* q, int64_t ld_q, const T* k,
                       const T* v, int64_t ld_kv, const std::vector<AttnBlock>& blocks,
                       const AttnShape& shape) {
  using A = Acc<T>;
  check_attention_arguments(blocks, shape, ld_q, ld_out, ld_kv, /*kv_disjoint=*/false,
                            "attention_forward");
  const int D = shape.head_dim;
  const int Hq = shape.n_heads;
  const int group = shape.n_heads / shape.n_kv_heads;  // query heads per key/value head
  const A scale = static_cast<A>(shape.scale);

  struct Task {
    size_t block;
    int head;
    int64_t row_begin;
    int64_t row_end;
  };
  std::vector<Task> tasks;
  int64_t max_kv = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    max_kv = std::max(max_kv, blocks[b].n_kv);
    for (int h = 0; h < Hq; ++h) {
      for (int64_t r = 0; r < blocks[b].n_q; r += kForwardRowTile) {
        tasks.push_back({b, h, r, std::min(blocks[b].n_q, r + kForwardRowTile)});
      }
    }
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());

#pragma omp parallel if (n_tasks > 1)
  {
    std::vector<A> probs(static_cast<size_t>(max_kv));  // the scores, then their exponentials
    std::vector<A> acc(static_cast<size_t>(D));
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < n_tasks; ++t) {
      const Task& task = tasks[static_cast<size_t>(t)];
      const AttnBlock& blk = blocks[task.block];
      const int g = task.head / group;
      const T* k_head = k + blk.kv_start * ld_kv + static_cast<int64_t>(g) * D;
      const T* v_head = v + blk.kv_start * ld_kv + static_cast<int64_t>(g) * D;
      for (int64_t i = task.row_begin; i < task.row_end; ++i) {
        const int64_t row = blk.q_start + i;
        const T* qi = q + row * ld_q + static_cast<int64_t>(task.head) * D;
        const int64_t n_visible = i + blk.n_kv - blk.n_q + 1;  // bottom-right causal mask

        A max_score = -std::numeric_limits<A>::infinity();
        for (int64_t j = 0; j < n_visible; ++j) {
          const A s = scale * dot<A>(qi, k_head + j * ld_kv, D);
          probs[static_cast<size_t>(j)] = s;
          max_score = std::max(max_score, s);
        }
        A sum = 0;
        for (int64_t j = 0; j < n_visible; ++j) {
          const A p = std::exp(probs[static_cast<size_t>(j)] - max_score);
          probs[static_cast<size_t>(j)] = p;
          sum += p;
        }
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t j = 0; j < n_visible; ++j) {
          const A p = probs[static_cast<size_t>(j)];
          const T* vj = v_head + j * ld_kv;
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[static_cast<size_t>(d)] += p * static_cast<A>(vj[d]);
        }
        const A inv_sum = A(1) / sum;
        T* oi = out + row * ld_out + static_cast<int64_t>(task.head) * D;
        for (int d = 0; d < D; ++d) oi[d] = static_cast<T>(acc[static_cast<size_t>(d)] * inv_sum);
        lse[row * Hq + task.head] = max_score + std::log(sum);
      }
    }
  }
}

// With P = softmax(S), S = scale Q K^T (masked), O = P V and the upstream gradient dO:
//   dV = P^T dO,  dP = dO V^T,  dS = P o (dP - rowsum(dO o O)),  dQ = scale dS K,
//   dK = scale dS^T Q.
// One task per (block, key/value head) owns that block's dk/dv rows for that head: the query
// heads of its group add into them without races, and dq rows are written by exactly one task.
// A block's key rows are overwritten even when it has no queries (their gradient is then 0).
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, int64_t ld_dout, const T* out,
                        const Acc<T>* lse, const T* q, int64_t ld_q, const T* k, const T* v,
                        int64_t ld_kv, const std::vector<AttnBlock>& blocks,
                        const AttnShape& shape) {
  using A = Acc<T>;
  // The interface gives no stride for `out` or `dq`: out has the layout of its gradient dout
  // (ld_dout), dq that of q (ld_q).
  check_attention_arguments(blocks, shape, ld_q, ld_dout, ld_kv, /*kv_disjoint=*/true,
                            "attention_backward");
  const int D = shape.head_dim;
  const int Hq = shape.n_heads;
  const int Hkv = shape.n_kv_heads;
  const int group = Hq / Hkv;
  const A scale = static_cast<A>(shape.scale);
  const int64_t n_tasks = static_cast<int64_t>(blocks.size()) * Hkv;

#pragma omp parallel for schedule(dynamic) if (n_tasks > 1)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const AttnBlock& blk = blocks[static_cast<size_t>(t / Hkv)];
    const int g = static_cast<int>(t % Hkv);
    const int64_t head_offset = static_cast<int64_t>(g) * D;
    const T* k_head = k + blk.kv_start * ld_kv + head_offset;
    const T* v_head = v + blk.kv_start * ld_kv + head_offset;
    std::vector<A> dk_acc(static_cast<size_t>(blk.n_kv * D), A(0));
    std::vector<A> dv_acc(static_cast<size_t>(blk.n_kv * D), A(0));
    std::vector<A> dq_acc(static_cast<size_t>(D));

    for (int h = g * group; h < (g + 1) * group; ++h) {
      const int64_t q_offset = static_cast<int64_t>(h) * D;
      for (int64_t i = 0; i < blk.n_q; ++i) {
        const int64_t row = blk.q_start + i;
        const T* qi = q + row * ld_q + q_offset;
        const T* oi = out + row * ld_dout + q_offset;
        const T* doi = dout + row * ld_dout + q_offset;
        const A row_lse = lse[row * Hq + h];
        const A dO_dot_O = dot<A>(doi, oi, D);
        const int64_t n_visible = i + blk.n_kv - blk.n_q + 1;
        std::fill(dq_acc.begin(), dq_acc.end(), A(0));
        for (int64_t j = 0; j < n_visible; ++j) {
          const T* kj = k_head + j * ld_kv;
          const T* vj = v_head + j * ld_kv;
          const A p = std::exp(scale * dot<A>(qi, kj, D) - row_lse);
          const A dp = dot<A>(doi, vj, D);
          const A ds = p * (dp - dO_dot_O);
          A* dkj = dk_acc.data() + j * D;
          A* dvj = dv_acc.data() + j * D;
          const A scaled_ds = scale * ds;
#pragma omp simd
          for (int d = 0; d < D; ++d) {
            dq_acc[static_cast<size_t>(d)] += ds * static_cast<A>(kj[d]);
            dkj[d] += scaled_ds * static_cast<A>(qi[d]);
            dvj[d] += p * static_cast<A>(doi[d]);
          }
        }
        T* dqi = dq + row * ld_q + q_offset;
        for (int d = 0; d < D; ++d) dqi[d] = static_cast<T>(scale * dq_acc[static_cast<size_t>(d)]);
      }
    }

    for (int64_t j = 0; j < blk.n_kv; ++j) {
      T* dkj = dk + (blk.kv_start + j) * ld_kv + head_offset;
      T* dvj = dv + (blk.kv_start + j) * ld_kv + head_offset;
      for (int d = 0; d < D; ++d) {
        dkj[d] = static_cast<T>(dk_acc[static_cast<size_t>(j * D + d)]);
        dvj[d] = static_cast<T>(dv_acc[static_cast<size_t>(j * D + d)]);
      }
    }
  }
}

template void attention_forward<float>(float*, int64_t, float*, const float*, int64_t, const float*,
                                       const float*, int64_t, const std::vector<AttnBlock>&,
                                       const AttnShape&);
template void attention_forward<double>(double*, int64_t, double*, const double*, int64_t,
                                        const double*, const double*, int64_t,
                                        const std::vector<AttnBlock>&, const AttnShape&);
template void attention_backward<float>(float*, float*, float*, const float*, int64_t, const float*,
                                        const float*, const float*, int64_t, const float*,
                                        const float*, int64_t, const std::vector<AttnBlock>&,
                                        const AttnShape&);
template void attention_backward<double>(double*, double*, double*, const double*, int64_t,
                                         const double*, const double*, const double*, int64_t,
                                         const double*, const double*, int64_t,
                                         const std::vector<AttnBlock>&, const AttnShape&);

}  // namespace freqkv::cpu
