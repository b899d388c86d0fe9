// The CPU kernels of the frame loop, as XLA:CPU FFI custom calls (qwen3_tts_jax/cpu_kernels.py):
//   qwen3_tts_jax_rows_matmul  y = x @ W for a few rows of x, W stored as column panels
//   qwen3_tts_jax_rows_matmul_stacked  the same with one weight of a stack, picked by an index
//   qwen3_tts_jax_rows_matmul_int8  the same with int8 panels and a scale per column
//   qwen3_tts_jax_rows_matmul_int8_dot  int8 panels times activations quantized to int8, on the
//                              CPU's integer dot instructions (AVX-512 VNNI, AVX2, or plain C++)
//   qwen3_tts_jax_rows_matmul_int8_dot_stacked  the same with one weight of a stack
//   qwen3_tts_jax_rows_matmul_int4_dot  the same with 4-bit weights, a scale per column and group
//                              of 32 k
//   qwen3_tts_jax_int8_paths   (plain C) which of those the CPU running it has
//   qwen3_tts_jax_attend       one decode step's attention over the filled slots of a KV cache
//   qwen3_tts_jax_conv_bf16    the codec decoder's causal convolutions on AVX-512 BF16 dot products
//   qwen3_tts_jax_bf16_dot     (plain C) whether the CPU running it has AVX512_BF16
//
// Products. Why: in the frame loop every product is a few rows (the batch) times a weight matrix that is
// read from memory once per call. XLA:CPU's library products (Eigen, YNNPACK) repack that weight
// on every call and reach a third of the memory bandwidth at 8 rows. Here the weight is packed
// once, at load time (qwen3_tts_jax/cpu_kernels.py), into panels of PANEL output columns,
// W_panels[n / PANEL, k, n % PANEL], so that a call streams each panel once from memory and keeps
// a register tile of rows x PANEL accumulators.
//
// Arithmetic: float32 products and float32 sums, k in increasing order (no reassociation across
// k); int8 weights are widened to float32 exactly and the column's scale multiplies the finished
// sum. Rows and panels are independent, so the result does not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define QWEN3_TTS_X86 1
#include <immintrin.h>  // functions with a target attribute may use any of it
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t PANEL = 16;   // output columns per panel: two 8-float vectors
constexpr int64_t MAX_ROWS = 6; // rows per register tile: 12 accumulators + 2 weights + 1 broadcast

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// One k of a panel (PANEL weights) as two float vectors: float32 panels as they are, int8 panels
// (quantize.py) widened in registers (exact: |value| <= 127); their scale is applied at the end.
inline void widen(const float* p, v8& lo, v8& hi) {
  lo = load8(p);
  hi = load8(p + 8);
}

inline void widen(const int8_t* p, v8& lo, v8& hi) {
#ifdef __AVX2__  // GCC's generic vector conversions of int8 lanes come out scalar
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  lo = (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  hi = (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
#else
  for (int j = 0; j < 8; ++j) {
    lo[j] = static_cast<float>(p[j]);
    hi[j] = static_cast<float>(p[j + 8]);
  }
#endif
}

// rows x PANEL outputs of one panel: y[r, 0:PANEL] = sum_k x[r, k] * panel[k, 0:PANEL], times
// scale[0:PANEL] when given (int8 panels). `ahead` (the next panel, or null) is prefetched a cache
// line per step, so that its memory stream overlaps the arithmetic of this panel's later row
// tiles (read from cache).
template <int ROWS, typename W>
void tile(const float* x, int64_t K, const W* panel, const float* scale, float* y, int64_t N,
          const W* ahead) {
  constexpr int64_t K_PER_LINE = 64 / (PANEL * sizeof(W));  // k steps per 64-byte cache line
  // int8 panels: this panel's own stream is prefetched 4 KB ahead (a single-thread A/B of one
  // (1024, 6144) product at 1 row: 0.51-0.53 ms against 0.61-0.62 without)
  constexpr int64_t INT8_AHEAD = std::is_same<W, float>::value ? 0 : 256;
  v8 lo[ROWS], hi[ROWS];
  for (int r = 0; r < ROWS; ++r) lo[r] = hi[r] = v8{};
  for (int64_t k = 0; k < K; ++k) {
    if (k % K_PER_LINE == 0) {
      if (ahead) __builtin_prefetch(ahead + k * PANEL, 0, 2);
      if (INT8_AHEAD) __builtin_prefetch(panel + (k + INT8_AHEAD) * PANEL, 0, 0);
    }
    v8 w_lo, w_hi;
    widen(panel + k * PANEL, w_lo, w_hi);
    for (int r = 0; r < ROWS; ++r) {
      const float xv = x[r * K + k];
      const v8 xb = {xv, xv, xv, xv, xv, xv, xv, xv};
      lo[r] += xb * w_lo;
      hi[r] += xb * w_hi;
    }
  }
  if (scale) {
    const v8 s_lo = load8(scale), s_hi = load8(scale + 8);
    for (int r = 0; r < ROWS; ++r) {
      lo[r] *= s_lo;
      hi[r] *= s_hi;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    store8(y + r * N, lo[r]);
    store8(y + r * N + 8, hi[r]);
  }
}

template <typename W>
void rows_tile(int64_t rows, const float* x, int64_t K, const W* panel, const float* scale,
               float* y, int64_t N, const W* ahead) {
  switch (rows) {
    case 1: return tile<1>(x, K, panel, scale, y, N, ahead);
    case 2: return tile<2>(x, K, panel, scale, y, N, ahead);
    case 3: return tile<3>(x, K, panel, scale, y, N, ahead);
    case 4: return tile<4>(x, K, panel, scale, y, N, ahead);
    case 5: return tile<5>(x, K, panel, scale, y, N, ahead);
    default: return tile<6>(x, K, panel, scale, y, N, ahead);
  }
}

// Panels [first, last) for all M rows (`scale`: N floats for int8 panels, else null).
template <typename W>
void panels(const float* x, int64_t M, int64_t K, const W* w, const float* scale, float* y,
            int64_t N, int64_t first, int64_t last) {
  // Row tiles of near-equal size (8 rows: 4 + 4, not 6 + 2: a 2-row tile has too few
  // accumulators to hide the multiply-add latency).
  const int64_t tiles = (M + MAX_ROWS - 1) / MAX_ROWS;
  // An int8 panel read by three or more row tiles (13+ rows) is widened once into this thread's
  // float32 copy (K x PANEL, in L2), which the tiles then read: widening it in every tile costs
  // more than the bytes save there (one (1024, 6144) product at 32 rows: 3.4 ms, float32
  // panels 2.9, widened once 2.8); at two tiles widening in each is faster (8 rows: 0.9 ms
  // against 1.65 widened once, float32 1.3).
  thread_local std::vector<float> widened;
  for (int64_t p = first; p < last; ++p) {
    const W* panel = w + p * K * PANEL;
    const float* panel_scale = scale ? scale + p * PANEL : nullptr;
    if (!std::is_same<W, float>::value && tiles > 2) {
      widened.resize(K * PANEL);
      for (int64_t k = 0; k < K; ++k) {
        v8 lo, hi;
        widen(panel + k * PANEL, lo, hi);
        store8(widened.data() + k * PANEL, lo);
        store8(widened.data() + k * PANEL + 8, hi);
      }
      for (int64_t t = 0, r = 0; t < tiles; ++t) {
        const int64_t rows = (M - r) / (tiles - t);
        rows_tile(rows, x + r * K, K, widened.data(), panel_scale, y + r * N + p * PANEL, N,
                  static_cast<const float*>(nullptr));
        r += rows;
      }
      continue;
    }
    // One tile (up to 6 rows) streams the panel from memory and is bound by it: prefetching the
    // next panel as well only competes (measured 13 % slower at 1 row, 12 % faster at 8).
    const W* ahead = tiles > 1 && p + 1 < last ? panel + K * PANEL : nullptr;
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      const int64_t rows = (M - r) / (tiles - t);
      rows_tile(rows, x + r * K, K, panel, panel_scale, y + r * N + p * PANEL, N, ahead);
      r += rows;
    }
  }
}

// body(first, last) over [0, units) in chunks, shared between the calling thread and helpers on
// XLA's intra-op pool: chunks are handed out by an atomic counter, and the caller waits only for
// chunks that a running thread has claimed, so a helper the pool starts late (or never) cannot
// stall it; helpers that start after the work is gone return at once (the state outlives the
// call through the shared_ptr and they never touch the call's buffers).
struct Shared {
  std::function<void(int64_t, int64_t)> body;
  int64_t units, chunk, chunks;
  std::atomic<int64_t> next{0};
  int64_t done = 0;  // guarded by `mutex`
  std::mutex mutex;
  std::condition_variable finished;

  void run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min((c + 1) * chunk, units));
      std::lock_guard<std::mutex> lock(mutex);
      if (++done == chunks) finished.notify_all();
    }
  }

  void wait() {  // sleeps (never spins: the machine may have fewer cores than busy threads)
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return done == chunks; });
  }
};

// Work under this many multiply-adds runs on the calling thread: waking a helper costs tens of
// microseconds, more than the arithmetic of a small model's products.
constexpr int64_t SERIAL_WORK = 1 << 18;

void parallel_for(ffi::ThreadPool& pool, int64_t units, int64_t work_per_unit, int64_t min_chunk,
                  std::function<void(int64_t, int64_t)> body) {
  if (units * work_per_unit < SERIAL_WORK || pool.num_threads() <= 1) {
    body(0, units);
    return;
  }
  auto work = std::make_shared<Shared>();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // a few chunks per thread, each at least `min_chunk` units (scheduling costs microseconds)
  work->body = std::move(body);
  work->units = units;
  work->chunk = std::max<int64_t>(min_chunk, units / (4 * threads));
  work->chunks = (units + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min(threads, work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  work->wait();
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != PANEL || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("rows_matmul: x must be (M, K) and w (N / 16, K, 16)");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0] * PANEL;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, wd[0], M * K * PANEL, 4, [=](int64_t first, int64_t last) {
    panels(xp, M, K, wp, static_cast<const float*>(nullptr), yp, N, first, last);
  });
  return ffi::Error::Success();
}

// The same product with one weight of a stack, w (H, N / 16, K, 16), picked by a scalar index
// that the program computes (a loop's step): the weight is read in place. XLA would copy the
// picked weight out of the stack before its product, every step (`code_predictor.predict`'s
// heads: 8 MB a step at 0.6B). An index outside [0, H) is clamped, as XLA's dynamic slice does.
ffi::Error RowsMatmulStacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> index,
                             ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[0] < 1 || wd[3] != PANEL || wd[2] != xd[1] ||
      index.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "rows_matmul_stacked: x must be (M, K), w (H, N / 16, K, 16) and index one int32");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1] * PANEL;
  const int64_t h = std::clamp<int64_t>(index.typed_data()[0], 0, wd[0] - 1);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data() + h * N * K;
  float* yp = y->typed_data();
  parallel_for(pool, wd[1], M * K * PANEL, 4, [=](int64_t first, int64_t last) {
    panels(xp, M, K, wp, static_cast<const float*>(nullptr), yp, N, first, last);
  });
  return ffi::Error::Success();
}

// The same product with int8 panels and a float32 scale per output column.
ffi::Error RowsMatmulInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != PANEL || wd[1] != xd[1] || sd.size() != 1 ||
      sd[0] != wd[0] * PANEL) {
    return ffi::Error::InvalidArgument(
        "rows_matmul_int8: x must be (M, K), w (N / 16, K, 16) and scale (N,)");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0] * PANEL;
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, wd[0], M * K * PANEL, 4, [=](int64_t first, int64_t last) {
    panels(xp, M, K, wp, sp, yp, N, first, last);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// int8 x int8 products on integer dot instructions (`Options.int8_activations="int8"`), and the
// same with 4-bit weights (`quantize="int4"`): one templated kernel, `INT4` picking the format.
//
// int8 layout (cpu_kernels.py `PackedInt8DotWeight`): panels of PANEL output columns, each k-group
// of 4 consecutive k as one 32-bit lane per column: W[n / PANEL, g, n % PANEL, k % 4] for k = 4 g +
// k % 4, K padded to a multiple of 4 with zero weights, stored as uint8 = int8 value + 128 (1..255,
// padding 128). One k-group of a panel is 64 bytes: one cache line, one 512-bit vector.
//
// int4 layout (cpu_kernels.py `PackedInt4Weight`): the same lanes with two k-groups per 64-byte
// line, as nibbles value + 8 (0..15, padding 8): line h holds k-group 2 h in the low nibbles and
// 2 h + 1 in the high ones; K padded to a multiple of INT4_GROUP. The float32 weight scales are
// per column and per group of INT4_GROUP consecutive k, stored per panel: S[n / PANEL, k / 32,
// n % PANEL]. The activations' block is the weights' group.
//
// Activations: each row is quantized on the fly in blocks of `block` consecutive k (a multiple of
// 4; 0: the whole row), symmetric: scale = max |x| / 127 over the block, q = rint(clamp(x * (127 /
// max |x|), -127, 127)) (0 and scale 0 for an all-zero block).
//
// Arithmetic, the same on every path (exact integers, then float32 in a fixed order, so that the
// paths agree bit for bit and with a numpy model of it, tests/test_quantize.py):
//   acc[b, n] = sum_{k in block b} q[k] * w[k, n]                       (int32, exact)
//   int8: y[n] = (sum_b float(acc[b, n]) * xscale[b]) * wscale[n]
//   int4: y[n] = sum_b float(acc[b, n]) * (xscale[b] * wscale[b, n])
//                  (b in increasing order, each * and + rounded)
// `vpdpbusd` multiplies unsigned by signed bytes, so the weights are the unsigned side (w + 128,
// or the nibble w + 8) and each block's sum starts at -128 (-8) * sum_k q[k] (exact). The int8
// AVX2 path (`vpmaddubsw`, whose 16-bit pair sums saturate at 255 * 127 * 2) takes the weights
// back to signed and multiplies |q| by w with q's sign (`vpsignb`): pairs of at most 2 * 127 *
// 127, no saturation; the int4 one multiplies the unsigned nibbles (pairs of at most 2 * 15 *
// 127) and starts from -8 * sum_k q[k] like VNNI.

enum Int8Path : int32_t { PATH_AUTO = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_AVX512_VNNI = 3 };

constexpr int64_t INT4_GROUP = 32;  // k per weight scale of the int4 format (cpu_kernels.py)

int32_t int8_paths() {  // bit p set: path p runs on this CPU (CPUID, at run time)
  int32_t paths = 1 << PATH_SCALAR;
#ifdef QWEN3_TTS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) paths |= 1 << PATH_AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    paths |= 1 << PATH_AVX512_VNNI;
#endif
  return paths;
}

// One call's activations, quantized: M rows of Kp int8 (zero past K), and per (row, block) the
// float scale and sum(q) (the unsigned-weight paths start a block's sum at -bias * sum(q)).
struct QuantizedRows {
  int64_t M = 0, Kp = 0, block = 0, blocks = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;

  void quantize(const float* x, int64_t rows, int64_t K, int64_t Kpad, int64_t blk) {
    M = rows;
    Kp = Kpad;
    block = blk > 0 ? blk : Kpad;
    blocks = (Kp + block - 1) / block;
    q.assign(M * Kp, 0);
    scale.assign(M * blocks, 0.0f);
    sum.assign(M * blocks, 0);
    for (int64_t r = 0; r < M; ++r) {
      const float* xr = x + r * K;
      int8_t* qr = q.data() + r * Kp;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t lo = b * block, hi = std::min(lo + block, K);
        float amax = 0.0f;
        bool finite = true;
        for (int64_t k = lo; k < hi; ++k) {
          amax = std::max(amax, std::fabs(xr[k]));
          finite &= std::isfinite(xr[k]);
        }
        if (!finite) {  // the block's outputs become NaN, as a float product's would
          scale[r * blocks + b] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        if (amax == 0.0f) continue;  // q = 0, scale 0
        const float inv = 127.0f / amax;
        int32_t total = 0;
        for (int64_t k = lo; k < hi; ++k) {
          const float v = std::nearbyint(std::min(127.0f, std::max(-127.0f, xr[k] * inv)));
          qr[k] = static_cast<int8_t>(v);
          total += qr[k];
        }
        scale[r * blocks + b] = amax / 127.0f;
        sum[r * blocks + b] = total;
      }
    }
  }
};

// A product rounded on its own: the compiler may not fuse it into the add that follows (an FMA
// rounds once), so that every path rounds as the numpy model does.
template <typename T>
inline T rounded(T v) {
#ifdef QWEN3_TTS_X86
  __asm__("" : "+v"(v));
#else
  volatile T copy = v;
  v = copy;
#endif
  return v;
}

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The two formats' differences. k-group g of a panel: byte 4 j + i holds k = 4 g + i of column j.
template <bool INT4>
struct DotFormat {
  static constexpr int32_t BIAS = INT4 ? 8 : 128;  // stored = value + BIAS
  static constexpr int64_t GROUPS_PER_LINE = INT4 ? 2 : 1;
  static int32_t value(const uint8_t* panel, int64_t g, int64_t byte) {
    if (!INT4) return static_cast<int32_t>(panel[g * 64 + byte]) - BIAS;
    const uint8_t b = panel[(g / 2) * 64 + byte];
    return static_cast<int32_t>(g % 2 ? b >> 4 : b & 0x0F) - BIAS;
  }
};

// Plain C++: any CPU; one row at a time. `wscale`: the panel's PANEL column scales (int8) or its
// (blocks, PANEL) group scales (int4).
template <bool INT4>
void dot_rows_scalar(const QuantizedRows& xq, int64_t r0, int64_t rows, const uint8_t* panel,
                     const float* wscale, float* y, int64_t N) {
  const int64_t G = xq.Kp / 4, GB = xq.block / 4;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    const int8_t* qr = xq.q.data() + r * xq.Kp;
    float out[PANEL] = {};
    for (int64_t g0 = 0, b = 0; g0 < G; g0 += GB, ++b) {
      int32_t acc[PANEL] = {};
      for (int64_t g = g0; g < std::min(g0 + GB, G); ++g)
        for (int64_t j = 0; j < PANEL; ++j)
          for (int64_t i = 0; i < 4; ++i)
            acc[j] += DotFormat<INT4>::value(panel, g, j * 4 + i) * qr[g * 4 + i];
      const float s = xq.scale[r * xq.blocks + b];
      for (int64_t j = 0; j < PANEL; ++j) {
        const float term = INT4 ? rounded(static_cast<float>(acc[j]) *
                                          rounded(s * wscale[b * PANEL + j]))
                                : rounded(static_cast<float>(acc[j]) * s);
        out[j] = out[j] + term;
      }
    }
    for (int64_t j = 0; j < PANEL; ++j) y[r * N + j] = INT4 ? out[j] : out[j] * wscale[j];
  }
}

#ifdef QWEN3_TTS_X86
constexpr int64_t DOT_AHEAD = 64;  // cache lines a panel's own stream is prefetched ahead

// AVX-512 VNNI: up to 8 rows x 16 columns; one 512-bit weight vector per k-group (int4: a line
// of two, split into nibbles in registers), each row's 4 activation bytes broadcast into it.
template <int ROWS, bool INT4>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void dot_tile_vnni(
    const QuantizedRows& xq, int64_t r0, const uint8_t* panel, const float* wscale, float* y,
    int64_t N) {
  using F = DotFormat<INT4>;
  const int64_t G = xq.Kp / 4, GB = xq.block / 4;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 out[ROWS];
  for (int r = 0; r < ROWS; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g0 = 0, b = 0; g0 < G; g0 += GB, ++b) {
    const int64_t g1 = std::min(g0 + GB, G);
    __m512i acc[ROWS];
    for (int r = 0; r < ROWS; ++r)
      acc[r] = _mm512_set1_epi32(-F::BIAS * xq.sum[(r0 + r) * xq.blocks + b]);
    for (int64_t g = g0; g < g1; g += F::GROUPS_PER_LINE) {
      const uint8_t* line = panel + (g / F::GROUPS_PER_LINE) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(line + DOT_AHEAD * 64), _MM_HINT_NTA);
      const __m512i v = _mm512_loadu_si512(line);
      const __m512i w0 = INT4 ? _mm512_and_si512(v, nibble) : v;
      const __m512i w1 = INT4 ? _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble) : v;
      for (int r = 0; r < ROWS; ++r) {
        const int8_t* qr = xq.q.data() + (r0 + r) * xq.Kp + g * 4;
        acc[r] = _mm512_dpbusd_epi32(acc[r], w0, _mm512_set1_epi32(load32(qr)));
        if (INT4) acc[r] = _mm512_dpbusd_epi32(acc[r], w1, _mm512_set1_epi32(load32(qr + 4)));
      }
    }
    const __m512 ws = INT4 ? _mm512_loadu_ps(wscale + b * PANEL) : _mm512_setzero_ps();
    for (int r = 0; r < ROWS; ++r) {
      __m512 s = _mm512_set1_ps(xq.scale[(r0 + r) * xq.blocks + b]);
      if (INT4) s = rounded(_mm512_mul_ps(s, ws));
      out[r] = _mm512_add_ps(out[r], rounded(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r]), s)));
    }
  }
  const __m512 ws = _mm512_loadu_ps(wscale);
  for (int r = 0; r < ROWS; ++r)
    _mm512_storeu_ps(y + (r0 + r) * N, INT4 ? out[r] : _mm512_mul_ps(out[r], ws));
}

// AVX2: up to 3 rows x 16 columns as two 8-lane halves.
template <int ROWS, bool INT4>
__attribute__((target("avx2"))) void dot_tile_avx2(const QuantizedRows& xq, int64_t r0,
                                                   const uint8_t* panel, const float* wscale,
                                                   float* y, int64_t N) {
  using F = DotFormat<INT4>;
  const int64_t G = xq.Kp / 4, GB = xq.block / 4;
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256 out[ROWS][2];
  for (int r = 0; r < ROWS; ++r) out[r][0] = out[r][1] = _mm256_setzero_ps();
  for (int64_t g0 = 0, b = 0; g0 < G; g0 += GB, ++b) {
    const int64_t g1 = std::min(g0 + GB, G);
    __m256i acc[ROWS][2];
    for (int r = 0; r < ROWS; ++r)
      acc[r][0] = acc[r][1] =
          INT4 ? _mm256_set1_epi32(-F::BIAS * xq.sum[(r0 + r) * xq.blocks + b])
               : _mm256_setzero_si256();
    for (int64_t g = g0; g < g1; g += F::GROUPS_PER_LINE) {
      const uint8_t* line = panel + (g / F::GROUPS_PER_LINE) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(line + DOT_AHEAD * 64), _MM_HINT_NTA);
      const __m256i* wp = reinterpret_cast<const __m256i*>(line);
      const __m256i v0 = _mm256_loadu_si256(wp), v1 = _mm256_loadu_si256(wp + 1);
      if (INT4) {  // unsigned nibbles times signed q: no saturation (2 * 15 * 127)
        const __m256i w[2][2] = {
            {_mm256_and_si256(v0, nibble), _mm256_and_si256(v1, nibble)},
            {_mm256_and_si256(_mm256_srli_epi16(v0, 4), nibble),
             _mm256_and_si256(_mm256_srli_epi16(v1, 4), nibble)}};
        for (int r = 0; r < ROWS; ++r) {
          const int8_t* qr = xq.q.data() + (r0 + r) * xq.Kp + g * 4;
          for (int half = 0; half < 2; ++half) {
            const __m256i xb = _mm256_set1_epi32(load32(qr + 4 * half));
            for (int h = 0; h < 2; ++h)
              acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(
                  _mm256_maddubs_epi16(w[half][h], xb), ones));
          }
        }
      } else {
        const __m256i w0 = _mm256_xor_si256(v0, bias);  // back to int8
        const __m256i w1 = _mm256_xor_si256(v1, bias);
        for (int r = 0; r < ROWS; ++r) {
          const __m256i xb = _mm256_set1_epi32(load32(xq.q.data() + (r0 + r) * xq.Kp + g * 4));
          const __m256i ax = _mm256_abs_epi8(xb);
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(
              _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(
              _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones));
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m256 s = _mm256_set1_ps(xq.scale[(r0 + r) * xq.blocks + b]);
      for (int h = 0; h < 2; ++h) {
        const __m256 c =
            INT4 ? rounded(_mm256_mul_ps(s, _mm256_loadu_ps(wscale + b * PANEL + 8 * h))) : s;
        out[r][h] = _mm256_add_ps(out[r][h],
                                  rounded(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][h]), c)));
      }
    }
  }
  const __m256 ws0 = _mm256_loadu_ps(wscale), ws1 = _mm256_loadu_ps(wscale + 8);
  for (int r = 0; r < ROWS; ++r) {
    _mm256_storeu_ps(y + (r0 + r) * N, INT4 ? out[r][0] : _mm256_mul_ps(out[r][0], ws0));
    _mm256_storeu_ps(y + (r0 + r) * N + 8, INT4 ? out[r][1] : _mm256_mul_ps(out[r][1], ws1));
  }
}
#endif

int64_t dot_max_rows(int32_t path) {
  return path == PATH_AVX512_VNNI ? 8 : path == PATH_AVX2 ? 3 : 1;
}

template <bool INT4>
void dot_tile(int32_t path, int64_t rows, const QuantizedRows& xq, int64_t r0,
              const uint8_t* panel, const float* wscale, float* y, int64_t N) {
#ifdef QWEN3_TTS_X86
  if (path == PATH_AVX512_VNNI) {
    switch (rows) {
      case 1: return dot_tile_vnni<1, INT4>(xq, r0, panel, wscale, y, N);
      case 2: return dot_tile_vnni<2, INT4>(xq, r0, panel, wscale, y, N);
      case 3: return dot_tile_vnni<3, INT4>(xq, r0, panel, wscale, y, N);
      case 4: return dot_tile_vnni<4, INT4>(xq, r0, panel, wscale, y, N);
      case 5: return dot_tile_vnni<5, INT4>(xq, r0, panel, wscale, y, N);
      case 6: return dot_tile_vnni<6, INT4>(xq, r0, panel, wscale, y, N);
      case 7: return dot_tile_vnni<7, INT4>(xq, r0, panel, wscale, y, N);
      default: return dot_tile_vnni<8, INT4>(xq, r0, panel, wscale, y, N);
    }
  }
  if (path == PATH_AVX2) {
    switch (rows) {
      case 1: return dot_tile_avx2<1, INT4>(xq, r0, panel, wscale, y, N);
      case 2: return dot_tile_avx2<2, INT4>(xq, r0, panel, wscale, y, N);
      default: return dot_tile_avx2<3, INT4>(xq, r0, panel, wscale, y, N);
    }
  }
#endif
  dot_rows_scalar<INT4>(xq, r0, rows, panel, wscale, y, N);
}

// The path asked for (Int8Path; 0: the fastest this CPU has), or -1 if this CPU lacks it.
int32_t pick_path(int32_t path) {
  static const int32_t paths = int8_paths();
  if (path == PATH_AUTO) {
    path = paths & (1 << PATH_AVX512_VNNI) ? PATH_AVX512_VNNI
           : paths & (1 << PATH_AVX2)      ? PATH_AVX2
                                           : PATH_SCALAR;
  }
  return path < PATH_SCALAR || path > PATH_AVX512_VNNI || !(paths & (1 << path)) ? -1 : path;
}

// Both formats' products: M rows of x (M, K) quantized per `block`, P panels of `panel_bytes`
// each and `scale_stride` scales each (int8: PANEL, int4: blocks * PANEL).
template <bool INT4>
void dot_products(ffi::ThreadPool& pool, int32_t path, const float* x, int64_t M, int64_t K,
                  int64_t Kp, int64_t block, const uint8_t* wp, int64_t P, int64_t panel_bytes,
                  const float* sp, int64_t scale_stride, float* yp) {
  const int64_t N = P * PANEL;
  thread_local QuantizedRows xq;  // the calling thread's; helpers only read it while it waits
  xq.quantize(x, M, K, Kp, block);
  const QuantizedRows* xqp = &xq;
  const int64_t max_rows = dot_max_rows(path);
  // integer multiply-adds are 4x cheaper than float32's here: the work unit counts k-groups
  parallel_for(pool, P, M * (Kp / 4) * PANEL, 4, [=](int64_t first, int64_t last) {
    const int64_t tiles = (M + max_rows - 1) / max_rows;
    for (int64_t p = first; p < last; ++p) {
      const uint8_t* panel = wp + p * panel_bytes;
      for (int64_t t = 0, r = 0; t < tiles; ++t) {
        const int64_t rows = (M - r) / (tiles - t);
        dot_tile<INT4>(path, rows, *xqp, r, panel, sp + p * scale_stride, yp + p * PANEL, N);
        r += rows;
      }
    }
  });
}

// x (M, K) float32, w (N / 16, ceil(K / 4), 64) uint8 as above, scale (N,); attributes `path`
// (Int8Path: 0 picks the fastest this CPU has; a path it lacks is an error) and `block`.
ffi::Error RowsMatmulInt8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                             ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                             int32_t path, int32_t block) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != PANEL * 4 || wd[1] != (xd[1] + 3) / 4 ||
      sd.size() != 1 || sd[0] != wd[0] * PANEL) {
    return ffi::Error::InvalidArgument(
        "rows_matmul_int8_dot: x must be (M, K), w (N / 16, ceil(K / 4), 64) and scale (N,)");
  }
  if (block < 0 || block % 4 != 0) {
    return ffi::Error::InvalidArgument("rows_matmul_int8_dot: block must be 0 or a multiple of 4");
  }
  path = pick_path(path);
  if (path < 0) {
    return ffi::Error::InvalidArgument("rows_matmul_int8_dot: this CPU lacks the path asked for");
  }
  dot_products<false>(pool, path, x.typed_data(), xd[0], xd[1], wd[1] * 4, block, w.typed_data(),
                      wd[0], wd[1] * PANEL * 4, scale.typed_data(), PANEL, y->typed_data());
  return ffi::Error::Success();
}

// The int8 x int8 product with one weight of a stack (as RowsMatmulStacked): w (H, N / 16,
// ceil(K / 4), 64) uint8, scale (H, N), index one int32 (clamped into [0, H)).
ffi::Error RowsMatmulInt8DotStacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                    ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> scale,
                                    ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> y,
                                    int32_t path, int32_t block) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[0] < 1 || wd[3] != PANEL * 4 ||
      wd[2] != (xd[1] + 3) / 4 || sd.size() != 2 || sd[0] != wd[0] || sd[1] != wd[1] * PANEL ||
      index.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "rows_matmul_int8_dot_stacked: x must be (M, K), w (H, N / 16, ceil(K / 4), 64), scale "
        "(H, N) and index one int32");
  }
  if (block < 0 || block % 4 != 0) {
    return ffi::Error::InvalidArgument(
        "rows_matmul_int8_dot_stacked: block must be 0 or a multiple of 4");
  }
  path = pick_path(path);
  if (path < 0) {
    return ffi::Error::InvalidArgument(
        "rows_matmul_int8_dot_stacked: this CPU lacks the path asked for");
  }
  const int64_t h = std::clamp<int64_t>(index.typed_data()[0], 0, wd[0] - 1);
  const int64_t panel_bytes = wd[2] * PANEL * 4, N = wd[1] * PANEL;
  dot_products<false>(pool, path, x.typed_data(), xd[0], xd[1], wd[2] * 4, block,
                      w.typed_data() + h * wd[1] * panel_bytes, wd[1], panel_bytes,
                      scale.typed_data() + h * N, PANEL, y->typed_data());
  return ffi::Error::Success();
}

// x (M, K) float32, w (N / 16, Kp / 8, 64) uint8 nibbles and scale (N / 16, Kp / 32, 16) as above
// (Kp: K rounded up to a multiple of INT4_GROUP), y (M, N); attribute `path` as above.
ffi::Error RowsMatmulInt4Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                             ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                             int32_t path) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  const int64_t groups = xd.size() == 2 ? (xd[1] + INT4_GROUP - 1) / INT4_GROUP : 0;
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != PANEL * 4 ||
      wd[1] != groups * (INT4_GROUP / 8) || sd.size() != 3 || sd[0] != wd[0] ||
      sd[1] != groups || sd[2] != PANEL) {
    return ffi::Error::InvalidArgument(
        "rows_matmul_int4_dot: x must be (M, K), w (N / 16, ceil(K / 32) * 4, 64) and scale "
        "(N / 16, ceil(K / 32), 16)");
  }
  path = pick_path(path);
  if (path < 0) {
    return ffi::Error::InvalidArgument("rows_matmul_int4_dot: this CPU lacks the path asked for");
  }
  dot_products<true>(pool, path, x.typed_data(), xd[0], xd[1], groups * INT4_GROUP, INT4_GROUP,
                     w.typed_data(), wd[0], wd[1] * 64, scale.typed_data(), groups * PANEL,
                     y->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// sum_i a[i] * b[i] in 8 lanes, then the lanes and the tail.
float dot(const float* a, const float* b, int64_t n) {
  v8 acc{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
  float sum = 0.0f;
  for (int j = 0; j < 8; ++j) sum += acc[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// One decode step's attention over a heads-major KV cache, reading only the filled slots.
//
// q (B, H, Dh), k and v (B, K, Dh, S) with H = K * G, mask (B, S) as float (1 = attend), filled
// (1,) int32: slots >= filled are never read (the cache is preallocated for hundreds of frames,
// a step only needs the ones written so far; XLA's products read them all). Same arithmetic as
// `layers.KVCacheHeadsMajor.attend`: logits scaled by 1/sqrt(Dh), masked slots set to
// -0.7 * FLT_MAX, a float32 softmax, probabilities times v.
void attend_one(const float* q, const float* k, const float* v, const float* mask, int64_t G,
                int64_t Dh, int64_t S, int64_t n, float* out, float* logits) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const float masked = -0.7f * std::numeric_limits<float>::max();
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * Dh;
    float* lg = logits;
    for (int64_t s = 0; s < n; ++s) lg[s] = 0.0f;
    for (int64_t d = 0; d < Dh; ++d) {  // logits[s] += q[d] * k[d, s]: contiguous in s
      const float qd = qg[d];
      const float* kd = k + d * S;
      for (int64_t s = 0; s < n; ++s) lg[s] += qd * kd[s];
    }
    float top = masked;
    for (int64_t s = 0; s < n; ++s) {
      lg[s] = mask[s] != 0.0f ? lg[s] * scale : masked;
      top = std::max(top, lg[s]);
    }
    float sum = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      lg[s] = std::exp(lg[s] - top);
      sum += lg[s];
    }
    const float inv = 1.0f / sum;
    for (int64_t s = 0; s < n; ++s) lg[s] *= inv;
    float* og = out + g * Dh;
    for (int64_t d = 0; d < Dh; ++d) og[d] = dot(lg, v + d * S, n);  // sum_s p[s] * v[d, s]
  }
}
ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> mask,
                  ffi::Buffer<ffi::S32> filled, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || kd[0] != qd[0] || kd[2] != qd[2] ||
      qd[1] % kd[1] != 0 || md[0] != qd[0] || md[1] != kd[3] || filled.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "attend: q (B, H, Dh), k and v (B, K, Dh, S), mask (B, S), filled (1,)");
  }
  const int64_t B = qd[0], H = qd[1], Dh = qd[2], K = kd[1], S = kd[3], G = H / K;
  const int64_t n = std::clamp<int64_t>(filled.typed_data()[0], 1, S);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float* mp = mask.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, B * K, 2 * G * Dh * n, 1, [=](int64_t first, int64_t last) {
    std::vector<float> logits(n);
    for (int64_t u = first; u < last; ++u) {  // u = (row b, kv head h)
      const int64_t b = u / K;
      attend_one(qp + u * G * Dh, kp + u * Dh * S, vp + u * Dh * S, mp + b * S, G, Dh, S, n,
                 op + u * G * Dh, logits.data());
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// The codec decoder's causal 1-D convolutions on bf16 dot products (`codec_precision="bf16"`,
// cpu_kernels.py `PackedBf16Conv`):
//   y[b, t, n] = sum_{j < k} sum_c xe[b, t + j d, c] * W[j, c, n]
// xe: x (B, T, C) with `pad` zero rows prepended ((k - 1) d for a causal convolution, 0 when the
// caller passes input already extended with the previous call's samples, as streaming does), so
// that T_out = pad + T - (k - 1) d. The bias is the caller's.
//
// Arithmetic: x rounded to bf16 once per call (round to nearest even, `vcvtne2ps2bf16`), the
// weights rounded the same way at load; each bf16 x bf16 product is exact in float32 and
// `vdpbf16ps` adds a pair of them (channels 2 i and 2 i + 1) to a float32 accumulator; the sum
// runs over taps, then channel pairs in increasing order.
//
// Weight layout (cpu_kernels.py `pack_conv_bf16`): column blocks of NB = 16 V output columns
// (V = 1..4, the last block padded with zero weights), each (k, Cp / 2, NB, 2):
//   w[nb, j, i, n, e] = W[j, 2 i + e, nb * NB + n]   (C padded to Cp = even with zero weights)
// so that one k-pair of a block is V 512-bit vectors, and the input row's channel pair (2 i,
// 2 i + 1) is one 32-bit lane broadcast against them. A register tile is R time rows x V
// vectors of 16 columns (R V accumulators + V weights + 1 broadcast <= 32 zmm registers).

int32_t bf16_dot_supported() {
#ifdef QWEN3_TTS_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return 0;
#endif
}

#ifdef QWEN3_TTS_X86
constexpr int bf16_tile_rows(int V) { return V >= 4 ? 6 : V == 3 ? 8 : 12; }

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// R rows (the first `rows` stored; the others repeat row 0, so that a short tile runs the same
// code) x V vectors of one column block. `xe`: the extended input's row t0, Cp bf16 per row.
template <int R, int V>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void conv_tile_bf16(
    const uint16_t* xe, int64_t Cp, int64_t taps, int64_t dilation, const uint16_t* block,
    int64_t rows, float* y, int64_t N, int64_t n0) {
  const int64_t P = Cp / 2;
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < taps; ++j) {
    const uint16_t* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = xe + ((r < rows ? r : 0) + j * dilation) * Cp;
    const uint16_t* wj = block + j * P * V * 32;
    for (int64_t i = 0; i < P; ++i) {
      __m512bh w[V];
      for (int v = 0; v < V; ++v)
        w[v] = (__m512bh)_mm512_loadu_si512(wj + (i * V + v) * 32);
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(load_pair(xr[r] + 2 * i));
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, w[v]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int v = 0; v < V; ++v) {
      const int64_t col = n0 + 16 * v;
      if (col + 16 <= N) {
        _mm512_storeu_ps(y + r * N + col, acc[r][v]);
      } else if (col < N) {
        _mm512_mask_storeu_ps(y + r * N + col, static_cast<__mmask16>((1u << (N - col)) - 1),
                              acc[r][v]);
      }
    }
  }
}

// x (rows, C) float32 -> (rows, Cp) bf16, round to nearest even, zeros past C.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void to_bf16_rows(
    const float* x, int64_t rows, int64_t C, int64_t Cp, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    uint16_t* o = out + r * Cp;
    for (int64_t c = 0; c < Cp; c += 32) {
      const int64_t left = std::min<int64_t>(32, C - c);  // may be <= 0 (the pad channel)
      const __mmask16 lo = left >= 16 ? 0xFFFF : left > 0 ? (1u << left) - 1 : 0;
      const __mmask16 hi = left >= 32 ? 0xFFFF : left > 16 ? (1u << (left - 16)) - 1 : 0;
      const __m512 a = _mm512_maskz_loadu_ps(lo, xr + c);
      const __m512 b = _mm512_maskz_loadu_ps(hi, xr + c + 16);
      const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a: the low 16 lanes
      const int64_t n = std::min<int64_t>(32, Cp - c);
      const __mmask32 m = n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1;
      _mm512_mask_storeu_epi16(o + c, m, h);
    }
  }
}

template <int V>
void conv_rows_bf16(const uint16_t* xe, int64_t Cp, int64_t taps, int64_t dilation,
                    const uint16_t* block, int64_t t0, int64_t t1, float* y, int64_t N,
                    int64_t n0) {
  constexpr int R = bf16_tile_rows(V);
  for (int64_t t = t0; t < t1; t += R)
    conv_tile_bf16<R, V>(xe + t * Cp, Cp, taps, dilation, block, std::min<int64_t>(R, t1 - t),
                         y + t * N, N, n0);
}
#endif

// x (B, T, C) float32, w (blocks, k, Cp / 2, 32 V) bf16 as above, y (B, T_out, N) float32 with
// N <= blocks * 16 V; attributes `dilation` and `pad` (zero rows prepended).
ffi::Error ConvBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y, int32_t dilation, int32_t pad) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 3 || wd.size() != 4 || yd.size() != 3 || wd[3] % 32 != 0 || wd[3] < 32 ||
      wd[3] > 128 || wd[2] != (xd[2] + 1) / 2 || yd[0] != xd[0] || dilation < 1 || pad < 0 ||
      yd[1] != pad + xd[1] - (wd[1] - 1) * dilation || yd[2] > wd[0] * (wd[3] / 2) ||
      yd[2] <= (wd[0] - 1) * (wd[3] / 2)) {
    return ffi::Error::InvalidArgument(
        "conv_bf16: x must be (B, T, C), w (blocks, k, ceil(C / 2), 32 V) with V in 1..4, y (B, "
        "pad + T - (k - 1) dilation, N) with N in the last block");
  }
  if (!bf16_dot_supported()) {
    return ffi::Error::InvalidArgument(
        "conv_bf16: this CPU lacks AVX512_BF16 (vdpbf16ps), which the bf16 codec needs");
  }
#ifdef QWEN3_TTS_X86
  const int64_t B = xd[0], T = xd[1], C = xd[2], Cp = wd[2] * 2, taps = wd[1];
  const int64_t blocks = wd[0], V = wd[3] / 32, NB = 16 * V, N = yd[2], Tout = yd[1];
  const int64_t Te = pad + T;  // extended rows per batch item
  if (Tout <= 0 || B == 0) return ffi::Error::Success();
  thread_local std::vector<uint16_t> xe;  // the calling thread's; helpers read it while it waits
  xe.resize(B * Te * Cp);
  uint16_t* xep = xe.data();
  const float* xp = x.typed_data();
  for (int64_t b = 0; b < B; ++b) std::fill_n(xep + b * Te * Cp, pad * Cp, uint16_t{0});
  parallel_for(pool, B * T, C, 64, [=](int64_t first, int64_t last) {
    for (int64_t u = first; u < last;) {  // runs of rows within one batch item
      const int64_t b = u / T, t = u % T, n = std::min(last - u, T - t);
      to_bf16_rows(xp + u * C, n, C, Cp, xep + (b * Te + pad + t) * Cp);
      u += n;
    }
  });
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  const int64_t chunk_rows = 8 * bf16_tile_rows(static_cast<int>(V));
  const int64_t chunks = (Tout + chunk_rows - 1) / chunk_rows;
  const int64_t block_elems = taps * (Cp / 2) * NB * 2;
  // units: (batch item, column block, time chunk), time fastest: a thread's consecutive units
  // reuse one column block's weights from its cache
  parallel_for(pool, B * blocks * chunks, chunk_rows * NB * taps * Cp / 2, 1,
               [=](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) {
      const int64_t c = u % chunks, nb = (u / chunks) % blocks, b = u / (chunks * blocks);
      const int64_t t0 = c * chunk_rows, t1 = std::min(Tout, t0 + chunk_rows);
      const uint16_t* xb = xep + b * Te * Cp;
      const uint16_t* blk = wp + nb * block_elems;
      float* yb = yp + b * Tout * N;
      switch (V) {
        case 1: conv_rows_bf16<1>(xb, Cp, taps, dilation, blk, t0, t1, yb, N, nb * NB); break;
        case 2: conv_rows_bf16<2>(xb, Cp, taps, dilation, blk, t0, t1, yb, N, nb * NB); break;
        case 3: conv_rows_bf16<3>(xb, Cp, taps, dilation, blk, t0, t1, yb, N, nb * NB); break;
        default: conv_rows_bf16<4>(xb, Cp, taps, dilation, blk, t0, t1, yb, N, nb * NB); break;
      }
    }
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_rows_matmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_rows_matmul_stacked, RowsMatmulStacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_rows_matmul_int8, RowsMatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_rows_matmul_int8_dot, RowsMatmulInt8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("path")
                                  .Attr<int32_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_rows_matmul_int8_dot_stacked,
                              RowsMatmulInt8DotStacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("path")
                                  .Attr<int32_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_rows_matmul_int4_dot, RowsMatmulInt4Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("path"));

extern "C" int32_t qwen3_tts_jax_int8_paths() { return int8_paths(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_attend, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3_tts_jax_conv_bf16, ConvBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("dilation")
                                  .Attr<int32_t>("pad"));

extern "C" int32_t qwen3_tts_jax_bf16_dot() { return bf16_dot_supported(); }
