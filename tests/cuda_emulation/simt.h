// CUDA emulation: a SIMT emulator that runs the CUDA backend's kernels (kernels/cuda/*.cu,
// compiled as host C++ after tests/cuda_emulation/rewrite_cuda.cpp turns each launch
// `kernel<<<grid, block, smem, stream>>>(args)` into `::emu::launch(kernel, "kernel", grid,
// block, smem, stream)(args)`) on the CPU, so CI -- which has no GPU -- checks the device code
// itself against the CPU backend: indexing, tiling, masks, reductions, barriers.
//
// Every CUDA thread is a fiber (its own stack; simt.cpp switches between them). The threads of one block run one after another on the
// host thread, each until it reaches a synchronisation point: __syncthreads, __syncwarp, a warp
// shuffle or a WMMA operation (warp-synchronous). Blocks run one at a time, so `__shared__`
// variables become function statics (one per block in flight) and atomics need no locking.
//
// What it checks beyond the values:
//   * Races. Between two synchronisation points a thread runs alone, so a missing barrier makes
//     the result depend on the order threads run in. FREQKV_EMU_SCHEDULE=forward (default),
//     reverse, greedy (one warp runs ahead of the others across barriers) or shuffled picks
//     that order; CI runs the kernel tests under forward and greedy.
//   * Deadlocks: __syncthreads in divergent code, or a warp-synchronous op that some lanes of a
//     warp never reach, is reported with the kernel's name instead of hanging.
//   * Launch configurations as the runtime checks them (block size, grid size, dynamic shared
//     memory beyond 48 KiB without cudaFuncSetAttribute, beyond 227 KiB at all).
//   * Reads of dynamic shared memory nobody wrote: it starts every block filled with 0xff bytes,
//     NaN as float and bf16.
//   * WMMA fragment layouts: which lane holds which element of a fragment is unspecified on the
//     GPU; here it is a fixed pseudo-random permutation, so code that assumes a layout fails.
//   * Stream order (the emulated runtime, include/cuda_runtime.h): work runs when its stream is
//     drained, so a consumer that does not wait for its producer's event reads stale data.
// What it cannot check: performance, the memory model beyond barriers, cp.async, or anything
// the real libraries (cuBLASLt, cuFFT, NCCL) do -- those are emulated by their documented
// semantics in emulated_libraries.cpp and emulated_nccl.cpp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- the CUDA C++ dialect, as host C++ ---------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// One block runs at a time, so a block's shared variables are the function's statics.
#define __shared__ static
#define __constant__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};
using uint3 = dim3;

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return {x, y, z, w};
}
inline int2 make_int2(int x, int y) { return {x, y}; }

namespace emu {

// ---- the thread that is running -----------------------------------------------------------------
struct ThreadState {
  dim3 thread_idx;
  int linear = 0;  // x + y Dx + z Dx Dy
  int lane = 0;
  int warp = 0;
};
struct LaunchState {
  dim3 grid;
  dim3 block;
  dim3 block_idx;
};
const ThreadState& current_thread();
const LaunchState& current_launch();
unsigned char* dynamic_shared_memory();

// ---- synchronisation points (called from inside a kernel) ---------------------------------------
void sync_block();  // __syncthreads
void sync_warp();   // every live lane of the calling thread's warp has arrived
// A warp-collective exchange: publishes `bytes` (at most kExchangeBytes) of this lane's data,
// waits for every live lane of the warp, and returns the warp's table, in which lane l's data
// starts at l * kExchangeBytes. The table stays valid until this lane's next exchange: tables
// alternate between two buffers, and a lane can only reuse a buffer after every lane has arrived
// at the exchange in between (so one barrier per exchange suffices).
// `combine`, when given, runs once on the full table (by the last lane to arrive) before any lane
// reads it, so a warp-wide result is computed once instead of by every lane.
constexpr size_t kExchangeBytes = 64;
const unsigned char* warp_exchange(const void* mine, size_t bytes,
                                   void (*combine)(unsigned char* table) = nullptr);

// ---- launching ----------------------------------------------------------------------------------
// Runs `thread_body` as every thread of the grid, whose configuration Launch has checked
// (check_launch_configuration, at launch time as the runtime does). Faults inside the kernel (a
// deadlock, an exception) throw std::runtime_error naming the kernel.
void run_grid(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
              const std::function<void()>& thread_body);
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, value).
bool set_function_attribute(const void* kernel, int attribute, int value);
// The order threads run in between synchronisation points: "forward", "reverse", "greedy" or
// "shuffled" (simt.cpp, Schedule).
// Starts as FREQKV_EMU_SCHEDULE (default forward); throws std::invalid_argument for other names.
void set_schedule(const char* name);
// Records a launch failure as the runtime's last error (runtime.cpp).
void set_last_error(int error);
// The runtime's checks of a launch configuration: 0, or the cudaError_t value of the failure.
int check_launch_configuration(const void* kernel, dim3 grid, dim3 block,
                               size_t dynamic_shared_bytes);
// Enqueues a launch on a stream (a cudaStream_t; runtime.cpp, emu::enqueue).
void enqueue_launch(const void* stream, std::function<void()> work);

template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block, size_t smem,
         const void* stream)
      : kernel_(kernel), name_(name), grid_(grid), block_(block), smem_(smem), stream_(stream) {}

  // The configuration is checked now (cudaGetLastError right after the launch sees a bad one);
  // the kernel runs in stream order. The arguments convert to the kernel's parameter types now,
  // on the host, as a real launch copies them into the kernel's parameter space.
  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with a wrong arity");
    auto* kernel = kernel_;
    const int error =
        check_launch_configuration(reinterpret_cast<const void*>(kernel), grid_, block_, smem_);
    if (error != 0) {
      set_last_error(error);
      return;
    }
    auto parameters =
        std::make_shared<const std::tuple<std::decay_t<Params>...>>(std::forward<Args>(args)...);
    const char* name = name_;
    const dim3 grid = grid_, block = block_;
    const size_t smem = smem_;
    enqueue_launch(stream_, [=] {
      run_grid(name, grid, block, smem, [&] {
        // Each thread gets its own copy of the parameters, as on the GPU.
        std::tuple<std::decay_t<Params>...> mine = *parameters;
        std::apply(kernel, mine);
      });
    });
  }

 private:
  void (*kernel_)(Params...);
  const char* name_;
  dim3 grid_, block_;
  size_t smem_;
  const void* stream_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block,
                         size_t dynamic_shared_bytes = 0, const void* stream = nullptr) {
  return Launch<Params...>(kernel, name, grid, block, dynamic_shared_bytes, stream);
}

}  // namespace emu

// ---- built-in variables -------------------------------------------------------------------------
#define threadIdx (::emu::current_thread().thread_idx)
#define blockIdx (::emu::current_launch().block_idx)
#define blockDim (::emu::current_launch().block)
#define gridDim (::emu::current_launch().grid)
#define warpSize 32

// ---- synchronisation and warp-level primitives --------------------------------------------------
inline void __syncthreads() { ::emu::sync_block(); }
// The mask is not checked: every kernel here syncs whole warps.
inline void __syncwarp(unsigned int /*mask*/ = 0xffffffffu) { ::emu::sync_warp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T emu_shuffle(T value, int source_lane) {
  static_assert(sizeof(T) <= ::emu::kExchangeBytes && std::is_trivially_copyable<T>::value,
                "shuffle of a small value");
  const unsigned char* table = ::emu::warp_exchange(&value, sizeof(T));
  T result;
  std::memcpy(&result, table + (source_lane & 31) * ::emu::kExchangeBytes, sizeof(T));
  return result;
}
template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask, int width = 32) {
  const int lane = ::emu::current_thread().lane;
  const int source = lane ^ lane_mask;
  // Lanes outside the caller's segment of `width` lanes read their own value.
  return emu_shuffle(value, (source / width == lane / width) ? source : lane);
}
template <typename T>
T __shfl_sync(unsigned int /*mask*/, T value, int source_lane, int width = 32) {
  const int lane = ::emu::current_thread().lane;
  return emu_shuffle(value, (lane / width) * width + (source_lane % width));
}
template <typename T>
T __shfl_down_sync(unsigned int /*mask*/, T value, unsigned int delta, int width = 32) {
  const int lane = ::emu::current_thread().lane;
  const int source = lane + static_cast<int>(delta);
  return emu_shuffle(value, (source / width == lane / width) ? source : lane);
}
template <typename T>
T __shfl_up_sync(unsigned int /*mask*/, T value, unsigned int delta, int width = 32) {
  const int lane = ::emu::current_thread().lane;
  const int source = lane - static_cast<int>(delta);
  return emu_shuffle(value, (source >= 0 && source / width == lane / width) ? source : lane);
}

// ---- atomics: blocks and threads never run at the same time -------------------------------------
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  if (value > old) *address = value;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  if (value < old) *address = value;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}

// ---- math: the device functions the kernels use, with IEEE round-to-nearest ---------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __exp2f(float a) { return std::exp2(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
[[noreturn]] void emu_trap();
inline void __trap() { emu_trap(); }

// CUDA's max/min for the arithmetic types (device code calls them unqualified), mixed types in
// the common type; floating-point as fmax/fmin (a NaN loses to a number).
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) {
    return std::fmax(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
  }
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) {
    return std::fmin(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
  }
}
