// The SIMT emulator's scheduler (simt.h): one fiber per CUDA thread, blocks one at a time.
#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FREQKV_EMU_ASAN 1
#endif

namespace emu {
namespace {

// Kernels keep tiles of registers in local arrays, and AddressSanitizer pads every frame.
constexpr size_t kStackBytes = 512 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // sm_90's opt-in maximum per block
constexpr int kCudaErrorInvalidValue = 1;
constexpr int kCudaErrorInvalidConfiguration = 9;

enum class FiberState { Ready, AtBlockBarrier, AtWarpBarrier, Done };
// Forward and Reverse run every ready thread once per pass (ascending or descending); Greedy runs
// the warps from the last down, each until all its threads wait at __syncthreads or have
// returned, so one warp gets several synchronisation points ahead of the others (a reuse of
// shared memory that only a __syncthreads protects shows); Shuffled is a random order per block.
enum class Schedule { Forward, Reverse, Greedy, Shuffled };

// ---- context switches ---------------------------------------------------------------------------
// glibc's swapcontext saves the signal mask with a system call on every switch, which was 70% of
// the emulator's time; on x86-64 a switch here saves only what the ABI says a call preserves
// (rbx, rbp, r12-r15, the stack pointer, MXCSR and the x87 control word). Elsewhere: ucontext.
#if defined(__x86_64__) && !defined(FREQKV_EMU_UCONTEXT)  // FREQKV_EMU_UCONTEXT: test the fallback
extern "C" void freqkv_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl freqkv_emu_switch
  .type freqkv_emu_switch, @function
freqkv_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size freqkv_emu_switch, .-freqkv_emu_switch
)");

struct Context {
  void* sp = nullptr;
  const void* stack_bottom = nullptr;  // for AddressSanitizer
  size_t stack_size = 0;
};

// A stack that freqkv_emu_switch "returns" into `entry`, which must never return.
void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
  auto* slots = reinterpret_cast<uint64_t*>(top);
  slots[-1] = 0;  // entry's return address: none, which also ends an unwinder's walk
  slots[-2] = reinterpret_cast<uint64_t>(entry);
  for (int r = 3; r <= 8; ++r) slots[-r] = 0;  // rbp, rbx, r12-r15
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(&slots[-9], control, 8);
  context.sp = &slots[-9];
  context.stack_bottom = stack;
  context.stack_size = bytes;
}
inline void raw_switch(Context& from, Context& to) { freqkv_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
  const void* stack_bottom = nullptr;  // for AddressSanitizer
  size_t stack_size = 0;
};
void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  context.stack_bottom = stack;
  context.stack_size = bytes;
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}
inline void raw_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Under AddressSanitizer every switch is announced, or it takes the fiber stacks for overflows.
// `from_exits`: the calling fiber is never resumed.
void switch_context(Context& from, Context& to, bool from_exits = false) {
#if defined(FREQKV_EMU_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(from_exits ? nullptr : &fake_stack, to.stack_bottom,
                                 to.stack_size);
#endif
  raw_switch(from, to);
#if defined(FREQKV_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)from_exits;
#endif
}

struct Fiber {
  ThreadState thread;
  Context context;
  FiberState state = FiberState::Done;
  int exchange_buffer = 0;  // which of the warp's two exchange tables this lane uses next
};

struct WarpExchange {
  alignas(16) unsigned char tables[2][32 * kExchangeBytes];
  int live = 0;     // lanes that have not returned
  int arrived = 0;  // lanes waiting at the warp barrier
};

struct Emulator {
  char* stacks = nullptr;  // kMaxThreadsPerBlock stacks, each with a guard page below it
  size_t page = 4096;
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> warps;
  std::vector<int> order;
  // Per stack: a thread was abandoned on it mid-kernel (a fault or a deadlock), so frames deep
  // in it may still be poisoned for AddressSanitizer.
  std::vector<bool> stack_abandoned = std::vector<bool>(kMaxThreadsPerBlock, false);
  Context scheduler;
  Fiber* running = nullptr;
  LaunchState launch;
  const char* kernel_name = "";
  const std::function<void()>* body = nullptr;
  unsigned char* dynamic_shared = nullptr;  // this launch's, exactly as large as it asked for
  size_t dynamic_shared_bytes = 0;
  int block_live = 0;
  int block_arrived = 0;
  std::exception_ptr fault;
  std::map<const void*, size_t> dynamic_shared_limit;
  bool schedule_read = false;
  Schedule schedule = Schedule::Forward;
};

Emulator& emulator() {
  static Emulator instance;
  return instance;
}

Schedule parse_schedule(const std::string& s, const char* where) {
  if (s.empty() || s == "forward") return Schedule::Forward;
  if (s == "reverse") return Schedule::Reverse;
  if (s == "greedy") return Schedule::Greedy;
  if (s == "shuffled") return Schedule::Shuffled;
  throw std::invalid_argument(std::string(where) + "='" + s +
                              "': the CUDA emulator runs threads in forward, reverse, greedy or "
                              "shuffled order; use one of those");
}

Schedule schedule_from_environment() {
  const char* value = std::getenv("FREQKV_EMU_SCHEDULE");
  return parse_schedule(value == nullptr ? "" : value, "FREQKV_EMU_SCHEDULE");
}

void allocate_stacks(Emulator& em) {
  if (em.stacks != nullptr) return;
  em.page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t per_thread = kStackBytes + em.page;
  void* base = mmap(nullptr, per_thread * kMaxThreadsPerBlock, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot map fiber stacks");
  em.stacks = static_cast<char*>(base);
  // A guard page under every stack: an overflow faults instead of writing into a neighbour.
  for (int t = 0; t < kMaxThreadsPerBlock; ++t) {
    (void)mprotect(em.stacks + t * per_thread, em.page, PROT_NONE);
  }
}

void release_block_barrier(Emulator& em) {
  for (Fiber& f : em.fibers) {
    if (f.state == FiberState::AtBlockBarrier) f.state = FiberState::Ready;
  }
  em.block_arrived = 0;
}

void release_warp_barrier(Emulator& em, int warp) {
  const int begin = warp * 32;
  const int end = std::min<int>(begin + 32, static_cast<int>(em.fibers.size()));
  for (int t = begin; t < end; ++t) {
    if (em.fibers[t].state == FiberState::AtWarpBarrier) em.fibers[t].state = FiberState::Ready;
  }
  em.warps[warp].arrived = 0;
}

void fiber_entry() {
  Emulator& em = emulator();
#if defined(FREQKV_EMU_ASAN)
  // Arrived from the scheduler: its stack is the one to announce when switching back.
  __sanitizer_finish_switch_fiber(nullptr, &em.scheduler.stack_bottom, &em.scheduler.stack_size);
#endif
  try {
    (*em.body)();
  } catch (...) {
    if (!em.fault) em.fault = std::current_exception();
  }
  // The thread has returned: barriers stop waiting for it (as the hardware does for exited
  // threads).
  Fiber& f = *em.running;
  f.state = FiberState::Done;
  --em.block_live;
  WarpExchange& warp = em.warps[f.thread.warp];
  --warp.live;
  if (em.block_arrived > 0 && em.block_arrived == em.block_live) release_block_barrier(em);
  if (warp.arrived > 0 && warp.arrived == warp.live) release_warp_barrier(em, f.thread.warp);
  switch_context(f.context, em.scheduler, /*from_exits=*/true);  // never resumed
  std::abort();
}

std::string block_text(const dim3& b) {
  return "(" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")";
}

std::string deadlock_report(const Emulator& em) {
  int at_block = 0;
  std::string warps;
  for (const Fiber& f : em.fibers) {
    if (f.state == FiberState::AtBlockBarrier) ++at_block;
  }
  for (size_t w = 0; w < em.warps.size(); ++w) {
    if (em.warps[w].arrived > 0) {
      warps += "; warp " + std::to_string(w) + ": " + std::to_string(em.warps[w].arrived) +
               " of its " + std::to_string(em.warps[w].live) +
               " live lanes wait at a warp-synchronous operation";
    }
  }
  return std::to_string(at_block) + " of " + std::to_string(em.block_live) +
         " live threads wait at __syncthreads" + warps +
         " (a barrier in divergent code, or lanes that never reach a warp-synchronous op)";
}

void run_block(Emulator& em, int n_threads, uint64_t block_linear) {
  const size_t per_thread = kStackBytes + em.page;
  em.fibers.assign(static_cast<size_t>(n_threads), Fiber{});
  em.warps.assign(static_cast<size_t>((n_threads + 31) / 32), WarpExchange{});
  for (int t = 0; t < n_threads; ++t) {
    Fiber& f = em.fibers[t];
    const dim3& b = em.launch.block;
    f.thread.thread_idx = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
    f.thread.linear = t;
    f.thread.lane = t % 32;
    f.thread.warp = t / 32;
    f.state = FiberState::Ready;
    char* stack = em.stacks + t * per_thread + em.page;
#if defined(FREQKV_EMU_ASAN)
    // A thread that returned left only the frames that were live at its last switch poisoned,
    // near the top; an abandoned one, anything. Unpoisoning all 512 KiB every time was most of
    // the emulator's time under AddressSanitizer.
    constexpr size_t kTopBytes = 32 * 1024;
    const size_t reset = em.stack_abandoned[t] ? kStackBytes : kTopBytes;
    __asan_unpoison_memory_region(stack + kStackBytes - reset, reset);
    em.stack_abandoned[t] = false;
#endif
    make_context(f.context, stack, kStackBytes, fiber_entry);
    ++em.warps[t / 32].live;
  }
  em.block_live = n_threads;
  em.block_arrived = 0;
  std::fill(em.dynamic_shared, em.dynamic_shared + em.dynamic_shared_bytes, 0xff);

  em.order.resize(static_cast<size_t>(n_threads));
  for (int t = 0; t < n_threads; ++t) em.order[t] = t;
  if (em.schedule == Schedule::Reverse || em.schedule == Schedule::Greedy) {
    std::reverse(em.order.begin(), em.order.end());
  }
  if (em.schedule == Schedule::Shuffled) {
    std::mt19937_64 generator(0x5eed0000u + block_linear);
    std::shuffle(em.order.begin(), em.order.end(), generator);
  }

  while (em.block_live > 0) {
    bool ran = false;
    for (size_t i = 0; i < em.order.size(); ++i) {
      Fiber& f = em.fibers[em.order[i]];
      if (f.state != FiberState::Ready) continue;
      em.running = &f;
      switch_context(em.scheduler, f.context);
      em.running = nullptr;
      ran = true;
      if (em.schedule == Schedule::Greedy) {
        // Stay on this warp while any of its lanes can run (its warp barriers release them).
        const int warp = f.thread.warp;
        bool again = true;
        while (again) {
          again = false;
          for (size_t j = i; j < em.order.size() && em.fibers[em.order[j]].thread.warp == warp;
               ++j) {
            Fiber& lane = em.fibers[em.order[j]];
            if (lane.state != FiberState::Ready) continue;
            em.running = &lane;
            switch_context(em.scheduler, lane.context);
            em.running = nullptr;
            again = true;
          }
        }
      }
    }
    if (em.fault) std::rethrow_exception(em.fault);
    if (!ran) {
      throw std::runtime_error(std::string("CUDA emulator: kernel ") + em.kernel_name +
                               ", block " + block_text(em.launch.block_idx) +
                               ": deadlock: " + deadlock_report(em));
    }
  }
}

}  // namespace

const ThreadState& current_thread() { return emulator().running->thread; }
const LaunchState& current_launch() { return emulator().launch; }
unsigned char* dynamic_shared_memory() { return emulator().dynamic_shared; }

void sync_block() {
  Emulator& em = emulator();
  Fiber* f = em.running;
  if (f == nullptr) throw std::logic_error("CUDA emulator: __syncthreads outside a kernel");
  f->state = FiberState::AtBlockBarrier;
  if (++em.block_arrived == em.block_live) {
    release_block_barrier(em);
    return;
  }
  switch_context(f->context, em.scheduler);
}

void sync_warp() {
  Emulator& em = emulator();
  Fiber* f = em.running;
  if (f == nullptr) throw std::logic_error("CUDA emulator: a warp operation outside a kernel");
  WarpExchange& warp = em.warps[f->thread.warp];
  f->state = FiberState::AtWarpBarrier;
  if (++warp.arrived == warp.live) {
    release_warp_barrier(em, f->thread.warp);
    return;
  }
  switch_context(f->context, em.scheduler);
}

const unsigned char* warp_exchange(const void* mine, size_t bytes,
                                   void (*combine)(unsigned char* table)) {
  Emulator& em = emulator();
  Fiber& f = *em.running;
  WarpExchange& warp = em.warps[f.thread.warp];
  unsigned char* table = warp.tables[f.exchange_buffer];
  f.exchange_buffer ^= 1;
  std::memcpy(table + f.thread.lane * kExchangeBytes, mine, bytes);
  // Threads run one at a time, so the lane that completes the count is the last to write.
  if (combine != nullptr && warp.arrived + 1 == warp.live) combine(table);
  sync_warp();
  return table;
}

void set_schedule(const char* name) {
  Emulator& em = emulator();
  em.schedule = parse_schedule(name, "emu::set_schedule");
  em.schedule_read = true;
}

bool set_function_attribute(const void* kernel, int attribute, int value) {
  constexpr int kMaxDynamicSharedMemorySize = 8;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  if (attribute != kMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > kMaxDynamicShared) {
    return false;
  }
  emulator().dynamic_shared_limit[kernel] = static_cast<size_t>(value);
  return true;
}

int check_launch_configuration(const void* kernel, dim3 grid, dim3 block,
                               size_t dynamic_shared_bytes) {
  Emulator& em = emulator();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > kMaxThreadsPerBlock) {
    return kCudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    return kCudaErrorInvalidConfiguration;
  }
  const auto limit = em.dynamic_shared_limit.find(kernel);
  const size_t allowed =
      limit == em.dynamic_shared_limit.end() ? kDefaultDynamicSharedLimit : limit->second;
  if (dynamic_shared_bytes > allowed) return kCudaErrorInvalidValue;
  return 0;
}

void run_grid(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
              const std::function<void()>& thread_body) {
  Emulator& em = emulator();
  if (em.running != nullptr || em.body != nullptr) {
    throw std::logic_error(std::string("CUDA emulator: ") + kernel_name +
                           " launched from inside a kernel");
  }
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;

  if (!em.schedule_read) {
    em.schedule = schedule_from_environment();
    em.schedule_read = true;
  }
  allocate_stacks(em);

  // Exactly the bytes asked for, so AddressSanitizer sees an access beyond them.
  void* shared = nullptr;
  if (posix_memalign(&shared, 128, std::max<size_t>(dynamic_shared_bytes, 1)) != 0) {
    throw std::runtime_error("CUDA emulator: cannot allocate dynamic shared memory");
  }
  const std::unique_ptr<void, void (*)(void*)> shared_owner(shared, std::free);
  em.dynamic_shared = static_cast<unsigned char*>(shared);
  em.dynamic_shared_bytes = dynamic_shared_bytes;

  em.kernel_name = kernel_name;
  em.body = &thread_body;
  em.fault = nullptr;
  em.launch.grid = grid;
  em.launch.block = block;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          em.launch.block_idx = dim3(x, y, z);
          run_block(em, static_cast<int>(threads),
                    (uint64_t{z} * grid.y + y) * grid.x + x);
        }
      }
    }
  } catch (const std::exception& e) {
    for (const Fiber& f : em.fibers) {
      if (f.state != FiberState::Done) em.stack_abandoned[f.thread.linear] = true;
    }
    em.body = nullptr;
    em.fault = nullptr;
    const std::string what = e.what();
    if (what.rfind("CUDA emulator:", 0) == 0) throw;
    throw std::runtime_error(std::string("CUDA emulator: kernel ") + kernel_name + ", block " +
                             block_text(em.launch.block_idx) + ": " + what);
  }
  em.body = nullptr;
}

}  // namespace emu

void emu_trap() { throw std::runtime_error("__trap() called"); }
