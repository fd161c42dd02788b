// The six per-column inner products of one SGD-G/Adam-G step, in one pass over memory.
//
// For arrays w, g, b of shape (..., p), read as row-major (n, p) matrices, writes the (6, p)
// array of column inner products [wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb] ((F1) of docs/algorithm.md).
// XLA:CPU evaluates sibling reductions as separate passes, reading w, g and b
// nine times; this kernel reads each of them once, sweeping rows in memory order and keeping
// one float32 accumulator per column and product.
//
// Rows are split into chunks that the XLA:CPU intra-op thread pool and the calling thread claim
// from a shared counter, so the call finishes on the calling thread alone when no pool thread is
// free (no thread ever waits for a task that has not started). Each chunk has its own
// accumulators; they are added in chunk order, so the result does not depend on the scheduling.
//
// Registered by grassmann_optax/_src/native.py through jax.ffi.
// Reference: Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
// arXiv:1709.09603.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kProducts = 6;
// Rows per chunk are chosen so that a chunk reads about this many elements of each array.
constexpr int64_t kChunkElements = int64_t{1} << 16;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kBlockRows = 64;
constexpr int64_t kLanes = 8;
// Each row's loads prefetch the same columns kPrefetchRows rows further on, once per cache line
// of kLineFloats floats.
constexpr int64_t kPrefetchRows = 2;
constexpr int64_t kLineFloats = 16;

// Adds one row's products to the accumulators of one group of `lanes` columns, laid out
// [product][lane] at `acc`.
[[gnu::always_inline]] inline void AccumulateGroup(const float* __restrict x_row,
                                                   const float* __restrict y_row,
                                                   const float* __restrict z_row, int64_t lanes,
                                                   float* __restrict acc) {
#pragma GCC unroll 8
#pragma GCC ivdep
  for (int64_t l = 0; l < lanes; ++l) {
    const float x = x_row[l], y = y_row[l], z = z_row[l];
    acc[l] += x * x;
    acc[lanes + l] += x * y;
    acc[2 * lanes + l] += y * y;
    acc[3 * lanes + l] += x * z;
    acc[4 * lanes + l] += y * z;
    acc[5 * lanes + l] += z * z;
  }
}

// Adds rows [row_begin, row_end) to the six accumulator rows of `sums` (layout [6][p]), in
// blocks of kBlockRows rows summed in `block` first, so that float32 rounding grows with
// kBlockRows + rows / kBlockRows instead of with the number of rows. One row at a time keeps
// three input streams, which the hardware prefetcher follows best; measured on WRN trees, two,
// four or eight rows at a time (fewer accumulator updates, more streams) were slower.
//
// With the accumulator loads and stores between its input loads, the loop leaves the hardware
// prefetcher behind: on one core of this project's machine it took 1.6x the time of a plain
// read of the three arrays. One software prefetch per cache line, two rows ahead, brings it
// closer: on the WRN-28-10 tree through XLA on two cores, the pass alone went from 1.11-1.17x
// to 1.06-1.10x the time XLA needs to read the arrays (three processes, each timing both loops
// in turn; one prefetch per group of eight columns, two per line, gained nothing). A whole
// SGD-G/Adam-G update did not move measurably with it (within 1%): there, the memory traffic of
// all its passes together sets the time.
//
// In `block` the accumulators of columns [j0, j0 + kLanes) lie together, product after product,
// so the six stores of one step are contiguous. In a [6][p] layout the six stores of a step
// sit at six fixed distances from the loads of the same step for a whole row, and where one of
// them is near a multiple of 4 KiB the loads can wait on the stores (4K aliasing; it depends on
// where XLA placed the buffers, and a microbenchmark's speed moved by 40% with that offset).
// Measured on the WRN-28-10 leaves, this layout took the pass from 1.2-1.5x to 1.07-1.11x the
// time XLA needs only to read the three arrays.
//
// Each column is summed in row order in one vector lane, so the vector width changes no
// rounding, and the build passes -ffp-contract=off so that no variant fuses a multiply into an
// add: every instruction-set variant below returns the same bits.
[[gnu::always_inline]] inline void AccumulateRowsBody(const float* __restrict w,
                                                      const float* __restrict g,
                                                      const float* __restrict b, int64_t p,
                                                      int64_t row_begin, int64_t row_end,
                                                      float* __restrict sums,
                                                      float* __restrict block) {
  // Whole groups of kLanes columns (a constant width the compiler vectorizes), then the last
  // p - vec columns as one narrower group; group j0 starts at block + j0 * kProducts.
  const int64_t vec = p / kLanes * kLanes;
  for (int64_t start = row_begin; start < row_end; start += kBlockRows) {
    std::fill(block, block + kProducts * p, 0.0f);
    const int64_t stop = std::min(start + kBlockRows, row_end);
    for (int64_t i = start; i < stop; ++i) {
      const float* __restrict wi = w + i * p;
      const float* __restrict gi = g + i * p;
      const float* __restrict bi = b + i * p;
      // Within this chunk's rows, so that no address beyond the arrays is formed.
      const bool prefetch = i + kPrefetchRows < row_end;
      for (int64_t j0 = 0; j0 < vec; j0 += kLanes) {
        if (prefetch && j0 % kLineFloats == 0) {
          __builtin_prefetch(wi + kPrefetchRows * p + j0);
          __builtin_prefetch(gi + kPrefetchRows * p + j0);
          __builtin_prefetch(bi + kPrefetchRows * p + j0);
        }
        AccumulateGroup(wi + j0, gi + j0, bi + j0, kLanes, block + j0 * kProducts);
      }
      if (vec < p) AccumulateGroup(wi + vec, gi + vec, bi + vec, p - vec, block + vec * kProducts);
    }
    for (int64_t j0 = 0; j0 < p; j0 += kLanes) {
      const int64_t lanes = std::min(kLanes, p - j0);
      const float* group = block + j0 * kProducts;
      for (int k = 0; k < kProducts; ++k) {
        for (int64_t l = 0; l < lanes; ++l) sums[k * p + j0 + l] += group[k * lanes + l];
      }
    }
  }
}

using AccumulateFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t,
                              float*, float*);

struct Variant {
  const char* name;
  AccumulateFn accumulate;
};

void AccumulateRowsBaseline(const float* w, const float* g, const float* b, int64_t p,
                            int64_t row_begin, int64_t row_end, float* sums, float* block) {
  AccumulateRowsBody(w, g, b, p, row_begin, row_end, sums, block);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GRASSMANN_HAVE_AVX2_VARIANT 1
// 256-bit vectors where the processor has them (the x86-64 baseline is 128-bit SSE2). Measured
// on the WRN-28-10 tree on a 2-core AMD EPYC, AVX2 takes the pass from about 16 ms to 13 ms, near
// the time XLA needs only to read the three arrays once; AVX-512 was no faster.
__attribute__((target("avx2"))) void AccumulateRowsAvx2(const float* w, const float* g,
                                                        const float* b, int64_t p,
                                                        int64_t row_begin, int64_t row_end,
                                                        float* sums, float* block) {
  AccumulateRowsBody(w, g, b, p, row_begin, row_end, sums, block);
}
#endif

// The variant for this processor, chosen once when the library is loaded.
// GRASSMANN_OPTAX_CPU_KERNEL_ISA=baseline forces the portable one (for tests that compare them).
Variant SelectVariant() {
  const char* forced = std::getenv("GRASSMANN_OPTAX_CPU_KERNEL_ISA");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) {
    return {"baseline", AccumulateRowsBaseline};
  }
#ifdef GRASSMANN_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return {"avx2", AccumulateRowsAvx2};
#endif
  return {"baseline", AccumulateRowsBaseline};
}

const Variant kVariant = SelectVariant();

// Shared by the calling thread and the pool tasks; a task that starts after the call has
// returned finds no chunk left and only drops its reference.
struct Work {
  const float* w;
  const float* g;
  const float* b;
  int64_t rows;
  int64_t p;
  int64_t chunks;
  std::vector<float> sums;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    std::vector<float> block;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      block.resize(kProducts * p);
      kVariant.accumulate(w, g, b, p, rows * c / chunks, rows * (c + 1) / chunks,
                          sums.data() + c * kProducts * p, block.data());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error ColumnGramImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g,
                          ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = w.dimensions();
  const int64_t p = dims.size() == 0 ? 1 : dims[dims.size() - 1];
  const int64_t size = static_cast<int64_t>(w.element_count());
  if (static_cast<int64_t>(g.element_count()) != size ||
      static_cast<int64_t>(b.element_count()) != size ||
      static_cast<int64_t>(out->element_count()) != kProducts * p) {
    return ffi::Error::InvalidArgument("column_gram: operands of different sizes");
  }
  float* result = out->typed_data();
  if (p == 0) return ffi::Error::Success();
  if (size == 0) {
    std::fill(result, result + kProducts * p, 0.0f);
    return ffi::Error::Success();
  }

  auto work = std::make_shared<Work>();
  work->w = w.typed_data();
  work->g = g.typed_data();
  work->b = b.typed_data();
  work->rows = size / p;
  work->p = p;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->chunks = std::clamp<int64_t>(size / kChunkElements, 1,
                                     std::min<int64_t>(kMaxChunks, work->rows));
  work->sums.assign(work->chunks * kProducts * p, 0.0f);
  const int64_t helpers = std::min(threads, work->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  // Every chunk has been claimed; wait for the ones other threads are still summing.
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();

  for (int64_t k = 0; k < kProducts * p; ++k) {
    float total = 0.0f;
    for (int64_t c = 0; c < work->chunks; ++c) total += work->sums[c * kProducts * p + k];
    result[k] = total;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrassmannColumnGram, ColumnGramImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The instruction-set variant in use ("avx2" or "baseline"), for reports.
extern "C" const char* GrassmannColumnGramVariant() { return kVariant.name; }
