// The flash attention kernels' algorithm, proven on the CPU (kernels/cuda/flash_attention.cu can
// only run on a GPU): a host emulation of the SAME tiling -- the tile -> block table
// (flash::make_query_tiles / make_key_tiles), 16-row warp sub-tiles and their skip rules, staged
// steps with zero-filled padding rows, the bottom-right mask (flash::score_kept / key_visible),
// the online softmax (flash::OnlineSoftmax), the log-sum-exp in natural units and the backward's
// recomputation of P and dS from lse and delta = rowsum(dO o O) -- built from the functions of
// kernels/flash_attention_math.h that the kernels call, checked against CpuKernels<double> on
// FreqKV-like block sets (several blocks, n_kv > n_q, a block without queries, partial tiles,
// GQA, n_q not a multiple of the tile). Matrix products are exact-order-free sums here: what the
// emulation proves is the tiling, masking and softmax bookkeeping, not WMMA's rounding (the GPU
// tests in test_cuda_kernels.cpp bound that).
//
// A deliberately wrong mask offset (+1 or -1 key) must make the comparison fail: the test has
// teeth.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/flash_attention_math.h"
#include "kernels/kernels.h"
#include "model/freqkv_schedule.h"

namespace {

using freqkv::AttnBlock;
using freqkv::AttnShape;
namespace flash = freqkv::flash;

// The kernels' geometry (tile rows, step rows, warp rows), and a small one that makes every block
// of the test problems span several partial tiles and steps.
struct Geometry {
  int tile_rows;
  int step_rows;
  int warp_rows;
};
constexpr Geometry kKernelGeometry{flash::kTileRows, flash::kStepRows, 16};
constexpr Geometry kSmallGeometry{8, 8, 4};

// One attention problem: q/dout/out rows with stride ld_q (dout and out share ld_out), k and v
// side by side in one buffer (as the model keeps them), strides padded.
struct Problem {
  std::vector<AttnBlock> blocks;
  AttnShape shape;
  int64_t q_rows, kv_rows, ld_q, ld_out, ld_kv;
  std::vector<double> q, kv, dout;
  int64_t kv_width() const { return static_cast<int64_t>(shape.n_kv_heads) * shape.head_dim; }
};

Problem make_problem(std::vector<AttnBlock> blocks, int n_heads, int n_kv_heads, int head_dim,
                     uint64_t seed) {
  Problem p;
  p.blocks = std::move(blocks);
  p.shape = {n_heads, n_kv_heads, head_dim, 1.0 / std::sqrt(static_cast<double>(head_dim))};
  p.q_rows = 0;
  p.kv_rows = 0;
  for (const AttnBlock& b : p.blocks) {
    p.q_rows = std::max(p.q_rows, b.q_start + b.n_q);
    p.kv_rows = std::max(p.kv_rows, b.kv_start + b.n_kv);
  }
  p.kv_rows += 3;  // rows outside every block
  p.ld_q = static_cast<int64_t>(n_heads) * head_dim + 3;
  p.ld_out = static_cast<int64_t>(n_heads) * head_dim + 5;
  p.ld_kv = 2 * p.kv_width() + 1;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(-2.0, 2.0);
  auto fill = [&](std::vector<double>& x, int64_t n) {
    x.resize(static_cast<size_t>(n));
    for (double& value : x) value = uniform(rng);
  };
  fill(p.q, p.q_rows * p.ld_q);
  fill(p.kv, p.kv_rows * p.ld_kv);
  fill(p.dout, p.q_rows * p.ld_out);
  return p;
}

// Two sequences of the real FreqKV schedule (C = 40, S = 4, r = 0.5: chunks of 40, 18, 18, ...
// queries with 4 + 18 sink/memory keys), laid out one after the other.
std::vector<AttnBlock> schedule_blocks(int64_t length0, int64_t length1) {
  freqkv::FreqKVConfig config;
  config.cache = 40;
  config.sink = 4;
  config.ratio = 0.5;
  std::vector<AttnBlock> blocks;
  int64_t q_base = 0, kv_base = 0;
  for (int64_t length : {length0, length1}) {
    const freqkv::FreqKVSchedule s = freqkv::FreqKVSchedule::build(length, config);
    for (const freqkv::FreqKVChunk& c : s.chunks) {
      blocks.push_back({q_base + c.token_start, c.n_tokens, kv_base + c.kv_start, c.kv_len});
    }
    q_base += length;
    kv_base += s.kv_rows;
  }
  return blocks;
}

// The GPU tests' hand-made set: chunk 0 (plain causal), a FreqKV chunk, a block whose keys have
// no queries, another sequence's chunk.
std::vector<AttnBlock> handmade_blocks() {
  return {{0, 150, 0, 150}, {150, 80, 150, 124}, {230, 0, 274, 26}, {230, 70, 300, 94}};
}

template <typename A>
A dot(const std::vector<double>& a, int64_t a_off, const std::vector<double>& b, int64_t b_off,
      int n) {
  A sum = 0;
  for (int d = 0; d < n; ++d) {
    sum += static_cast<A>(a[static_cast<size_t>(a_off + d)]) *
           static_cast<A>(b[static_cast<size_t>(b_off + d)]);
  }
  return sum;
}

struct ForwardResult {
  std::vector<double> out;  // q_rows x ld_out (untouched entries 0)
  std::vector<double> lse;  // q_rows x Hq
};

// The forward kernel, tile by tile: grid (query tiles, Hq); a tile's warps own warp_rows rows
// each; keys stream in steps of step_rows; rows past the block compute on zero queries.
// offset_error shifts the mask (0 = the kernel's rule).
template <typename A>
ForwardResult emulate_forward(const Problem& p, Geometry g, int64_t offset_error = 0) {
  const int D = p.shape.head_dim;
  const int Hq = p.shape.n_heads;
  const int group = Hq / p.shape.n_kv_heads;
  const A scale_log2 = static_cast<A>(p.shape.scale * flash::kLog2e);
  ForwardResult r;
  r.out.assign(static_cast<size_t>(p.q_rows * p.ld_out), 0.0);
  r.lse.assign(static_cast<size_t>(p.q_rows * Hq), 0.0);
  const std::vector<flash::Tile> tiles = flash::make_query_tiles(p.blocks, g.tile_rows);
  const std::vector<double> zeros(static_cast<size_t>(D), 0.0);
  for (const flash::Tile& t : tiles) {
    const int64_t offset = flash::causal_offset(t) + offset_error;
    const int64_t n_keys = flash::query_tile_key_end(t, g.tile_rows) + offset_error;
    for (int h = 0; h < Hq; ++h) {
      const int64_t kv_col = static_cast<int64_t>(h / group) * D;
      for (int w0 = 0; w0 < g.tile_rows; w0 += g.warp_rows) {
        const int64_t warp_row0 = t.row0 + w0;
        const int64_t warp_row_end = warp_row0 + g.warp_rows;
        std::vector<flash::OnlineSoftmax<A>> softmax(static_cast<size_t>(g.warp_rows),
                                                     flash::OnlineSoftmax<A>::start());
        std::vector<A> acc(static_cast<size_t>(g.warp_rows * D), A(0));
        for (int64_t j0 = 0; j0 < n_keys; j0 += g.step_rows) {
          if (warp_row0 >= t.n_q || !flash::any_visible(warp_row_end, j0, offset)) continue;
          for (int r_ = 0; r_ < g.warp_rows; ++r_) {
            const int64_t i = warp_row0 + r_;
            const bool active = i < t.n_q;
            std::vector<A> scores(static_cast<size_t>(g.step_rows));
            A step_max = -std::numeric_limits<A>::infinity();
            for (int c = 0; c < g.step_rows; ++c) {
              const int64_t j = j0 + c;
              A s = -std::numeric_limits<A>::infinity();
              if (flash::score_kept(i, j, offset, n_keys)) {
                // Zero-filled query rows past the block; staged keys exist below n_keys.
                const A qk = active ? dot<A>(p.q, (t.q_start + i) * p.ld_q + int64_t{h} * D, p.kv,
                                             (t.kv_start + j) * p.ld_kv + kv_col, D)
                                    : A(0);
                s = qk * scale_log2;
              }
              scores[static_cast<size_t>(c)] = s;
              step_max = std::max(step_max, s);
            }
            flash::OnlineSoftmax<A>& sm = softmax[static_cast<size_t>(r_)];
            const A correction = sm.update(step_max);
            const A base = sm.base();
            A* a = acc.data() + r_ * D;
            for (int d = 0; d < D; ++d) a[d] *= correction;
            A step_sum = 0;
            for (int c = 0; c < g.step_rows; ++c) {
              const A prob = flash::flash_exp2(scores[static_cast<size_t>(c)] - base);
              step_sum += prob;
              if (prob == A(0)) continue;  // masked, or padding rows (zero values)
              const int64_t v_off = (t.kv_start + j0 + c) * p.ld_kv + p.kv_width() + kv_col;
              for (int d = 0; d < D; ++d) {
                a[d] += prob * static_cast<A>(p.kv[static_cast<size_t>(v_off + d)]);
              }
            }
            sm.add(step_sum);
          }
        }
        for (int r_ = 0; r_ < g.warp_rows; ++r_) {
          const int64_t i = warp_row0 + r_;
          if (i >= t.n_q) continue;
          const flash::OnlineSoftmax<A>& sm = softmax[static_cast<size_t>(r_)];
          if (offset_error == 0) {
            EXPECT_GT(sm.sum, A(0)) << "row " << i << " kept no key";
          }
          const int64_t row = t.q_start + i;
          for (int d = 0; d < D; ++d) {
            r.out[static_cast<size_t>(row * p.ld_out + int64_t{h} * D + d)] =
                static_cast<double>(acc[static_cast<size_t>(r_ * D + d)] / sm.sum);
          }
          r.lse[static_cast<size_t>(row * Hq + h)] = static_cast<double>(sm.lse());
        }
      }
    }
  }
  return r;
}

struct BackwardResult {
  std::vector<double> dq;   // q_rows x ld_q
  std::vector<double> dkv;  // kv_rows x ld_kv (dk then dv columns)
};

// delta, then the dq kernel (grid (query tiles, Hq)) and the dk/dv kernel (grid (key tiles, Hkv),
// looping over the group's query heads and the query steps from key_tile_query_begin).
template <typename A>
BackwardResult emulate_backward(const Problem& p, const std::vector<double>& out,
                                const std::vector<double>& lse, Geometry g,
                                int64_t offset_error = 0) {
  const int D = p.shape.head_dim;
  const int Hq = p.shape.n_heads;
  const int Hkv = p.shape.n_kv_heads;
  const int group = Hq / Hkv;
  const A scale = static_cast<A>(p.shape.scale);
  const A scale_log2 = static_cast<A>(p.shape.scale * flash::kLog2e);
  BackwardResult r;
  r.dq.assign(static_cast<size_t>(p.q_rows * p.ld_q), 0.0);
  r.dkv.assign(static_cast<size_t>(p.kv_rows * p.ld_kv), 0.0);
  const std::vector<flash::Tile> query_tiles = flash::make_query_tiles(p.blocks, g.tile_rows);
  const std::vector<flash::Tile> key_tiles = flash::make_key_tiles(p.blocks, g.tile_rows);

  // delta = rowsum(dO o O) per (row, head), over the query tiles.
  std::vector<A> delta(static_cast<size_t>(p.q_rows * Hq), A(0));
  for (const flash::Tile& t : query_tiles) {
    for (int h = 0; h < Hq; ++h) {
      for (int64_t i = t.row0; i < std::min<int64_t>(t.n_q, t.row0 + g.tile_rows); ++i) {
        const int64_t row = t.q_start + i;
        delta[static_cast<size_t>(row * Hq + h)] =
            dot<A>(p.dout, row * p.ld_out + int64_t{h} * D, out, row * p.ld_out + int64_t{h} * D, D);
      }
    }
  }
  auto p_and_ds = [&](int64_t row, int h, int64_t kv_row, A* prob, A* ds) {
    const int64_t kv_col = static_cast<int64_t>(h / group) * D;
    const A t_score =
        dot<A>(p.q, row * p.ld_q + int64_t{h} * D, p.kv, kv_row * p.ld_kv + kv_col, D) * scale_log2;
    const A lse_log2 = flash::lse_to_log2(static_cast<A>(lse[static_cast<size_t>(row * Hq + h)]));
    *prob = flash::recomputed_p(t_score, lse_log2);
    const A dp = dot<A>(p.dout, row * p.ld_out + int64_t{h} * D, p.kv,
                        kv_row * p.ld_kv + p.kv_width() + kv_col, D);
    *ds = flash::softmax_grad(*prob, dp, delta[static_cast<size_t>(row * Hq + h)]);
  };

  // dq: like the forward's loop, with P recomputed.
  for (const flash::Tile& t : query_tiles) {
    const int64_t offset = flash::causal_offset(t) + offset_error;
    const int64_t n_keys = flash::query_tile_key_end(t, g.tile_rows) + offset_error;
    for (int h = 0; h < Hq; ++h) {
      const int64_t kv_col = static_cast<int64_t>(h / group) * D;
      for (int w0 = 0; w0 < g.tile_rows; w0 += g.warp_rows) {
        const int64_t warp_row0 = t.row0 + w0;
        std::vector<A> acc(static_cast<size_t>(g.warp_rows * D), A(0));
        for (int64_t j0 = 0; j0 < n_keys; j0 += g.step_rows) {
          if (warp_row0 >= t.n_q || !flash::any_visible(warp_row0 + g.warp_rows, j0, offset)) {
            continue;
          }
          for (int r_ = 0; r_ < g.warp_rows; ++r_) {
            const int64_t i = warp_row0 + r_;
            if (i >= t.n_q) continue;  // zero queries and dout: dS = 0 there
            for (int c = 0; c < g.step_rows; ++c) {
              const int64_t j = j0 + c;
              if (!flash::score_kept(i, j, offset, n_keys)) continue;
              A prob, ds;
              p_and_ds(t.q_start + i, h, t.kv_start + j, &prob, &ds);
              for (int d = 0; d < D; ++d) {
                acc[static_cast<size_t>(r_ * D + d)] +=
                    ds * static_cast<A>(p.kv[static_cast<size_t>((t.kv_start + j) * p.ld_kv +
                                                                 kv_col + d)]);
              }
            }
          }
        }
        for (int r_ = 0; r_ < g.warp_rows; ++r_) {
          const int64_t i = warp_row0 + r_;
          if (i >= t.n_q) continue;
          for (int d = 0; d < D; ++d) {
            r.dq[static_cast<size_t>((t.q_start + i) * p.ld_q + int64_t{h} * D + d)] =
                static_cast<double>(scale * acc[static_cast<size_t>(r_ * D + d)]);
          }
        }
      }
    }
  }

  // dk, dv: key tiles, every query head of the group, query steps from the first seeing query.
  for (const flash::Tile& t : key_tiles) {
    const int64_t offset = flash::causal_offset(t) + offset_error;
    const int64_t query_begin = std::max<int64_t>(0, flash::key_tile_query_begin(t) - offset_error);
    for (int g_kv = 0; g_kv < Hkv; ++g_kv) {
      const int64_t kv_col = static_cast<int64_t>(g_kv) * D;
      for (int w0 = 0; w0 < g.tile_rows; w0 += g.warp_rows) {
        const int64_t warp_key0 = t.row0 + w0;
        std::vector<A> dk(static_cast<size_t>(g.warp_rows * D), A(0));
        std::vector<A> dv(static_cast<size_t>(g.warp_rows * D), A(0));
        for (int h = g_kv * group; h < (g_kv + 1) * group; ++h) {
          for (int64_t i0 = query_begin; i0 < t.n_q; i0 += g.step_rows) {
            if (warp_key0 >= t.n_kv || !flash::any_visible(i0 + g.step_rows, warp_key0, offset)) {
              continue;
            }
            for (int r_ = 0; r_ < g.warp_rows; ++r_) {
              const int64_t j = warp_key0 + r_;
              if (j >= t.n_kv) continue;
              for (int c = 0; c < g.step_rows; ++c) {
                const int64_t i = i0 + c;
                if (i >= t.n_q || !flash::key_visible(i, j, offset)) continue;
                A prob, ds;
                const int64_t row = t.q_start + i;
                p_and_ds(row, h, t.kv_start + j, &prob, &ds);
                for (int d = 0; d < D; ++d) {
                  dv[static_cast<size_t>(r_ * D + d)] +=
                      prob *
                      static_cast<A>(p.dout[static_cast<size_t>(row * p.ld_out + int64_t{h} * D + d)]);
                  dk[static_cast<size_t>(r_ * D + d)] +=
                      ds * static_cast<A>(p.q[static_cast<size_t>(row * p.ld_q + int64_t{h} * D + d)]);
                }
              }
            }
          }
        }
        for (int r_ = 0; r_ < g.warp_rows; ++r_) {
          const int64_t j = warp_key0 + r_;
          if (j >= t.n_kv) continue;
          const int64_t base = (t.kv_start + j) * p.ld_kv + kv_col;
          for (int d = 0; d < D; ++d) {
            r.dkv[static_cast<size_t>(base + d)] =
                static_cast<double>(scale * dk[static_cast<size_t>(r_ * D + d)]);
            r.dkv[static_cast<size_t>(base + p.kv_width() + d)] =
                static_cast<double>(dv[static_cast<size_t>(r_ * D + d)]);
          }
        }
      }
    }
  }
  return r;
}

// CpuKernels<double> on the same problem: out/lse, then dq/dk/dv (gradient buffers start at 0,
// like the emulation's; rows outside every block stay 0 in both).
struct Reference {
  std::vector<double> out, lse, dq, dkv;
};
Reference reference(const Problem& p) {
  auto cpu = freqkv::make_cpu_kernels<double>();
  Reference r;
  r.out.assign(static_cast<size_t>(p.q_rows * p.ld_out), 0.0);
  r.lse.assign(static_cast<size_t>(p.q_rows * p.shape.n_heads), 0.0);
  r.dq.assign(static_cast<size_t>(p.q_rows * p.ld_q), 0.0);
  r.dkv.assign(static_cast<size_t>(p.kv_rows * p.ld_kv), 0.0);
  const double* k = p.kv.data();
  const double* v = p.kv.data() + p.kv_width();
  cpu->attention_forward(r.out.data(), p.ld_out, r.lse.data(), p.q.data(), p.ld_q, k, v, p.ld_kv,
                         p.blocks, p.shape);
  cpu->attention_backward(r.dq.data(), r.dkv.data(), r.dkv.data() + p.kv_width(), p.dout.data(),
                          p.ld_out, r.out.data(), r.lse.data(), p.q.data(), p.ld_q, k, v, p.ld_kv,
                          p.blocks, p.shape);
  return r;
}

// max |got - want| / (1 + max |want|)
double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double worst = 0, largest = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = std::abs(got[i] - want[i]);
    worst = std::isnan(e) ? std::numeric_limits<double>::infinity() : std::max(worst, e);
    largest = std::max(largest, std::abs(want[i]));
  }
  return worst / (1.0 + largest);
}

struct Errors {
  double out, lse, dq, dkv;
  double largest() const { return std::max({out, lse, dq, dkv}); }
};

template <typename A>
Errors emulation_errors(const Problem& p, const Reference& ref, Geometry g,
                        int64_t offset_error = 0) {
  const ForwardResult f = emulate_forward<A>(p, g, offset_error);
  // The backward gets the reference's out and lse, as the kernel gets the forward's.
  const BackwardResult b = emulate_backward<A>(p, ref.out, ref.lse, g, offset_error);
  return {relative_error(f.out, ref.out), relative_error(f.lse, ref.lse),
          relative_error(b.dq, ref.dq), relative_error(b.dkv, ref.dkv)};
}

struct Case {
  std::string name;
  std::vector<AttnBlock> blocks;
  int n_heads, n_kv_heads, head_dim;
};

std::vector<Case> cases() {
  return {
      {"handmade_gqa4", handmade_blocks(), 8, 2, 16},
      {"handmade_mha", handmade_blocks(), 2, 2, 8},
      {"handmade_d64", handmade_blocks(), 2, 1, 64},
      {"schedule_gqa2", schedule_blocks(133, 77), 4, 2, 8},
      {"schedule_gqa3_long", schedule_blocks(301, 40), 3, 1, 4},
  };
}

TEST(FlashAttentionMath, TileTablesCoverEveryRowOnce) {
  const std::vector<AttnBlock> blocks = handmade_blocks();
  for (int rows : {8, 64}) {
    const auto q_tiles = flash::make_query_tiles(blocks, rows);
    const auto k_tiles = flash::make_key_tiles(blocks, rows);
    std::vector<int> q_seen(300, 0), k_seen(400, 0);
    for (const flash::Tile& t : q_tiles) {
      for (int64_t i = t.row0; i < std::min<int64_t>(t.n_q, t.row0 + rows); ++i) {
        ++q_seen[static_cast<size_t>(t.q_start + i)];
      }
    }
    for (const flash::Tile& t : k_tiles) {
      for (int64_t j = t.row0; j < std::min<int64_t>(t.n_kv, t.row0 + rows); ++j) {
        ++k_seen[static_cast<size_t>(t.kv_start + j)];
      }
    }
    for (int r = 0; r < 300; ++r) EXPECT_EQ(q_seen[static_cast<size_t>(r)], 1) << "query row " << r;
    for (int r = 0; r < 400; ++r) {
      EXPECT_EQ(k_seen[static_cast<size_t>(r)], r < 394 ? 1 : 0) << "key row " << r;
    }
  }
  // The ranges a tile visits: the last row of a query tile sees most keys; the first key of a
  // key tile is seen by the most queries.
  const flash::Tile t{0, 80, 0, 124, 64};
  EXPECT_EQ(flash::query_tile_key_end(t, 64), 124);
  EXPECT_EQ(flash::query_tile_key_end(flash::Tile{0, 80, 0, 124, 0}, 64), 64 + 44);
  EXPECT_EQ(flash::key_tile_query_begin(flash::Tile{0, 80, 0, 124, 0}), 0);
  EXPECT_EQ(flash::key_tile_query_begin(flash::Tile{0, 80, 0, 124, 64}), 20);
  EXPECT_TRUE(flash::key_visible(0, 44, 44));
  EXPECT_FALSE(flash::key_visible(0, 45, 44));
}

TEST(FlashAttentionMath, OnlineSoftmaxMatchesADirectSum) {
  const std::vector<double> scores = {0.5, -3.0, 7.25, 2.0, -INFINITY, 7.0, -1.0};
  for (size_t step : {size_t{1}, size_t{2}, size_t{3}, size_t{7}}) {
    auto sm = flash::OnlineSoftmax<double>::start();
    double weighted = 0;  // sum of p * score, rescaled like an output accumulator
    for (size_t s0 = 0; s0 < scores.size(); s0 += step) {
      double step_max = -INFINITY;
      for (size_t s = s0; s < std::min(scores.size(), s0 + step); ++s) {
        step_max = std::max(step_max, scores[s]);
      }
      weighted *= sm.update(step_max);
      double step_sum = 0;
      for (size_t s = s0; s < std::min(scores.size(), s0 + step); ++s) {
        const double p = flash::flash_exp2(scores[s] - sm.base());
        step_sum += p;
        if (p != 0) weighted += p * scores[s];
      }
      sm.add(step_sum);
    }
    double sum = 0, direct_weighted = 0;
    for (double s : scores) {
      sum += std::exp2(s);
      if (std::isfinite(s)) direct_weighted += std::exp2(s) * s;
    }
    EXPECT_NEAR(sm.lse(), std::log(sum), 1e-14) << "step " << step;
    EXPECT_NEAR(weighted / sm.sum, direct_weighted / sum, 1e-13) << "step " << step;
  }
  // A step with nothing kept before any kept score: no NaN, the sum stays 0.
  auto sm = flash::OnlineSoftmax<float>::start();
  EXPECT_EQ(sm.update(-INFINITY), 1.0f);
  EXPECT_EQ(flash::flash_exp2(-INFINITY - sm.base()), 0.0f);
  EXPECT_EQ(sm.sum, 0.0f);
}

TEST(FlashAttentionMath, EmulationInDoubleEqualsCpuKernels) {
  for (const Case& c : cases()) {
    const Problem p = make_problem(c.blocks, c.n_heads, c.n_kv_heads, c.head_dim, 7);
    const Reference ref = reference(p);
    for (Geometry g : {kKernelGeometry, kSmallGeometry}) {
      const Errors e = emulation_errors<double>(p, ref, g);
      SCOPED_TRACE(c.name + " tile " + std::to_string(g.tile_rows));
      EXPECT_LT(e.out, 1e-12);
      EXPECT_LT(e.lse, 1e-12);
      EXPECT_LT(e.dq, 1e-12);
      EXPECT_LT(e.dkv, 1e-12);
    }
  }
}

TEST(FlashAttentionMath, EmulationInFloatIsCloseToCpuKernels) {
  for (const Case& c : cases()) {
    const Problem p = make_problem(c.blocks, c.n_heads, c.n_kv_heads, c.head_dim, 11);
    const Reference ref = reference(p);
    for (Geometry g : {kKernelGeometry, kSmallGeometry}) {
      const Errors e = emulation_errors<float>(p, ref, g);
      SCOPED_TRACE(c.name + " tile " + std::to_string(g.tile_rows));
      EXPECT_LT(e.largest(), 2e-5);
    }
  }
}

TEST(FlashAttentionMath, AWrongMaskOffsetIsCaught) {
  for (const Case& c : cases()) {
    const Problem p = make_problem(c.blocks, c.n_heads, c.n_kv_heads, c.head_dim, 13);
    const Reference ref = reference(p);
    for (int64_t error : {int64_t{-1}, int64_t{1}}) {
      const Errors e = emulation_errors<double>(p, ref, kSmallGeometry, error);
      SCOPED_TRACE(c.name + " offset error " + std::to_string(error));
      EXPECT_GT(e.out, 1e-3);
      EXPECT_GT(e.dq, 1e-3);
      EXPECT_GT(e.dkv, 1e-3);
    }
  }
}

}  // namespace
