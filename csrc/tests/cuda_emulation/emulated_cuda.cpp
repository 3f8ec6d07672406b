// The scheduler behind emulated_cuda.h: blocks one after another, each block's threads as fibers.
#include "emulated_cuda.h"

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace cuda_emulation {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStackBytes = 64 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;  // without opting in to more, as every kernel here

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kAtExchange, kReturned };

struct Fiber {
  ucontext_t context;
  dim3 index;
  int lane = 0;
  int warp = 0;
  State state = State::kRunnable;
};

struct Launch {
  dim3 grid, block, block_index;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // the scheduler's stack, for AddressSanitizer's stack switches
  size_t scheduler_stack_bytes = 0;
  std::vector<unsigned char> shared;
  std::vector<uint64_t> slots;  // 32 per warp: the shuffles' exchange
  std::string error;            // set by a fiber: the launch fails
};

thread_local Launch* active = nullptr;
thread_local std::vector<char> stacks;
thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_message;
Schedule current_schedule = Schedule::kLockstep;

Launch& current_launch(const char* what) {
  if (active == nullptr || active->current == nullptr) {
    // Device code called from the host: not a launch, nothing to return the error through.
    fprintf(stderr, "cuda emulation: %s called outside a kernel launch\n", what);
    std::abort();
  }
  return *active;
}

// AddressSanitizer's notes around each stack switch (a build with -fsanitize=address): the stack about to
// run, and on arrival the one left. No-ops otherwise.
void switching_to(void** fake_stack, const void* stack, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack, stack, bytes);
#else
  (void)fake_stack, (void)stack, (void)bytes;
#endif
}

void switched(void* fake_stack, const void** left, size_t* left_bytes) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, left, left_bytes);
#else
  (void)fake_stack, (void)left, (void)left_bytes;
#endif
}

// Back to the scheduler in `state`; returns when the scheduler resumes this fiber.
void wait(State state) {
  Launch& launch = *active;
  Fiber& self = *launch.current;
  self.state = state;
  void* fake_stack = nullptr;
  switching_to(&fake_stack, launch.scheduler_stack, launch.scheduler_stack_bytes);
  swapcontext(&self.context, &launch.scheduler);
  switched(fake_stack, &launch.scheduler_stack, &launch.scheduler_stack_bytes);
}

// Ends the launch from inside a fiber: the scheduler never resumes it.
[[noreturn]] void fail(const std::string& message) {
  Launch& launch = *active;
  launch.error = message;
  Fiber& self = *launch.current;
  self.state = State::kReturned;
  switching_to(nullptr, launch.scheduler_stack, launch.scheduler_stack_bytes);  // this stack is done with
  swapcontext(&self.context, &launch.scheduler);
  std::abort();  // unreachable: a failed launch resumes no fiber
}

void fiber_main() {
  Launch& launch = *active;
  switched(nullptr, &launch.scheduler_stack, &launch.scheduler_stack_bytes);
  (*launch.body)();
  launch.current->state = State::kReturned;
  switching_to(nullptr, launch.scheduler_stack, launch.scheduler_stack_bytes);  // uc_link: back to the scheduler
}

std::string where(const Launch& launch) {
  const dim3& b = launch.block_index;
  return " (block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " + std::to_string(b.z) + "))";
}

enum class Opened { kNo, kYes, kFailed };

// Opens warp w's barrier if each of its lanes that has not returned waits at one (kFailed, with launch.error
// set, where the warp is split between barriers or a full-mask exchange misses lanes).
Opened open_warp(Launch& launch, int w) {
  const size_t first = static_cast<size_t>(w) * kWarpSize;
  const size_t last = std::min(first + kWarpSize, launch.fibers.size());
  int runnable = 0, at_block = 0, at_warp = 0, at_exchange = 0, returned = 0;
  for (size_t i = first; i < last; ++i) {
    const State s = launch.fibers[i].state;
    runnable += s == State::kRunnable;
    at_block += s == State::kAtBlockBarrier;
    at_warp += s == State::kAtWarpBarrier;
    at_exchange += s == State::kAtExchange;
    returned += s == State::kReturned;
  }
  if (runnable > 0 || at_warp + at_exchange == 0) return Opened::kNo;
  const std::string warp = "warp " + std::to_string(w);
  if (at_block > 0 || (at_warp > 0 && at_exchange > 0)) {
    launch.error = warp + " is split between barriers: " + std::to_string(at_block) + " lanes at __syncthreads, " +
                   std::to_string(at_warp) + " at __syncwarp, " + std::to_string(at_exchange) +
                   " at a shuffle or ballot" + where(launch);
    return Opened::kFailed;
  }
  if (at_exchange > 0 && last - first < static_cast<size_t>(kWarpSize)) {
    launch.error = "a full-mask shuffle or ballot in " + warp + " of only " + std::to_string(last - first) +
                   " lanes (the block is not a whole number of warps)" + where(launch);
    return Opened::kFailed;
  }
  if (at_exchange > 0 && returned > 0) {
    launch.error = "a full-mask shuffle or ballot in " + warp + " after " + std::to_string(returned) +
                   " of its lanes returned (undefined in CUDA)" + where(launch);
    return Opened::kFailed;
  }
  for (size_t i = first; i < last; ++i)
    if (launch.fibers[i].state != State::kReturned) launch.fibers[i].state = State::kRunnable;
  return Opened::kYes;
}

// Opens __syncthreads if every thread that has not returned waits at it.
bool open_block(Launch& launch) {
  for (const Fiber& f : launch.fibers)
    if (f.state != State::kReturned && f.state != State::kAtBlockBarrier) return false;
  for (Fiber& f : launch.fibers)
    if (f.state != State::kReturned) f.state = State::kRunnable;
  return true;
}

// Runs fiber i until it waits or returns; false when it failed the launch.
bool run_fiber(Launch& launch, size_t i) {
  Fiber& f = launch.fibers[i];
  launch.current = &f;
  void* fake_stack = nullptr;
  switching_to(&fake_stack, f.context.uc_stack.ss_sp, f.context.uc_stack.ss_size);
  swapcontext(&launch.scheduler, &f.context);
  switched(fake_stack, nullptr, nullptr);
  launch.current = nullptr;
  return launch.error.empty();
}

bool any_live(const Launch& launch) {
  for (const Fiber& f : launch.fibers)
    if (f.state != State::kReturned) return true;
  return false;
}

// Lockstep: every runnable thread runs to its next barrier before any barrier opens, so all warps stay in the
// same phase. Running ahead: each warp runs as far as it can (its own barriers open as soon as its lanes
// arrive) before the next warp starts, which is where a missing __syncthreads between warps shows.
bool run_block(Launch& launch, Schedule schedule) {
  const size_t threads = launch.fibers.size();
  const int warps = static_cast<int>((threads + kWarpSize - 1) / kWarpSize);
  const bool decreasing = schedule == Schedule::kRunAheadDecreasing;
  std::fill(launch.shared.begin(), launch.shared.end(), 0xFF);
  for (size_t i = 0; i < threads; ++i) {
    Fiber& f = launch.fibers[i];
    f.state = State::kRunnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks.data() + i * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &launch.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  while (true) {
    bool opened = false;
    if (schedule == Schedule::kLockstep) {
      for (size_t i = 0; i < threads; ++i)
        if (launch.fibers[i].state == State::kRunnable && !run_fiber(launch, i)) return false;
    } else {
      for (int n = 0; n < warps; ++n) {
        const int w = decreasing ? warps - 1 - n : n;
        const size_t first = static_cast<size_t>(w) * kWarpSize, last = std::min(first + kWarpSize, threads);
        for (Opened warp_opened = Opened::kYes; warp_opened == Opened::kYes; warp_opened = open_warp(launch, w)) {
          for (size_t k = 0; k < last - first; ++k) {
            const size_t i = decreasing ? last - 1 - k : first + k;
            if (launch.fibers[i].state == State::kRunnable && !run_fiber(launch, i)) return false;
          }
        }
        if (!launch.error.empty()) return false;
      }
    }
    if (!any_live(launch)) return true;
    if (open_block(launch)) continue;
    for (int w = 0; w < warps; ++w) {
      const Opened warp_opened = open_warp(launch, w);
      if (warp_opened == Opened::kFailed) return false;
      opened |= warp_opened == Opened::kYes;
    }
    if (!opened) {
      launch.error = "deadlock: no barrier can open" + where(launch);
      return false;
    }
  }
}

cudaError_t check_shape(dim3 grid, dim3 block, size_t dynamic_shared_bytes, std::string& message) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64) {
    message = "block of " + std::to_string(threads) + " threads (a GPU takes 1 to 1024)";
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    message = "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
              ") out of a GPU's range";
    return cudaErrorInvalidConfiguration;
  }
  if (dynamic_shared_bytes > kMaxDynamicSharedBytes) {
    message = std::to_string(dynamic_shared_bytes) + " bytes of dynamic shared memory (48 KiB without opting in)";
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

void set_error(cudaError_t error, const std::string& message) {
  if (last_error == cudaSuccess) {  // sticky until read, as the first error of a CUDA context
    last_error = error;
    last_message = message;
  }
}

}  // namespace

void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t, const std::function<void()>& body) {
  std::string message;
  const cudaError_t shape = check_shape(grid, block, dynamic_shared_bytes, message);
  if (shape != cudaSuccess) return set_error(shape, message);
  if (active != nullptr) return set_error(cudaErrorLaunchFailure, "a launch from inside a kernel");
  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.body = &body;
  const size_t threads = size_t{block.x} * block.y * block.z;
  launch.fibers.resize(threads);
  for (size_t i = 0; i < threads; ++i) {
    Fiber& f = launch.fibers[i];
    f.index = dim3(i % block.x, (i / block.x) % block.y, i / (size_t{block.x} * block.y));
    f.lane = static_cast<int>(i % kWarpSize);
    f.warp = static_cast<int>(i / kWarpSize);
  }
  launch.shared.resize(dynamic_shared_bytes);
  launch.slots.resize((threads + kWarpSize - 1) / kWarpSize * kWarpSize);
  if (stacks.size() < threads * kStackBytes) stacks.resize(threads * kStackBytes);
  active = &launch;
  for (unsigned z = 0; z < grid.z && launch.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && launch.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && launch.error.empty(); ++x) {
        launch.block_index = dim3(x, y, z);
        run_block(launch, current_schedule);
      }
  active = nullptr;
  if (!launch.error.empty()) set_error(cudaErrorLaunchFailure, launch.error);
}

const dim3& thread_index() { return current_launch("threadIdx").current->index; }
const dim3& block_index() { return current_launch("blockIdx").block_index; }
const dim3& block_dimensions() { return current_launch("blockDim").block; }
const dim3& grid_dimensions() { return current_launch("gridDim").grid; }
void* dynamic_shared() { return current_launch("extern __shared__").shared.data(); }
int lane_id() { return current_launch("a lane id").current->lane; }

void sync_block() {
  current_launch("__syncthreads");
  wait(State::kAtBlockBarrier);
}

void sync_warp(unsigned mask) {
  current_launch("__syncwarp");
  if (mask != kFullMask) fail("__syncwarp with a partial mask (the emulation runs full-mask warp barriers only)");
  wait(State::kAtWarpBarrier);
}

void warp_exchange(unsigned mask, const void* value, size_t bytes, uint64_t* all) {
  Launch& launch = current_launch("a warp shuffle");
  if (mask != kFullMask) fail("a warp shuffle with a partial mask (the emulation runs full-mask shuffles only)");
  const Fiber& self = *launch.current;
  uint64_t* slots = launch.slots.data() + static_cast<size_t>(self.warp) * kWarpSize;
  slots[self.lane] = 0;
  std::memcpy(&slots[self.lane], value, bytes);
  wait(State::kAtExchange);  // every lane has written its slot
  std::memcpy(all, slots, kWarpSize * sizeof(uint64_t));
  wait(State::kAtExchange);  // every lane has read: the slots may be written again
}

void set_schedule(Schedule schedule) { current_schedule = schedule; }

}  // namespace cuda_emulation

cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_emulation::last_error;
  cuda_emulation::last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  if (error == cudaSuccess) return "no error";
  thread_local std::string text;
  text = "emulated CUDA error " + std::to_string(static_cast<int>(error)) + ": " + cuda_emulation::last_message;
  return text.c_str();
}

cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}
