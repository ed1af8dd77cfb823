// The per-element and per-tile rules of the flash attention kernels (kernels/cuda/flash_attention.cu),
// shared with their host emulation (tests/test_flash_attention_math.cpp), so that the algorithm the
// CPU test proves against CpuKernels<double> is the one the GPU runs: the tile -> block table, the
// bottom-right causal predicate, the key/query ranges a tile visits, the online-softmax step and
// the backward's recomputation of P and dS from the saved log-sum-exp and delta = rowsum(dO o O).
//
// Scores are kept in log2 units (t = scale * log2(e) * q.k) so that exp2 does the exponentials;
// the log-sum-exp the interface stores is in natural units (kernels/kernels.h).
// Float and double overloads are separate, as in kernel_math.h: float code never widens.
#pragma once

#include <math.h>
#include <stdint.h>

#include <vector>

#include "kernels/dtype.h"
#include "kernels/kernels.h"

namespace freqkv::flash {

// Rows per tile: query rows of a forward / dq tile, key rows of a dk/dv tile; the other operand
// streams through shared memory in steps of the same number of rows. 4 warps of 16 rows each.
constexpr int kTileRows = 64;
constexpr int kStepRows = 64;

constexpr double kLog2e = 1.4426950408889634073599246810019;
constexpr double kLn2 = 0.69314718055994530941723212145818;

// One thread block's share of an AttnBlock: the tile of rows [row0, row0 + kTileRows) of the
// block (query rows for the forward and dq passes, key rows for the dk/dv pass).
struct Tile {
  int64_t q_start;
  int64_t n_q;
  int64_t kv_start;
  int64_t n_kv;
  int64_t row0;
};

// The tile -> block table, built on the host and uploaded: one entry per tile of every block,
// blocks in order. Blocks without query rows have no query tiles; key tiles cover every key row
// (a block's key rows are overwritten by the backward even when no query sees them).
inline std::vector<Tile> make_query_tiles(const std::vector<AttnBlock>& blocks, int tile_rows) {
  std::vector<Tile> tiles;
  for (const AttnBlock& b : blocks) {
    for (int64_t row0 = 0; row0 < b.n_q; row0 += tile_rows) {
      tiles.push_back({b.q_start, b.n_q, b.kv_start, b.n_kv, row0});
    }
  }
  return tiles;
}
inline std::vector<Tile> make_key_tiles(const std::vector<AttnBlock>& blocks, int tile_rows) {
  std::vector<Tile> tiles;
  for (const AttnBlock& b : blocks) {
    for (int64_t row0 = 0; row0 < b.n_kv; row0 += tile_rows) {
      tiles.push_back({b.q_start, b.n_q, b.kv_start, b.n_kv, row0});
    }
  }
  return tiles;
}

// ---- the mask -------------------------------------------------------------------------------------
// Bottom-right causal: query i (0-based in the block) sees keys j <= i + (n_kv - n_q).
FREQKV_HD inline int64_t causal_offset(const Tile& t) { return t.n_kv - t.n_q; }
FREQKV_HD inline bool key_visible(int64_t i, int64_t j, int64_t offset) { return j <= i + offset; }

// Forward / dq: the keys [0, n) that some query of the tile's rows sees (the last row sees most).
FREQKV_HD inline int64_t query_tile_key_end(const Tile& t, int tile_rows) {
  const int64_t last = t.row0 + tile_rows < t.n_q ? t.row0 + tile_rows : t.n_q;  // one past
  return last + causal_offset(t);
}
// dk/dv: the first query that sees any key of the tile (its first key is seen by the most).
FREQKV_HD inline int64_t key_tile_query_begin(const Tile& t) {
  const int64_t first = t.row0 - causal_offset(t);
  return first > 0 ? first : 0;
}
// Whether keys [j_begin, j_end) and queries [i_begin, i_end) share any visible pair: a warp whose
// whole sub-tile is masked skips its products (they would add exact zeros).
FREQKV_HD inline bool any_visible(int64_t i_end, int64_t j_begin, int64_t offset) {
  return key_visible(i_end - 1, j_begin, offset);
}

// The score kept for (query i, key j) of a staged step: visible and inside the staged keys
// (rows past n_keys are zero-filled padding). Anything else becomes -inf before the max.
FREQKV_HD inline bool score_kept(int64_t i, int64_t j, int64_t offset, int64_t n_keys) {
  return j < n_keys && key_visible(i, j, offset);
}

// ---- exponentials in log2 units ---------------------------------------------------------------
FREQKV_HD inline float flash_exp2(float x) { return exp2f(x); }
FREQKV_HD inline double flash_exp2(double x) { return exp2(x); }
FREQKV_HD inline float flash_log2(float x) { return log2f(x); }
FREQKV_HD inline double flash_log2(double x) { return log2(x); }

// ---- the online softmax of one query row ------------------------------------------------------
// Running maximum m (log2 units, -inf before any kept score) and running sum l = sum 2^(t - m).
// Per step: correction = update(step max) multiplies the old sum and the output accumulator,
// then p = 2^(t - base()) for every kept score t of the step, add(sum of p). A row that has kept
// nothing yet keeps exp2 away from -inf - (-inf): base() is 0 then, and 2^(-inf) = 0.
template <typename A>
struct OnlineSoftmax {
  A max_log2;
  A sum;

  FREQKV_HD static OnlineSoftmax start() { return {-static_cast<A>(INFINITY), A(0)}; }
  FREQKV_HD A update(A step_max) {
    const A new_max = step_max > max_log2 ? step_max : max_log2;
    const A correction =
        new_max == -static_cast<A>(INFINITY) ? A(1) : flash_exp2(max_log2 - new_max);
    max_log2 = new_max;
    sum *= correction;
    return correction;
  }
  FREQKV_HD A base() const { return max_log2 == -static_cast<A>(INFINITY) ? A(0) : max_log2; }
  FREQKV_HD void add(A step_sum) { sum += step_sum; }
  // The natural log-sum-exp of the scaled scores: ln 2 * (m + log2 l).
  FREQKV_HD A lse() const { return static_cast<A>(kLn2) * (max_log2 + flash_log2(sum)); }
};

// ---- the backward's recomputation ----------------------------------------------------------------
// P = exp(scale q.k - lse) = 2^(t - lse log2 e) with t the score in log2 units, and the softmax
// backward dS = P o (dP - delta), delta = rowsum(dO o O). Then dV = P^T dO, dQ = scale dS K,
// dK = scale dS^T Q.
template <typename A>
FREQKV_HD inline A lse_to_log2(A lse) {
  return lse * static_cast<A>(kLog2e);
}
template <typename A>
FREQKV_HD inline A recomputed_p(A t, A lse_log2) {
  return flash_exp2(t - lse_log2);
}
template <typename A>
FREQKV_HD inline A softmax_grad(A p, A dp, A delta) {
  return p * (dp - delta);
}

}  // namespace freqkv::flash
