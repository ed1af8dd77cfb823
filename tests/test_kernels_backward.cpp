// Every backward kernel of the CPU backend checked against central finite differences of its
// forward in double precision (CpuKernels<double>), adjoint pairs checked by <Ax, y> = <x, A^T y>,
// and the AdamW step against one computed by hand.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"

namespace {

using freqkv::AttnBlock;
using freqkv::AttnShape;
using freqkv::Buffer;
using freqkv::Kernels;

// Central differences with h = 1e-6 have a truncation error ~h^2 and a rounding error ~1e-16/h:
// both far below this bound, which a wrong gradient term exceeds by orders of magnitude.
constexpr double kGradTol = 1e-6;
constexpr double kStep = 1e-6;

std::vector<double> random_values(size_t n, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(lo, hi);
  std::vector<double> values(n);
  for (double& v : values) v = uniform(rng);
  return values;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i) sum += a[i] * b[i];
  return sum;
}

// d loss / d x[i] for every i, by central differences.
std::vector<double> numeric_gradient(const std::function<double(const std::vector<double>&)>& loss,
                                     std::vector<double> x) {
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + kStep;
    const double up = loss(x);
    x[i] = saved - kStep;
    const double down = loss(x);
    x[i] = saved;
    grad[i] = (up - down) / (2.0 * kStep);
  }
  return grad;
}

// Relative error of an analytic gradient against a numeric one, per element, with the gradient's
// own scale as the floor so that near-zero entries do not blow up the ratio.
void expect_gradient(const std::vector<double>& analytic, const std::vector<double>& numeric,
                     const std::string& what) {
  ASSERT_EQ(analytic.size(), numeric.size()) << what;
  double scale = 1e-3;
  for (double g : numeric) scale = std::max(scale, std::abs(g));
  int reported = 0;
  for (size_t i = 0; i < analytic.size(); ++i) {
    const double error = std::abs(analytic[i] - numeric[i]) / std::max(std::abs(numeric[i]), scale);
    if (!(error <= kGradTol) && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: analytic " << analytic[i] << ", numeric "
                    << numeric[i] << " (relative error " << error << ")";
    }
  }
}

class CpuKernelsBackward : public ::testing::Test {
 protected:
  Buffer<double> upload(const std::vector<double>& host) {
    Buffer<double> buffer(*kernels, static_cast<int64_t>(host.size()));
    kernels->upload(buffer.data(), host.data(), buffer.size());
    return buffer;
  }
  std::vector<double> download(const Buffer<double>& buffer) {
    std::vector<double> host(static_cast<size_t>(buffer.size()));
    kernels->download(host.data(), buffer.data(), buffer.size());
    return host;
  }
  template <typename U>
  Buffer<U> upload_raw(const std::vector<U>& host) {
    return freqkv::upload_array(*kernels, host);
  }

  std::unique_ptr<Kernels<double>> kernels = freqkv::make_cpu_kernels<double>();
};

std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

TEST_F(CpuKernelsBackward, RmsNormAccumulatesFiniteDifferenceGradients) {
  const int64_t rows = 4, dim = 7;
  const double eps = 1e-5;
  const std::vector<double> x = random_values(rows * dim, 1, -2.0, 2.0);
  const std::vector<double> w = random_values(dim, 2, 0.5, 1.5);
  const std::vector<double> r = random_values(rows * dim, 3);  // loss = <r, rmsnorm(x, w)>
  auto loss = [&](const std::vector<double>& xs, const std::vector<double>& ws) {
    Buffer<double> dx = upload(xs), dw = upload(ws), out(*kernels, rows * dim),
                   rstd(*kernels, rows);
    kernels->rmsnorm_forward(out.data(), rstd.data(), dx.data(), dw.data(), rows, dim, eps);
    return dot(r, download(out));
  };

  Buffer<double> dx = upload(x), dw = upload(w), out(*kernels, rows * dim), rstd(*kernels, rows);
  kernels->rmsnorm_forward(out.data(), rstd.data(), dx.data(), dw.data(), rows, dim, eps);
  // The gradients accumulate (+=): start them from known values and subtract those.
  const std::vector<double> dx0 = random_values(rows * dim, 4), dw0 = random_values(dim, 5);
  Buffer<double> grad_x = upload(dx0), grad_w = upload(dw0), dout = upload(r);
  kernels->rmsnorm_backward(grad_x.data(), grad_w.data(), dout.data(), dx.data(), dw.data(),
                            rstd.data(), rows, dim);
  expect_gradient(minus(download(grad_x), dx0),
                  numeric_gradient([&](const std::vector<double>& xs) { return loss(xs, w); }, x),
                  "rmsnorm dx");
  expect_gradient(minus(download(grad_w), dw0),
                  numeric_gradient([&](const std::vector<double>& ws) { return loss(x, ws); }, w),
                  "rmsnorm dweight");
}

TEST_F(CpuKernelsBackward, InverseRopeIsTheGradientOfRope) {
  const int n_heads = 2, D = 6;
  const int64_t ld = n_heads * D + 1;
  const std::vector<int32_t> positions = {0, 3, 17, 250};
  const int64_t rows = static_cast<int64_t>(positions.size());
  const double theta = 500000.0;
  Buffer<int32_t> dpos = upload_raw(positions);
  const std::vector<double> x = random_values(rows * ld, 6);
  const std::vector<double> r = random_values(rows * ld, 7);
  auto loss = [&](const std::vector<double>& xs) {
    Buffer<double> dx = upload(xs), out(*kernels, rows * ld);
    kernels->rope(out.data(), ld, dx.data(), ld, dpos.data(), rows, n_heads, D, theta, false);
    return dot(r, download(out));  // out's padding column stays 0
  };
  Buffer<double> grad = upload(r);
  kernels->rope(grad.data(), ld, grad.data(), ld, dpos.data(), rows, n_heads, D, theta, true);
  std::vector<double> analytic = download(grad);
  for (int64_t row = 0; row < rows; ++row)
    analytic[row * ld + ld - 1] = 0.0;  // padding: no gradient
  expect_gradient(analytic, numeric_gradient(loss, x), "rope dx");
}

// Same layout as the forward test: a plain causal block, a FreqKV chunk with n_kv > n_q whose
// keys are elsewhere, a one-query chunk, and key row 5 in no block.
struct AttentionCase {
  AttnShape shape{4, 2, 6, 1.0 / std::sqrt(6.0)};
  std::vector<AttnBlock> blocks{{0, 5, 0, 5}, {5, 3, 6, 7}, {8, 1, 13, 4}};
  int64_t q_rows = 9, kv_rows = 17, unused_kv_row = 5;
  int64_t ld_q = 4 * 6 + 3, ld_out = 4 * 6 + 2, ld_kv = 2 * 6 + 1;
};

TEST_F(CpuKernelsBackward, AttentionMatchesFiniteDifferences) {
  const AttentionCase c;
  const int64_t q_width = c.shape.n_heads * c.shape.head_dim;
  const int64_t kv_width = c.shape.n_kv_heads * c.shape.head_dim;
  const std::vector<double> q = random_values(c.q_rows * c.ld_q, 8, -2.0, 2.0);
  const std::vector<double> k = random_values(c.kv_rows * c.ld_kv, 9, -2.0, 2.0);
  const std::vector<double> v = random_values(c.kv_rows * c.ld_kv, 10);
  std::vector<double> r = random_values(c.q_rows * c.ld_out, 11);  // loss = <r, out>
  for (int64_t row = 0; row < c.q_rows; ++row) {
    for (int64_t col = q_width; col < c.ld_out; ++col) r[row * c.ld_out + col] = 0.0;
  }

  auto forward = [&](const std::vector<double>& qs, const std::vector<double>& ks,
                     const std::vector<double>& vs, Buffer<double>& out, Buffer<double>& lse) {
    Buffer<double> dq = upload(qs), dk = upload(ks), dv = upload(vs);
    kernels->attention_forward(out.data(), c.ld_out, lse.data(), dq.data(), c.ld_q, dk.data(),
                               dv.data(), c.ld_kv, c.blocks, c.shape);
  };
  auto loss = [&](const std::vector<double>& qs, const std::vector<double>& ks,
                  const std::vector<double>& vs) {
    Buffer<double> out(*kernels, c.q_rows * c.ld_out), lse(*kernels, c.q_rows * c.shape.n_heads);
    forward(qs, ks, vs, out, lse);
    return dot(r, download(out));
  };

  Buffer<double> out(*kernels, c.q_rows * c.ld_out), lse(*kernels, c.q_rows * c.shape.n_heads);
  forward(q, k, v, out, lse);
  // dq, dk, dv are overwritten: start them from a sentinel. Padding columns and the key row that
  // no block uses must keep it.
  const double sentinel = 12345.0;
  Buffer<double> dq = upload(std::vector<double>(c.q_rows * c.ld_q, sentinel));
  Buffer<double> dk = upload(std::vector<double>(c.kv_rows * c.ld_kv, sentinel));
  Buffer<double> dv = upload(std::vector<double>(c.kv_rows * c.ld_kv, sentinel));
  Buffer<double> dq_in = upload(q), dk_in = upload(k), dv_in = upload(v), dout = upload(r);
  // dout and out share ld_out here (ld_dout in the interface), q and dq share ld_q.
  kernels->attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), c.ld_out, out.data(),
                              lse.data(), dq_in.data(), c.ld_q, dk_in.data(), dv_in.data(), c.ld_kv,
                              c.blocks, c.shape);

  // Split into the columns that carry data (compared to finite differences) and the rest.
  auto check = [&](const std::vector<double>& analytic, const std::vector<double>& numeric,
                   int64_t ld, int64_t width, int64_t skip_row, const std::string& what) {
    std::vector<double> a, n;
    for (size_t i = 0; i < analytic.size(); ++i) {
      const int64_t row = static_cast<int64_t>(i) / ld, col = static_cast<int64_t>(i) % ld;
      if (col < width && row != skip_row) {
        a.push_back(analytic[i]);
        n.push_back(numeric[i]);
      } else {
        EXPECT_EQ(analytic[i], sentinel) << what << " row " << row << " col " << col;
      }
    }
    expect_gradient(a, n, what);
  };
  check(download(dq),
        numeric_gradient([&](const std::vector<double>& qs) { return loss(qs, k, v); }, q), c.ld_q,
        q_width, -1, "attention dq");
  check(download(dk),
        numeric_gradient([&](const std::vector<double>& ks) { return loss(q, ks, v); }, k), c.ld_kv,
        kv_width, c.unused_kv_row, "attention dk");
  check(download(dv),
        numeric_gradient([&](const std::vector<double>& vs) { return loss(q, k, vs); }, v), c.ld_kv,
        kv_width, c.unused_kv_row, "attention dv");

  // Key ranges shared by two blocks would make dk ambiguous: refused.
  const std::vector<AttnBlock> shared_keys = {{0, 2, 0, 4}, {2, 2, 2, 4}};
  EXPECT_THROW(kernels->attention_backward(
                   dq.data(), dk.data(), dv.data(), dout.data(), c.ld_out, out.data(), lse.data(),
                   dq_in.data(), c.ld_q, dk_in.data(), dv_in.data(), c.ld_kv, shared_keys, c.shape),
               std::invalid_argument);
}

TEST_F(CpuKernelsBackward, SwigluMatchesFiniteDifferences) {
  const int64_t n = 23;
  const std::vector<double> gate = random_values(n, 12, -5.0, 5.0);
  const std::vector<double> up = random_values(n, 13, -2.0, 2.0);
  const std::vector<double> r = random_values(n, 14);
  auto loss = [&](const std::vector<double>& g, const std::vector<double>& u) {
    Buffer<double> dg = upload(g), du = upload(u), out(*kernels, n);
    kernels->swiglu_forward(out.data(), dg.data(), du.data(), n);
    return dot(r, download(out));
  };
  Buffer<double> dg = upload(gate), du = upload(up), dout = upload(r);
  Buffer<double> grad_gate = upload(std::vector<double>(n, 99.0));  // overwritten (=)
  Buffer<double> grad_up = upload(std::vector<double>(n, 99.0));
  kernels->swiglu_backward(grad_gate.data(), grad_up.data(), dout.data(), dg.data(), du.data(), n);
  expect_gradient(download(grad_gate),
                  numeric_gradient([&](const std::vector<double>& g) { return loss(g, up); }, gate),
                  "swiglu dgate");
  expect_gradient(download(grad_up),
                  numeric_gradient([&](const std::vector<double>& u) { return loss(gate, u); }, up),
                  "swiglu dup");
}

TEST_F(CpuKernelsBackward, CrossEntropyFusedGradientMatchesFiniteDifferences) {
  const int64_t rows = 3, vocab = 8, ld = 10;
  const std::vector<double> logits = random_values(rows * ld, 15, -4.0, 4.0);
  const std::vector<int32_t> targets = {5, -1, 0};
  const double grad_scale = 0.3;
  Buffer<int32_t> dtargets = upload_raw(targets);
  auto loss = [&](const std::vector<double>& z) {  // grad_scale * sum of losses
    Buffer<double> dz = upload(z), losses(*kernels, rows);
    kernels->cross_entropy(losses.data(), dz.data(), ld, dtargets.data(), rows, vocab, 0.0);
    const std::vector<double> l = download(losses);
    return grad_scale * (l[0] + l[1] + l[2]);
  };
  Buffer<double> dz = upload(logits), losses(*kernels, rows);
  kernels->cross_entropy(losses.data(), dz.data(), ld, dtargets.data(), rows, vocab, grad_scale);
  std::vector<double> analytic = download(dz);
  // The padding columns are not logits: the kernel leaves them, their true gradient is 0.
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = vocab; col < ld; ++col) {
      EXPECT_EQ(analytic[row * ld + col], logits[row * ld + col]);
      analytic[row * ld + col] = 0.0;
    }
  }
  expect_gradient(analytic, numeric_gradient(loss, logits), "cross-entropy dlogits");
  for (int64_t col = 0; col < vocab; ++col) EXPECT_EQ(analytic[ld + col], 0.0) << "ignored row";
}

TEST_F(CpuKernelsBackward, EmbeddingMatchesFiniteDifferences) {
  const int64_t vocab = 6, dim = 5;
  const std::vector<int32_t> tokens = {4, 1, 4, 0, 4};  // token 4 three times: its rows add up
  const int64_t n_tokens = static_cast<int64_t>(tokens.size());
  Buffer<int32_t> dtokens = upload_raw(tokens);
  const std::vector<double> table = random_values(vocab * dim, 16);
  const std::vector<double> r = random_values(n_tokens * dim, 17);
  auto loss = [&](const std::vector<double>& t) {
    Buffer<double> dt = upload(t), out(*kernels, n_tokens * dim);
    kernels->embedding_forward(out.data(), dt.data(), dtokens.data(), n_tokens, dim);
    return dot(r, download(out));
  };
  const std::vector<double> dtable0 = random_values(vocab * dim, 18);
  Buffer<double> dtable = upload(dtable0), dout = upload(r);
  kernels->embedding_backward(dtable.data(), dout.data(), dtokens.data(), n_tokens, dim);
  expect_gradient(minus(download(dtable), dtable0), numeric_gradient(loss, table),
                  "embedding dtable");
}

TEST_F(CpuKernelsBackward, ScatterAddRowsIsTheAdjointOfGatherRows) {
  const int64_t src_rows = 5, ld_src = 7, width = 6, dst_rows = 6, ld_dst = 9;
  const std::vector<int64_t> map = {4, -1, 0, 4, 2, 4};
  Buffer<int64_t> dmap = upload_raw(map);
  std::vector<double> x = random_values(src_rows * ld_src, 19);
  std::vector<double> y = random_values(dst_rows * ld_dst, 20);
  // Zero the padding so that the plain dot products only see the gathered block.
  for (int64_t r = 0; r < src_rows; ++r)
    std::fill(&x[r * ld_src + width], &x[(r + 1) * ld_src], 0.0);
  for (int64_t r = 0; r < dst_rows; ++r)
    std::fill(&y[r * ld_dst + width], &y[(r + 1) * ld_dst], 0.0);

  Buffer<double> dx = upload(x), gathered(*kernels, dst_rows * ld_dst);
  kernels->gather_rows(gathered.data(), ld_dst, dx.data(), ld_src, dmap.data(), dst_rows, width);
  Buffer<double> dy = upload(y), scattered(*kernels, src_rows * ld_src);
  kernels->scatter_add_rows(scattered.data(), ld_src, dy.data(), ld_dst, dmap.data(), dst_rows,
                            width);
  const double lhs = dot(download(gathered), y);   // <G x, y>
  const double rhs = dot(x, download(scattered));  // <x, G^T y>
  EXPECT_NEAR(lhs, rhs, 1e-13 * (std::abs(lhs) + 1.0));
  EXPECT_GT(std::abs(lhs), 0.1);  // a non-trivial identity
}

TEST_F(CpuKernelsBackward, CompressBackwardIsTheAdjointAndAccumulates) {
  const int64_t N = 11, L = 5, channels = 4, ld_in = 6, ld_out = 7;
  std::vector<double> x = random_values(N * ld_in, 21);
  std::vector<double> y = random_values(L * ld_out, 22);
  for (int64_t r = 0; r < N; ++r) std::fill(&x[r * ld_in + channels], &x[(r + 1) * ld_in], 0.0);
  for (int64_t r = 0; r < L; ++r) std::fill(&y[r * ld_out + channels], &y[(r + 1) * ld_out], 0.0);

  Buffer<double> dx = upload(x), px(*kernels, L * ld_out);
  kernels->freqkv_compress(px.data(), ld_out, dx.data(), ld_in, N, L, channels);
  const std::vector<double> din0 = random_values(N * ld_in, 23);
  Buffer<double> dy = upload(y), din = upload(din0);
  kernels->freqkv_compress_backward(din.data(), ld_in, dy.data(), ld_out, N, L, channels);
  const std::vector<double> pty = minus(download(din), din0);  // din += P^T y
  const double lhs = dot(download(px), y);
  const double rhs = dot(x, pty);
  EXPECT_NEAR(lhs, rhs, 1e-13 * (std::abs(lhs) + 1.0));
  EXPECT_GT(std::abs(lhs), 0.1);
  // P^T y touches only the channel columns.
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t col = channels; col < ld_in; ++col) EXPECT_EQ(pty[r * ld_in + col], 0.0);
  }
}

// AdamW for T = float and double: master, moments and the model copy after three steps, against
// the textbook update computed here in double.
template <typename T>
class CpuKernelsAdamW : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(CpuKernelsAdamW, ElementTypes);

TYPED_TEST(CpuKernelsAdamW, MatchesHandComputedSteps) {
  using T = TypeParam;
  std::unique_ptr<Kernels<T>> kernels = freqkv::make_cpu_kernels<T>();
  const int64_t n = 7;
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1, grad_scale = 0.5;
  std::vector<float> master(n);
  for (int64_t i = 0; i < n; ++i) master[i] = static_cast<float>(0.3 * i - 1.0);
  std::vector<double> p(master.begin(), master.end()), m(n, 0.0), v(n, 0.0);

  Buffer<float> dmaster = freqkv::upload_array(*kernels, master);
  Buffer<float> dm(*kernels, n), dv(*kernels, n);
  Buffer<T> dparam(*kernels, n), dgrad(*kernels, n);
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<float> grad_f(n);
    for (int64_t i = 0; i < n; ++i) {
      grad_f[i] = static_cast<float>(std::sin(1.7 * i + step) * (i == 3 ? 1e-4 : 1.0));
    }
    kernels->upload(dgrad.data(), grad_f.data(), n);
    kernels->adamw_update(dmaster.data(), dm.data(), dv.data(), dparam.data(), dgrad.data(), n, lr,
                          beta1, beta2, eps, wd, step, grad_scale);
    for (int64_t i = 0; i < n; ++i) {
      const double g = grad_scale * grad_f[i];
      p[i] -= lr * wd * p[i];
      m[i] = beta1 * m[i] + (1 - beta1) * g;
      v[i] = beta2 * v[i] + (1 - beta2) * g * g;
      const double m_hat = m[i] / (1 - std::pow(beta1, step));
      const double v_hat = v[i] / (1 - std::pow(beta2, step));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
  std::vector<float> got_master(n), got_m(n), got_v(n);
  std::vector<double> got_param(n);
  kernels->copy_to_host(got_master.data(), dmaster.data(), n * sizeof(float));
  kernels->copy_to_host(got_m.data(), dm.data(), n * sizeof(float));
  kernels->copy_to_host(got_v.data(), dv.data(), n * sizeof(float));
  kernels->download(got_param.data(), dparam.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    // fp32 state: a few ulps of the values involved.
    EXPECT_NEAR(got_master[i], p[i], 1e-6 * (1.0 + std::abs(p[i]))) << "master " << i;
    EXPECT_NEAR(got_m[i], m[i], 1e-6 * std::abs(m[i]) + 1e-12) << "m " << i;
    EXPECT_NEAR(got_v[i], v[i], 1e-6 * std::abs(v[i]) + 1e-15) << "v " << i;
    EXPECT_EQ(got_param[i], static_cast<double>(static_cast<T>(got_master[i]))) << "param " << i;
  }
  // The parameters actually moved: Adam's steps are about lr each.
  double largest_move = 0.0;
  for (int64_t i = 0; i < n; ++i)
    largest_move = std::max<double>(largest_move, std::abs(got_master[i] - master[i]));
  EXPECT_GT(largest_move, lr);

  EXPECT_THROW(kernels->adamw_update(dmaster.data(), dm.data(), dv.data(), dparam.data(),
                                     dgrad.data(), n, lr, beta1, beta2, eps, wd, 0, 1.0),
               std::invalid_argument);
}

}  // namespace
