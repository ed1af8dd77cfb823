// The SIMT emulator's own tests: that it computes what CUDA would, and that it catches the bugs it
// claims to catch (races, deadlocks, bad launch configurations, WMMA layout assumptions, reads of
// unwritten shared memory). Kernels are launched through ::emu::launch directly, which is what
// rewrite_cuda makes of `<<<...>>>`.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mma.h>

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Kernels run in stream order: the host waits for them before reading what they wrote.
void sync() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

class Simt : public ::testing::Test {
 protected:
  void TearDown() override { emu::set_schedule("forward"); }
};

// ---- kernels ------------------------------------------------------------------------------------
__global__ void block_sum_kernel(const float* x, float* out, int n) {
  __shared__ float partial[256];
  float sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += x[blockIdx.x * n + i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Reads a neighbour's shared value without a barrier in between: a race.
__global__ void racy_shift_kernel(const float* x, float* out) {
  __shared__ float staged[128];
  staged[threadIdx.x] = x[threadIdx.x];
  out[threadIdx.x] = staged[(threadIdx.x + 1) % blockDim.x];
}

// A block reduction through shared scratch without the __syncthreads that keeps one warp from
// writing the next reduction's partial sum while another warp still reads this one's.
__device__ float unguarded_block_sum(float value, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += scratch[w];
  return total;
}

__global__ void two_block_sums_kernel(const float* x, float* out) {
  __shared__ float scratch[32];
  const float a = unguarded_block_sum(x[threadIdx.x], scratch);
  const float b = unguarded_block_sum(2.0f * x[threadIdx.x], scratch);
  out[threadIdx.x] = a + b;
}

__global__ void fill_kernel(float* out, float value) { out[threadIdx.x] = value; }
__global__ void copy_kernel(float* out, const float* in) { out[threadIdx.x] = in[threadIdx.x]; }

__global__ void warp_sum_kernel(const int* x, int* out) {
  int value = x[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  out[threadIdx.x] = value;
}

// Half of warp 0 waits at __syncthreads while the other half waits at a shuffle: a hang on the GPU.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  } else {
    __syncthreads();
  }
}

// Threads that return early do not hold up a barrier, as on the GPU.
__global__ void early_exit_kernel(int* out, int live) {
  __shared__ int flag;
  if (static_cast<int>(threadIdx.x) >= live) return;
  if (threadIdx.x == 0) flag = 7;
  __syncthreads();
  out[threadIdx.x] = flag;
}

__global__ void dynamic_shared_kernel(float* out, int written) {
  // rewrite_cuda turns `extern __shared__ float smem[];` into this line.
  float* smem = reinterpret_cast<float*>(::emu::dynamic_shared_memory());
  if (static_cast<int>(threadIdx.x) < written) smem[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x];
}

using namespace nvcuda;

// C (16x16 fp32, row-major) = A (16x16 bf16, row-major) B (16x16 bf16, col-major) + C.
__global__ void wmma_kernel(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

// Scales row r of an accumulator by 2^r assuming lane l holds row l / 2 -- one real layout of
// one architecture, which CUDA does not promise.
__global__ void layout_assuming_kernel(float* c) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  const int assumed_row = static_cast<int>(threadIdx.x) / 2;
  for (int e = 0; e < fc.num_elements; ++e) fc.x[e] *= std::ldexp(1.0f, assumed_row);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

// ---- tests --------------------------------------------------------------------------------------
TEST_F(Simt, BlockReductionUnderEverySchedule) {
  const int blocks = 3, n = 1000;
  std::vector<float> x(blocks * n);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) - 3.0f;
  for (const char* schedule : {"forward", "reverse", "greedy", "shuffled"}) {
    emu::set_schedule(schedule);
    std::vector<float> out(blocks, -1.0f);
    emu::launch(block_sum_kernel, "block_sum_kernel", blocks, 256)(x.data(), out.data(), n); sync();
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    for (int b = 0; b < blocks; ++b) {
      double expected = 0;
      for (int i = 0; i < n; ++i) expected += x[b * n + i];
      EXPECT_EQ(out[b], static_cast<float>(expected)) << schedule << " block " << b;
    }
  }
}

TEST_F(Simt, AMissingBarrierGivesResultsThatDependOnTheSchedule) {
  std::vector<float> x(128);
  for (int i = 0; i < 128; ++i) x[i] = static_cast<float>(i);
  std::vector<float> forward(128), reverse(128);
  emu::set_schedule("forward");
  emu::launch(racy_shift_kernel, "racy_shift_kernel", 1, 128)(x.data(), forward.data()); sync();
  emu::set_schedule("reverse");
  emu::launch(racy_shift_kernel, "racy_shift_kernel", 1, 128)(x.data(), reverse.data()); sync();
  EXPECT_NE(forward, reverse) << "a race must show as a difference between schedules";
}

TEST_F(Simt, AWarpRunningAheadAcrossBarriersExposesSharedMemoryReuse) {
  std::vector<float> x(128);
  for (int i = 0; i < 128; ++i) x[i] = static_cast<float>(i % 5);
  float sum = 0.0f;
  for (float v : x) sum += v;
  std::vector<float> out(128);
  emu::set_schedule("forward");
  emu::launch(two_block_sums_kernel, "two_block_sums_kernel", 1, 128)(x.data(), out.data()); sync();
  EXPECT_EQ(out[0], 3.0f * sum) << "round-robin passes keep the warps in step";
  emu::set_schedule("greedy");
  emu::launch(two_block_sums_kernel, "two_block_sums_kernel", 1, 128)(x.data(), out.data()); sync();
  int wrong = 0;
  for (float v : out) wrong += v != 3.0f * sum;
  EXPECT_GT(wrong, 0) << "the greedy schedule must expose the missing barrier";
}

// Work runs in stream order: a consumer on another stream sees its producer's output only when it
// waits for an event recorded after the producer, and the host only after synchronising.
TEST_F(Simt, StreamsOrderWorkOnlyThroughEventsAndSynchronisation) {
  emu::set_deferred_streams(true);
  cudaStream_t producer, consumer;
  ASSERT_EQ(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&consumer, cudaStreamNonBlocking), cudaSuccess);
  cudaEvent_t produced;
  ASSERT_EQ(cudaEventCreate(&produced), cudaSuccess);
  float* data = nullptr;
  float* seen = nullptr;
  ASSERT_EQ(cudaMalloc(&data, 32 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&seen, 32 * sizeof(float)), cudaSuccess);
  float host[32];

  // Without a wait the consumer, drained first, reads what was there before (0).
  ASSERT_EQ(cudaMemset(data, 0, 32 * sizeof(float)), cudaSuccess);
  emu::launch(fill_kernel, "fill_kernel", 1, 32, 0, producer)(data, 7.0f);
  emu::launch(copy_kernel, "copy_kernel", 1, 32, 0, consumer)(seen, data);
  ASSERT_EQ(cudaStreamSynchronize(consumer), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(host, seen, sizeof(host), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(host[5], 0.0f) << "a consumer that does not wait ran after its producer";
  ASSERT_EQ(cudaStreamSynchronize(producer), cudaSuccess);

  // With the event it sees the producer's value.
  emu::launch(fill_kernel, "fill_kernel", 1, 32, 0, producer)(data, 9.0f);
  ASSERT_EQ(cudaEventRecord(produced, producer), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(consumer, produced, 0), cudaSuccess);
  emu::launch(copy_kernel, "copy_kernel", 1, 32, 0, consumer)(seen, data);
  ASSERT_EQ(cudaStreamSynchronize(consumer), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(host, seen, sizeof(host), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(host[5], 9.0f);

  // An asynchronous copy into pinned memory lands when the stream is synchronised, not before.
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, 32 * sizeof(float)), cudaSuccess);
  pinned[5] = -1.0f;
  ASSERT_EQ(cudaMemcpyAsync(pinned, data, 32 * sizeof(float), cudaMemcpyDeviceToHost, producer),
            cudaSuccess);
  EXPECT_EQ(pinned[5], -1.0f);
  ASSERT_EQ(cudaStreamSynchronize(producer), cudaSuccess);
  EXPECT_EQ(pinned[5], 9.0f);

  EXPECT_EQ(cudaFreeHost(pinned), cudaSuccess);
  EXPECT_EQ(cudaFree(data), cudaSuccess);
  EXPECT_EQ(cudaFree(seen), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(produced), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(producer), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(consumer), cudaSuccess);
  emu::set_deferred_streams(false);
}

TEST_F(Simt, WarpShuffleReduction) {
  std::vector<int> x(64), out(64);
  for (int i = 0; i < 64; ++i) x[i] = i;
  emu::launch(warp_sum_kernel, "warp_sum_kernel", 1, 64)(x.data(), out.data()); sync();
  for (int i = 0; i < 32; ++i) EXPECT_EQ(out[i], 31 * 32 / 2);
  for (int i = 32; i < 64; ++i) EXPECT_EQ(out[i], (32 + 63) * 32 / 2);
}

TEST_F(Simt, DivergentBarriersAreReportedAsADeadlock) {
  std::vector<int> out(64);
  try {
    emu::launch(divergent_barrier_kernel, "divergent_barrier_kernel", 1, 64)(out.data()); sync();
    FAIL() << "the deadlock was not detected";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("divergent_barrier_kernel"), std::string::npos) << what;
    EXPECT_NE(what.find("deadlock"), std::string::npos) << what;
  }
  // The emulator recovers: the next launch runs.
  std::vector<int> x(64, 1), sums(64);
  emu::launch(warp_sum_kernel, "warp_sum_kernel", 1, 64)(x.data(), sums.data()); sync();
  EXPECT_EQ(sums[0], 32);
}

TEST_F(Simt, ReturnedThreadsDoNotHoldUpABarrier) {
  std::vector<int> out(128, -1);
  emu::launch(early_exit_kernel, "early_exit_kernel", 1, 128)(out.data(), 40); sync();
  for (int i = 0; i < 40; ++i) EXPECT_EQ(out[i], 7);
  for (int i = 40; i < 128; ++i) EXPECT_EQ(out[i], -1);
}

TEST_F(Simt, LaunchConfigurationsAreCheckedAsTheRuntimeDoes) {
  std::vector<int> out(2048);
  (void)cudaGetLastError();
  emu::launch(early_exit_kernel, "early_exit_kernel", 1, 2048)(out.data(), 1); sync();
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  emu::launch(early_exit_kernel, "early_exit_kernel", dim3(1, 70000), 32)(out.data(), 1); sync();
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  emu::launch(early_exit_kernel, "early_exit_kernel", 0, 32)(out.data(), 1); sync();
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);

  // Beyond 48 KiB of dynamic shared memory only after cudaFuncSetAttribute, never beyond 227 KiB.
  std::vector<float> f(64);
  emu::launch(dynamic_shared_kernel, "dynamic_shared_kernel", 1, 64, 64 * 1024)(f.data(), 64); sync();
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 64 * 1024),
            cudaSuccess);
  emu::launch(dynamic_shared_kernel, "dynamic_shared_kernel", 1, 64, 64 * 1024)(f.data(), 64); sync();
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_NE(cudaFuncSetAttribute(dynamic_shared_kernel,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024),
            cudaSuccess);
}

TEST_F(Simt, UnwrittenDynamicSharedMemoryReadsAsNaN) {
  std::vector<float> out(64);
  emu::launch(dynamic_shared_kernel, "dynamic_shared_kernel", 1, 64, 64 * 4)(out.data(), 32); sync();
  for (int i = 0; i < 32; ++i) EXPECT_EQ(out[i], 1.0f);
  for (int i = 32; i < 64; ++i) EXPECT_TRUE(std::isnan(out[i])) << i;
}

TEST_F(Simt, WmmaMatchesAMatrixProduct) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<__nv_bfloat16> a(256), b(256);
  std::vector<float> c(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2bfloat16_rn(u(rng));
    b[i] = __float2bfloat16_rn(u(rng));
    c[i] = u(rng);
  }
  std::vector<float> expected(256);
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) {
      double s = c[r * 16 + col];
      for (int k = 0; k < 16; ++k) {
        s += double(__bfloat162float(a[r * 16 + k])) * __bfloat162float(b[col * 16 + k]);
      }
      expected[r * 16 + col] = static_cast<float>(s);
    }
  }
  for (const char* schedule : {"forward", "reverse"}) {
    emu::set_schedule(schedule);
    std::vector<float> out = c;
    emu::launch(wmma_kernel, "wmma_kernel", 1, 32)(out.data(), a.data(), b.data()); sync();
    for (int i = 0; i < 256; ++i) EXPECT_NEAR(out[i], expected[i], 1e-5) << schedule << " " << i;
  }
}

TEST_F(Simt, CodeThatAssumesAFragmentLayoutFails) {
  std::vector<float> c(256, 1.0f);
  emu::launch(layout_assuming_kernel, "layout_assuming_kernel", 1, 32)(c.data()); sync();
  int right = 0;
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) right += c[r * 16 + col] == std::ldexp(1.0f, r);
  }
  EXPECT_LT(right, 64) << "the emulated layout must not be the row-per-lane-pair one";
}

}  // namespace
