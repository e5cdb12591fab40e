// shim.h: just enough Metal Shading Language for g++ (C++20, Linux) to compile the kernel source that
// mx.fast.metal_kernel generates for the kernels of sae_mlx, plus the runtime that executes it over a launch grid.
//
// Provided (only what our kernels and the harness self-tests use):
//   * the address-space words `device`, `constant`, `thread`, `threadgroup` defined away (the harness refuses
//     kernels that declare threadgroup memory, so `threadgroup` never silently becomes per-thread memory);
//   * `uint`, `uint3`, `half` / `float16_t` (_Float16), `bfloat16_t` (a 2-byte struct: fp32 -> bf16 rounds to
//     nearest even, NaN stays NaN; bf16 -> fp32 is exact);
//   * `metal::simd_sum`, `metal::simd_prefix_exclusive_sum`, `metal::as_type`, `metal::threadgroup_barrier`,
//     `metal::mem_flags`;
//   * the launch runtime: threads of a threadgroup are run one after another, or, for kernels that use
//     barriers or SIMD-group functions, as cooperative fibers (ucontext) on one OS thread that switch at every
//     barrier / SIMD operation. Out-of-bounds accesses that hit a guard page and misuse of barriers / SIMD
//     operations abort the launch with an error instead of crashing or hanging.
// Not provided: atomics, threadgroup memory, metal:: math, vector types other than uint3, textures.
//
// Compilers: g++ and clang++ (Linux), Apple clang (macOS). macOS's <ucontext.h> stops with an #error unless
// _XOPEN_SOURCE is defined before the first system header (the ucontext_t layout depends on it), so it is defined
// here, first; _DARWIN_C_SOURCE keeps the rest of the BSD/Darwin API (sigaltstack, SA_ONSTACK) visible.
#pragma once

#if defined(__APPLE__)
#ifndef _XOPEN_SOURCE
#define _XOPEN_SOURCE 700
#endif
#ifndef _DARWIN_C_SOURCE
#define _DARWIN_C_SOURCE
#endif
#endif

#include <cstdarg>
#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <ucontext.h>

#define device
#define constant
#define thread
#define threadgroup

typedef unsigned int uint;

struct uint3 {
  uint x, y, z;
};

#if defined(__FLT16_MAX__)  // the compiler has _Float16 (g++ >= 12 on x86-64, clang on arm64, clang >= 15)
typedef _Float16 half;
#else
// clang++ < 15 on x86-64 has no _Float16, and its __fp16 needs compiler-rt's conversion routines at link time:
// a 2-byte struct with IEEE binary16 conversions (fp32 -> fp16 rounds to nearest even; fp16 -> fp32 is exact).
// Our kernels only convert half to and from float, which is all this provides.
struct half {
  uint16_t bits;

  half() = default;
  half(float f) : bits(from_float(f)) {}
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, float>>>
  half(T v) : bits(from_float(static_cast<float>(v))) {}

  operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    uint32_t u;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
      float f = float(mantissa) * 5.9604644775390625e-8f;
      std::memcpy(&u, &f, sizeof u);
      u |= sign;
    } else if (exponent == 31) {
      u = sign | 0x7f800000u | (mantissa << 13);
    } else {
      u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  static uint16_t from_float(float value) {
    uint32_t f;
    std::memcpy(&f, &value, sizeof f);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint32_t out;
    if (f >= (143u << 23)) {  // >= 65536 (rounds to inf), inf or NaN
      out = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (f < (113u << 23)) {  // below the smallest normal fp16: let an fp32 add do the rounding
      const uint32_t magic_bits = 126u << 23;  // 0.5: aligns the fp16 subnormal unit with fp32's last bit
      float magic, sum, x;
      std::memcpy(&magic, &magic_bits, sizeof magic);
      std::memcpy(&x, &f, sizeof x);
      sum = x + magic;
      std::memcpy(&out, &sum, sizeof out);
      out -= magic_bits;
    } else {
      const uint32_t odd = (f >> 13) & 1u;  // round to nearest, ties to even
      f += (uint32_t(15 - 127) << 23) + 0xfffu + odd;
      out = f >> 13;
    }
    return uint16_t(out | (sign >> 16));
  }
};
static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half>, "half must be 2 raw bytes");
#endif
typedef half float16_t;

struct bfloat16_t {
  uint16_t bits;

  bfloat16_t() = default;
  bfloat16_t(float f) : bits(from_float(f)) {}
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, float>>>
  bfloat16_t(T v) : bits(from_float(static_cast<float>(v))) {}

  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
      return uint16_t((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return uint16_t(u >> 16);
  }
};
static_assert(sizeof(bfloat16_t) == 2 && std::is_trivially_copyable_v<bfloat16_t>, "bfloat16_t must be 2 raw bytes");

namespace sae_shim {

struct Attrs {
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size, thread_position_in_grid,
      thread_position_in_threadgroup, threadgroup_position_in_grid, threadgroups_per_grid, threads_per_grid,
      threads_per_threadgroup;
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, quadgroup_index_in_threadgroup,
      quadgroups_per_threadgroup, simdgroup_index_in_threadgroup, simdgroups_per_threadgroup,
      thread_execution_width, thread_index_in_quadgroup, thread_index_in_simdgroup, thread_index_in_threadgroup,
      threads_per_simdgroup;
};
typedef void (*KernelFn)(const Attrs&);

constexpr int kSimdWidth = 32;  // Apple GPUs execute 32-wide SIMD groups
constexpr size_t kFiberStack = 128 * 1024;

enum State { kRunnable, kWaitSimd, kWaitGroup, kFinished };
enum Op { kOpNone, kOpSimdSum, kOpSimdPrefixExclusiveSum };

struct Fiber {
  ucontext_t ctx;
  int state;
  int op;
  unsigned char slot[8];
};

struct SimdSnapshot {
  unsigned char bytes[kSimdWidth][8];
  bool active[kSimdWidth];
};

struct Runtime {
  KernelFn fn = nullptr;
  bool cooperative = false;
  int current = -1;  // linear index (in its group) of the thread now running, -1 in the scheduler
  ucontext_t scheduler;
  size_t capacity = 0;
  Fiber* fibers = nullptr;  // raw arrays, grown by ensure_capacity (<memory> would double the compile time)
  Attrs* attrs = nullptr;
  SimdSnapshot* snaps = nullptr;
  char* stacks = nullptr;
  sigjmp_buf abort_jmp;
  void* fault_addr = nullptr;
  int fault_signal = 0;
  uint3 group = {0, 0, 0};
  char error[2048] = {0};
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
  Runtime& r = rt();
  char msg[1536];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (r.current >= 0) {
    std::snprintf(r.error, sizeof r.error, "threadgroup (%u, %u, %u), thread %d of the group: %s", r.group.x,
                  r.group.y, r.group.z, r.current, msg);
  } else {
    std::snprintf(r.error, sizeof r.error, "threadgroup (%u, %u, %u): %s", r.group.x, r.group.y, r.group.z, msg);
  }
  siglongjmp(r.abort_jmp, 2);
}

inline void ensure_capacity(size_t n) {
  Runtime& r = rt();
  if (n <= r.capacity) return;
  delete[] r.fibers;
  delete[] r.attrs;
  delete[] r.snaps;
  r.fibers = new Fiber[n];
  r.attrs = new Attrs[n];
  r.snaps = new SimdSnapshot[(n + kSimdWidth - 1) / kSimdWidth];
  std::free(r.stacks);
  r.stacks = static_cast<char*>(std::malloc(n * kFiberStack));
  if (!r.stacks) fail("cannot allocate %zu fiber stacks", n);
  r.capacity = n;
}

// Park the current fiber until the scheduler releases it (all lanes of its SIMD group at a SIMD operation, or all
// threads of the group at a threadgroup barrier).
inline void wait_for(int state, int op, const char* what) {
  Runtime& r = rt();
  if (!r.cooperative) {
    fail("%s called, but the harness runs this kernel thread by thread (it found no barrier or simd_ call)", what);
  }
  Fiber& f = r.fibers[r.current];
  f.state = state;
  f.op = op;
  swapcontext(&f.ctx, &r.scheduler);
}

// Hands x to the scheduler and parks until every active lane of the SIMD group has reached the same SIMD
// operation; returns the group's snapshot (each active lane's value) for the caller to reduce.
template <class T>
inline const SimdSnapshot& simd_exchange(T x, int op, const char* what) {
  static_assert(std::is_arithmetic_v<T> && sizeof(T) <= 8, "simd_ operations: scalar arithmetic types only");
  Runtime& r = rt();
  int me = r.current;
  if (!r.cooperative) wait_for(kWaitSimd, op, what);  // fails: thread-by-thread mode
  std::memcpy(r.fibers[me].slot, &x, sizeof(T));
  wait_for(kWaitSimd, op, what);
  return r.snaps[me / kSimdWidth];
}

template <class T>
inline T simd_lane_sum(const SimdSnapshot& s, int lanes) {
  T acc = T(0);
  for (int lane = 0; lane < lanes; ++lane) {
    if (s.active[lane]) {
      T v;
      std::memcpy(&v, s.bytes[lane], sizeof(T));
      acc += v;
    }
  }
  return acc;
}

template <class T>
inline T simd_reduce_sum(T x) {
  return simd_lane_sum<T>(simd_exchange(x, kOpSimdSum, "simd_sum"), kSimdWidth);
}

// The sum over the active lanes below this one (lane 0 gets 0), as Metal's simd_prefix_exclusive_sum.
template <class T>
inline T simd_prefix_exclusive(T x) {
  const int lane = rt().current % kSimdWidth;
  return simd_lane_sum<T>(simd_exchange(x, kOpSimdPrefixExclusiveSum, "simd_prefix_exclusive_sum"), lane);
}

inline void fiber_main(int index) {
  Runtime& r = rt();
  r.fn(r.attrs[index]);
  r.fibers[index].state = kFinished;
  // returning resumes uc_link, the scheduler
}

inline void run_group_cooperative(int count) {
  Runtime& r = rt();
  for (int i = 0; i < count; ++i) {
    Fiber& f = r.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks + size_t(i) * kFiberStack;
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 1, i);
    f.state = kRunnable;
    f.op = kOpNone;
  }
  const int nsimd = (count + kSimdWidth - 1) / kSimdWidth;
  for (;;) {
    for (int i = 0; i < count; ++i) {
      if (r.fibers[i].state == kRunnable) {
        r.current = i;
        swapcontext(&r.scheduler, &r.fibers[i].ctx);
        r.current = -1;
      }
    }
    int finished = 0, at_group = 0;
    for (int i = 0; i < count; ++i) {
      finished += r.fibers[i].state == kFinished;
      at_group += r.fibers[i].state == kWaitGroup;
    }
    if (finished == count) return;
    bool released = false;
    for (int s = 0; s < nsimd; ++s) {
      const int lo = s * kSimdWidth, hi = (lo + kSimdWidth < count) ? lo + kSimdWidth : count;
      int at_simd = 0, at_barrier = 0, op = -1;
      for (int i = lo; i < hi; ++i) {
        const Fiber& f = r.fibers[i];
        if (f.state == kWaitSimd) {
          if (op >= 0 && f.op != op) {
            fail("SIMD group %d: its lanes wait at different SIMD operations (divergent control flow)", s);
          }
          op = f.op;
          ++at_simd;
        }
        at_barrier += f.state == kWaitGroup;
      }
      if (at_simd == 0 || at_barrier > 0) continue;
      // every lane of this SIMD group that has not returned is at the same SIMD operation: release them
      SimdSnapshot& snap = r.snaps[s];
      for (int lane = 0; lane < kSimdWidth; ++lane) {
        const int i = lo + lane;
        snap.active[lane] = i < hi && r.fibers[i].state == kWaitSimd;
        if (snap.active[lane]) {
          std::memcpy(snap.bytes[lane], r.fibers[i].slot, 8);
          r.fibers[i].state = kRunnable;
        }
      }
      released = true;
    }
    if (released) continue;
    if (at_group > 0 && at_group == count - finished) {
      if (finished > 0) {
        fail("threadgroup_barrier reached by %d threads while %d threads of the group had returned "
             "(undefined behaviour in Metal: every thread of the group must reach each barrier)",
             at_group, finished);
      }
      for (int i = 0; i < count; ++i) r.fibers[i].state = kRunnable;
      continue;
    }
    fail("deadlock: %d of %d threads wait at a threadgroup barrier, the others at SIMD operations their SIMD "
         "group does not all reach (divergent control flow around a barrier or simd_ call)",
         at_group, count - finished);
  }
}

inline void launch(const unsigned* grid_in, const unsigned* tg_in, bool cooperative, KernelFn fn) {
  Runtime& r = rt();
  r.fn = fn;
  r.cooperative = cooperative;
  r.current = -1;
  unsigned grid[3], tg[3], ngroups[3];
  for (int i = 0; i < 3; ++i) {
    grid[i] = grid_in[i];
    tg[i] = tg_in[i] < grid[i] ? tg_in[i] : grid[i];  // MLX: group_dims = min(threadgroup, grid)
    ngroups[i] = (grid[i] + tg[i] - 1) / tg[i];
  }
  const size_t max_threads = size_t(tg[0]) * tg[1] * tg[2];
  ensure_capacity(max_threads);
  const uint3 grid3 = {grid[0], grid[1], grid[2]}, tg3 = {tg[0], tg[1], tg[2]};
  const uint3 ngroups3 = {ngroups[0], ngroups[1], ngroups[2]};
  for (unsigned gz = 0; gz < ngroups[2]; ++gz)
    for (unsigned gy = 0; gy < ngroups[1]; ++gy)
      for (unsigned gx = 0; gx < ngroups[0]; ++gx) {
        const unsigned g[3] = {gx, gy, gz};
        unsigned a[3];  // dispatchThreads: the groups at the far edges of the grid are partial
        for (int i = 0; i < 3; ++i) {
          const unsigned rest = grid[i] - g[i] * tg[i];
          a[i] = rest < tg[i] ? rest : tg[i];
        }
        r.group = {gx, gy, gz};
        const int count = int(a[0] * a[1] * a[2]);
        for (unsigned lz = 0; lz < a[2]; ++lz)
          for (unsigned ly = 0; ly < a[1]; ++ly)
            for (unsigned lx = 0; lx < a[0]; ++lx) {
              const uint t = lx + a[0] * (ly + a[1] * lz);
              Attrs& at = r.attrs[t];
              at.dispatch_threads_per_threadgroup = tg3;
              at.grid_origin = {0, 0, 0};
              at.grid_size = grid3;
              at.threads_per_grid = grid3;
              at.thread_position_in_grid = {gx * tg[0] + lx, gy * tg[1] + ly, gz * tg[2] + lz};
              at.thread_position_in_threadgroup = {lx, ly, lz};
              at.threadgroup_position_in_grid = {gx, gy, gz};
              at.threadgroups_per_grid = ngroups3;
              at.threads_per_threadgroup = {a[0], a[1], a[2]};
              at.thread_index_in_threadgroup = t;
              at.thread_index_in_simdgroup = t % kSimdWidth;
              at.simdgroup_index_in_threadgroup = t / kSimdWidth;
              at.simdgroups_per_threadgroup = (uint(count) + kSimdWidth - 1) / kSimdWidth;
              at.dispatch_simdgroups_per_threadgroup = uint((max_threads + kSimdWidth - 1) / kSimdWidth);
              at.threads_per_simdgroup = kSimdWidth;
              at.thread_execution_width = kSimdWidth;
              at.thread_index_in_quadgroup = t % 4;
              at.quadgroup_index_in_threadgroup = t / 4;
              at.quadgroups_per_threadgroup = (uint(count) + 3) / 4;
              at.dispatch_quadgroups_per_threadgroup = uint((max_threads + 3) / 4);
            }
        if (cooperative) {
          run_group_cooperative(count);
        } else {
          for (int t = 0; t < count; ++t) {
            r.current = t;
            fn(r.attrs[t]);
          }
          r.current = -1;
        }
      }
}

inline void on_fault(int sig, siginfo_t* info, void*) {
  Runtime& r = rt();
  r.fault_addr = info->si_addr;
  r.fault_signal = sig;
  siglongjmp(r.abort_jmp, 1);
}

// Runs the launch; returns 0 on success, 1 on a memory fault (address in fault_addr), 2 on another error.
inline int run(const unsigned* grid, const unsigned* tg, int cooperative, KernelFn fn) {
  Runtime& r = rt();
  r.error[0] = 0;
  r.fault_addr = nullptr;
  r.fault_signal = 0;
  r.group = {0, 0, 0};
  r.current = -1;
  static char altstack[1 << 16];
  stack_t ss = {}, old_ss = {};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, &old_ss);
  struct sigaction sa = {}, old_segv = {}, old_bus = {};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
  volatile int rc = 0;
  const int jumped = sigsetjmp(r.abort_jmp, 1);
  if (jumped == 0) {
    launch(grid, tg, cooperative != 0, fn);
  } else {
    rc = jumped;
    if (jumped == 1) {
      std::snprintf(r.error, sizeof r.error, "threadgroup (%u, %u, %u), thread %d of the group: memory fault "
                    "(signal %d) at %p", r.group.x, r.group.y, r.group.z, r.current, r.fault_signal, r.fault_addr);
    }
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaltstack(&old_ss, nullptr);
  r.current = -1;
  return rc;
}

}  // namespace sae_shim

namespace metal {

// MSL's bit cast between types of one size.
template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: types of different sizes");
  To out;
  std::memcpy(&out, &x, sizeof out);
  return out;
}

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) {
  sae_shim::wait_for(sae_shim::kWaitGroup, sae_shim::kOpNone, "threadgroup_barrier");
}

template <class T>
inline T simd_sum(T x) {
  return sae_shim::simd_reduce_sum(x);
}

template <class T>
inline T simd_prefix_exclusive_sum(T x) {
  return sae_shim::simd_prefix_exclusive(x);
}

}  // namespace metal
