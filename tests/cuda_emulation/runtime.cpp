// The emulated CUDA runtime (include/cuda_runtime.h): one device whose memory is host memory.
// Allocations are tracked, so copies and frees check what the runtime would have to trust:
// a device pointer must lie inside a device allocation with room for the copy, a host pointer
// must not, and only what was allocated is freed.
#include <cuda_runtime.h>

#include <cstdlib>
#include <deque>
#include <functional>
#include <stdexcept>
#include <cstring>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr int kMultiprocessors = 4;  // few blocks for grid-stride kernels: the emulator is slow
constexpr size_t kDeviceBytes = size_t{16} << 30;

struct Allocation {
  size_t bytes;
  bool device;       // cudaMalloc / cudaMallocAsync; false: cudaMallocHost
  bool stream_pool;  // cudaMallocAsync
};

// One stream's queue: work enqueued and not yet run, numbered in enqueue order.
struct StreamQueue {
  std::deque<std::pair<uint64_t, std::function<void()>>> pending;
  uint64_t enqueued = 0;  // the number of the last work enqueued
  bool blocking = true;   // synchronises with the legacy default stream (not cudaStreamNonBlocking)
};

struct RuntimeState {
  std::mutex mutex;
  std::map<const char*, Allocation> allocations;
  size_t device_bytes = 0;
  size_t pool_bytes = 0;
  size_t pool_high = 0;
  cudaError_t last_error = cudaSuccess;
  std::vector<void (*)()> synchronize_hooks;
  std::map<cudaStream_t, StreamQueue> streams;  // nullptr: the legacy default stream
  int deferred = -1;                            // FREQKV_EMU_STREAMS, read once
};

RuntimeState& state() {
  static RuntimeState instance;
  return instance;
}

cudaError_t fail(cudaError_t error, const std::string& why) {
  // The runtime returns codes; a failed check here is nearly always a bug in the caller, so the
  // reason goes to stderr where a failing test shows it.
  std::cerr << "CUDA emulator: " << why << "\n";
  state().last_error = error;
  return error;
}

// The allocation holding [p, p + bytes), or nullptr.
const Allocation* find(const void* p, size_t bytes, const char** base = nullptr) {
  auto& allocations = state().allocations;
  const char* c = static_cast<const char*>(p);
  auto it = allocations.upper_bound(c);
  if (it == allocations.begin()) return nullptr;
  --it;
  if (c < it->first || c + bytes > it->first + std::max<size_t>(it->second.bytes, 1)) {
    return nullptr;
  }
  if (base != nullptr) *base = it->first;
  return &it->second;
}

cudaError_t allocate(void** ptr, size_t bytes, bool device, bool stream_pool) {
  if (ptr == nullptr) return fail(cudaErrorInvalidValue, "allocation with a null result pointer");
  RuntimeState& s = state();
  if (device && s.device_bytes + bytes > kDeviceBytes) {
    *ptr = nullptr;
    return fail(cudaErrorMemoryAllocation, "out of emulated device memory");
  }
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<size_t>(bytes, 1)) != 0) {
    return fail(cudaErrorMemoryAllocation, "host allocation failed");
  }
  // Fresh device memory holds garbage: NaN as float and bf16, so reading it before writing shows.
  std::memset(p, 0xff, std::max<size_t>(bytes, 1));
  s.allocations[static_cast<const char*>(p)] = Allocation{bytes, device, stream_pool};
  if (device) s.device_bytes += bytes;
  if (stream_pool) {
    s.pool_bytes += bytes;
    s.pool_high = std::max(s.pool_high, s.pool_bytes);
  }
  *ptr = p;
  return cudaSuccess;
}

cudaError_t release(void* ptr, bool device, const char* call) {
  if (ptr == nullptr) return cudaSuccess;
  RuntimeState& s = state();
  auto it = s.allocations.find(static_cast<const char*>(ptr));
  if (it == s.allocations.end() || it->second.device != device) {
    return fail(cudaErrorInvalidValue, std::string(call) + " of a pointer it did not allocate");
  }
  if (device) s.device_bytes -= it->second.bytes;
  if (it->second.stream_pool) s.pool_bytes -= it->second.bytes;
  s.allocations.erase(it);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t check_side(const void* p, size_t bytes, bool want_device, const char* role) {
  const Allocation* a = find(p, bytes);
  const bool is_device = a != nullptr && a->device;
  if (want_device && !is_device) {
    return fail(cudaErrorInvalidValue, std::string("cudaMemcpy: the ") + role + " (" +
                                           std::to_string(bytes) +
                                           " bytes) is not inside one device allocation");
  }
  const Allocation* first = find(p, 1);
  if (!want_device && first != nullptr && first->device) {
    return fail(cudaErrorInvalidValue,
                std::string("cudaMemcpy: the ") + role + " is device memory, the kind says host");
  }
  return cudaSuccess;
}

bool deferred() {
  RuntimeState& s = state();
  if (s.deferred < 0) {
    const char* value = std::getenv("FREQKV_EMU_STREAMS");
    const std::string v = value == nullptr ? "" : value;
    if (v != "" && v != "deferred" && v != "immediate") {
      throw std::invalid_argument("FREQKV_EMU_STREAMS='" + v +
                                  "': the CUDA emulator runs stream work deferred (the default) "
                                  "or immediate");
    }
    s.deferred = v != "immediate";
  }
  return s.deferred == 1;
}

StreamQueue& queue_of(cudaStream_t stream) { return state().streams[stream]; }

// Runs the work of `stream` numbered up to `last`, in order. Work may drain other streams (a
// cudaStreamWaitEvent) and they this one: each item leaves the queue before it runs.
void drain_to(cudaStream_t stream, uint64_t last) {
  StreamQueue& q = queue_of(stream);  // std::map: the reference survives insertions
  while (!q.pending.empty() && q.pending.front().first <= last) {
    std::function<void()> work = std::move(q.pending.front().second);
    q.pending.pop_front();
    work();
  }
}

void drain_stream(cudaStream_t stream) { drain_to(stream, queue_of(stream).enqueued); }

void drain_all() {
  bool again = true;
  while (again) {
    again = false;
    for (auto& [stream, q] : state().streams) {
      if (!q.pending.empty()) {
        drain_stream(stream);
        again = true;
      }
    }
  }
}

// What a blocking call on the legacy default stream waits for: that stream and every blocking
// stream (a stream made with cudaStreamNonBlocking does not synchronise with it).
void drain_legacy() {
  for (auto& [stream, q] : state().streams) {
    if (stream == nullptr || q.blocking) drain_stream(stream);
  }
}

// The host waits for the device here.
cudaError_t synchronized() {
  for (void (*flush)() : state().synchronize_hooks) flush();
  return cudaSuccess;
}

struct EmulatedEvent {
  bool recorded = false;
  cudaStream_t stream = nullptr;
  uint64_t last = 0;  // the stream's work up to this number precedes the event
};

}  // namespace

namespace emu {
void set_last_error(int error) { state().last_error = static_cast<cudaError_t>(error); }
void add_synchronize_hook(void (*flush)()) { state().synchronize_hooks.push_back(flush); }

void enqueue(cudaStream_t stream, std::function<void()> work) {
  if (!deferred()) {
    work();
    return;
  }
  StreamQueue& q = queue_of(stream);
  q.pending.emplace_back(++q.enqueued, std::move(work));
}

void drain(cudaStream_t stream) { drain_stream(stream); }

void set_deferred_streams(bool deferred) {
  drain_all();
  state().deferred = deferred ? 1 : 0;
}

void enqueue_launch(const void* stream, std::function<void()> work) {
  enqueue(static_cast<cudaStream_t>(const_cast<void*>(stream)), std::move(work));
}
}  // namespace emu

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t error = state().last_error;
  state().last_error = cudaSuccess;
  return error;
}
cudaError_t cudaPeekAtLastError() { return state().last_error; }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice, "cudaSetDevice: one device");
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute: one device");
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kMultiprocessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    case cudaDevAttrMemoryPoolsSupported: *value = 1; return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: an attribute the emulator lacks");
}
cudaError_t cudaDeviceSynchronize() {
  drain_all();
  return synchronized();
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *total_bytes = kDeviceBytes;
  *free_bytes = kDeviceBytes - state().device_bytes;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) { return allocate(ptr, bytes, true, false); }
cudaError_t cudaFree(void* ptr) {
  drain_all();  // cudaFree waits for the device
  return release(ptr, true, "cudaFree");
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) {
  return allocate(ptr, bytes, true, true);
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
  if (ptr != nullptr && find(ptr, 1) == nullptr) {
    return fail(cudaErrorInvalidValue, "cudaFreeAsync of a pointer it did not allocate");
  }
  // Freed in stream order: work enqueued before still sees the memory, work after does not.
  emu::enqueue(stream, [ptr] { (void)release(ptr, true, "cudaFreeAsync"); });
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** ptr, size_t bytes) { return allocate(ptr, bytes, false, false); }
cudaError_t cudaFreeHost(void* ptr) {
  drain_all();  // cudaFreeHost waits for the device
  return release(ptr, false, "cudaFreeHost");
}

static cudaError_t check_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (kind != cudaMemcpyDefault) {
    const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    cudaError_t e = check_side(dst, bytes, dst_device, "destination");
    if (e != cudaSuccess) return e;
    e = check_side(src, bytes, src_device, "source");
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

static bool pinned_host(const void* p) {
  const Allocation* a = find(p, 1);
  return a != nullptr && !a->device;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  const cudaError_t e = check_copy(dst, src, bytes, kind);
  if (e != cudaSuccess) return e;
  drain_legacy();  // a blocking copy on the legacy default stream
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  const cudaError_t e = check_copy(dst, src, bytes, kind);
  if (e != cudaSuccess) return e;
  const bool src_pageable = !pinned_host(src) && (kind == cudaMemcpyHostToDevice ||
                                                  kind == cudaMemcpyHostToHost);
  const bool dst_pageable = !pinned_host(dst) && (kind == cudaMemcpyDeviceToHost ||
                                                  kind == cudaMemcpyHostToHost);
  if (dst_pageable) {
    // Into pageable memory the copy returns only when done: after the stream's earlier work.
    emu::drain(stream);
    std::memmove(dst, src, bytes);
    return cudaSuccess;
  }
  if (src_pageable) {
    // From pageable memory the runtime stages the bytes before returning: the caller may reuse
    // its buffer at once. From pinned memory it reads them when the copy runs.
    auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                      static_cast<const char*>(src) + bytes);
    emu::enqueue(stream, [dst, staged, bytes] { std::memcpy(dst, staged->data(), bytes); });
    return cudaSuccess;
  }
  emu::enqueue(stream, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  return cudaSuccess;
}
static cudaError_t check_set(void* ptr, size_t bytes) {
  const Allocation* a = find(ptr, bytes);
  if (a == nullptr || !a->device) {
    return fail(cudaErrorInvalidValue, "cudaMemset of " + std::to_string(bytes) +
                                           " bytes not inside one device allocation");
  }
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  if (const cudaError_t e = check_set(ptr, bytes); e != cudaSuccess) return e;
  drain_legacy();
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  if (const cudaError_t e = check_set(ptr, bytes); e != cudaSuccess) return e;
  emu::enqueue(stream, [ptr, value, bytes] { std::memset(ptr, value, bytes); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  // A distinct non-null token per stream.
  *stream = reinterpret_cast<cudaStream_t>(new char);
  queue_of(*stream).blocking = (flags & cudaStreamNonBlocking) == 0;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (stream == nullptr) return fail(cudaErrorInvalidValue, "cudaStreamDestroy(null)");
  // The runtime lets the stream's work finish first.
  drain_stream(stream);
  state().streams.erase(stream);
  delete reinterpret_cast<char*>(stream);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  drain_stream(stream);
  return synchronized();
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, 0); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  if (event == nullptr) return fail(cudaErrorInvalidValue, "cudaEventCreate(null)");
  *event = reinterpret_cast<cudaEvent_t>(new EmulatedEvent);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidValue, "cudaEventDestroy(null)");
  delete reinterpret_cast<EmulatedEvent*>(event);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (event == nullptr) return fail(cudaErrorInvalidValue, "cudaEventRecord(null)");
  EmulatedEvent* e = reinterpret_cast<EmulatedEvent*>(event);
  e->recorded = true;
  e->stream = stream;
  e->last = queue_of(stream).enqueued;  // everything enqueued on the stream so far
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidValue, "cudaEventSynchronize(null)");
  const EmulatedEvent* e = reinterpret_cast<const EmulatedEvent*>(event);
  if (e->recorded) drain_to(e->stream, e->last);
  return synchronized();
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidValue, "cudaEventQuery(null)");
  const EmulatedEvent* e = reinterpret_cast<const EmulatedEvent*>(event);
  const StreamQueue& q = queue_of(e->stream);
  const bool done = !e->recorded || q.pending.empty() || q.pending.front().first > e->last;
  return done ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  if (event == nullptr) return fail(cudaErrorInvalidValue, "cudaStreamWaitEvent on a null event");
  const EmulatedEvent* e = reinterpret_cast<const EmulatedEvent*>(event);
  if (!e->recorded) return cudaSuccess;  // waiting for an event never recorded waits for nothing
  // Work enqueued on `stream` after this runs after the event's work: draining `stream` past
  // this point first drains the event's stream up to it.
  const cudaStream_t producer = e->stream;
  const uint64_t last = e->last;
  emu::enqueue(stream, [producer, last] { drain_to(producer, last); });
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* ptr) {
  if (attributes == nullptr) return fail(cudaErrorInvalidValue, "cudaPointerGetAttributes(null)");
  const char* base = nullptr;
  const Allocation* a = find(ptr, 1, &base);
  attributes->device = 0;
  attributes->type = a == nullptr ? cudaMemoryTypeUnregistered
                                  : (a->device ? cudaMemoryTypeDevice : cudaMemoryTypeHost);
  attributes->devicePointer = a != nullptr && a->device ? const_cast<void*>(ptr) : nullptr;
  attributes->hostPointer = a != nullptr && !a->device ? const_cast<void*>(ptr) : nullptr;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "cudaDeviceGetDefaultMemPool: one device");
  static char token;
  *pool = reinterpret_cast<cudaMemPool_t>(&token);
  return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr attr, void* value) {
  switch (attr) {
    case cudaMemPoolAttrReleaseThreshold: return cudaSuccess;
    case cudaMemPoolAttrUsedMemHigh:
    case cudaMemPoolAttrReservedMemHigh:
      // The runtime accepts only 0 here: it resets the high-water mark to what is in use.
      if (*static_cast<uint64_t*>(value) != 0) {
        return fail(cudaErrorInvalidValue, "cudaMemPoolSetAttribute: a high-water mark resets to 0");
      }
      state().pool_high = state().pool_bytes;
      return cudaSuccess;
    default: return fail(cudaErrorInvalidValue, "cudaMemPoolSetAttribute: read-only attribute");
  }
}
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, cudaMemPoolAttr attr, void* value) {
  uint64_t* out = static_cast<uint64_t*>(value);
  switch (attr) {
    case cudaMemPoolAttrReleaseThreshold: *out = 0; return cudaSuccess;
    case cudaMemPoolAttrReservedMemCurrent:
    case cudaMemPoolAttrUsedMemCurrent: *out = state().pool_bytes; return cudaSuccess;
    case cudaMemPoolAttrReservedMemHigh:
    case cudaMemPoolAttrUsedMemHigh: *out = state().pool_high; return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "cudaMemPoolGetAttribute: unknown attribute");
}
