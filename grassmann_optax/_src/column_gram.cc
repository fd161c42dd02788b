// The six per-point inner products of one SGD-G/Adam-G step, in one pass over memory.
//
// For arrays w, g, b read as row-major (O, N1, I, N2) arrays, writes the (6, O * I) array of
// inner products [wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb] ((F1) of docs/algorithm.md) of the points
// (o, i), each point being the N1 * N2 elements x[o, :, i, :]. native.py maps a layout of points
// onto this view: columns of an (n, p) matrix are (1, n, p, 1), rows are (n, 1, 1, p), a
// DenseGeneral kernel (embed, heads, head_dim) per head is (1, embed, heads, head_dim).
// XLA:CPU evaluates sibling reductions as separate passes, reading w, g and b nine times; this
// kernel reads each of them once, in memory order.
//
// Two loops: where N2 == 1 (the points are columns of each (N1, I) matrix x[o]) the column loop
// keeps one float32 accumulator per column and product and sweeps rows; where N2 > 1 (each
// point is made of contiguous runs of N2 elements) the run loop sums each run in 8 vector lanes.
//
// The work is split into chunks (a range of rows of one o) that the XLA:CPU intra-op thread pool
// and the calling thread claim from a shared counter, so the call finishes on the calling thread
// alone when no pool thread is free (no thread ever waits for a task that has not started). Each
// chunk has its own accumulators; they are added in chunk order, so the result does not depend on
// the scheduling, and the chunks of one o depend only on the shape of x[o], so a stack of
// matrices gets the bits of each matrix on its own.
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
// The run loop sums a run in segments of at most kSegment elements (a multiple of kLanes), and
// adds its lane sums to a chunk's every kBlockElements elements or so (whole runs, or one
// segment), so that float32 rounding grows with that block and not with the length of a point.
constexpr int64_t kSegment = 512;
constexpr int64_t kBlockElements = 512;
// Per point and product, the run loop keeps kLanes lane sums for the chunk and kLanes for the
// block: 2 * kProducts * kLanes floats of scratch per point of a row.
constexpr int64_t kPointLanes = kProducts * kLanes;

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

// Eight float32 lanes as a GCC/Clang vector: the AVX2 build does each operation in one 256-bit
// register, the baseline build in two 128-bit ones, lane for lane the same arithmetic.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

[[gnu::always_inline]] inline void LoadLanes(Lanes* v, const float* x) {
  __builtin_memcpy(v, x, sizeof(Lanes));
}

[[gnu::always_inline]] inline void StoreLanes(float* x, const Lanes* v) {
  __builtin_memcpy(x, v, sizeof(Lanes));
}

// Adds the products of `len` contiguous elements (a segment of one run, starting at a multiple of
// kLanes within the run) to the lane sums at `acc` (layout [product][lane]): element j goes to
// lane j % kLanes. The six sums stay in registers for the whole segment.
[[gnu::always_inline]] inline void AccumulateSegment(const float* __restrict x,
                                                     const float* __restrict y,
                                                     const float* __restrict z, int64_t len,
                                                     float* __restrict acc) {
  Lanes a[kProducts];
  for (int k = 0; k < kProducts; ++k) LoadLanes(&a[k], acc + k * kLanes);
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    Lanes xv, yv, zv;
    LoadLanes(&xv, x + j);
    LoadLanes(&yv, y + j);
    LoadLanes(&zv, z + j);
    a[0] += xv * xv;
    a[1] += xv * yv;
    a[2] += yv * yv;
    a[3] += xv * zv;
    a[4] += yv * zv;
    a[5] += zv * zv;
  }
  for (int k = 0; k < kProducts; ++k) StoreLanes(acc + k * kLanes, &a[k]);
  // The last len % kLanes elements, each in its own lane with the same two roundings.
  for (int64_t l = 0; j + l < len; ++l) {
    const float xs = x[j + l], ys = y[j + l], zs = z[j + l];
    acc[l] += xs * xs;
    acc[kLanes + l] += xs * ys;
    acc[2 * kLanes + l] += ys * ys;
    acc[3 * kLanes + l] += xs * zs;
    acc[4 * kLanes + l] += ys * zs;
    acc[5 * kLanes + l] += zs * zs;
  }
}

// The layout of one slice x[o] of shape (N1, I, N2) for the run loop. A point's N1 * N2 elements
// are read as N1 * segments pieces q = n1 * segments + s (segment s of run n1); a chunk is a range
// of q, summed in blocks of block_pieces pieces.
struct RunShape {
  int64_t inner;         // I
  int64_t run;           // N2
  int64_t segments;      // ceil(N2 / kSegment)
  int64_t block_pieces;  // pieces per block: whole runs where a run is short, else one segment
};

// Adds pieces [q_begin, q_end) of the I points of one slice to `sums` (layout [6][I]), reading
// the slice in memory order: row n1, then point i, then the run's segments. Per point the pieces
// are summed in order into kLanes lanes per product: in a block (zeroed at its start), whose
// lanes are then added to the chunk's lanes, which are finally added up in a fixed tree. So each
// point's sum is the same sequence of float32 operations in both variants and whatever I is.
// `scratch` holds 2 * I * kPointLanes floats.
[[gnu::always_inline]] inline void AccumulateRunsBody(const float* __restrict w,
                                                      const float* __restrict g,
                                                      const float* __restrict b,
                                                      const RunShape& shape, int64_t q_begin,
                                                      int64_t q_end, float* __restrict sums,
                                                      float* __restrict scratch) {
  const int64_t inner = shape.inner, run = shape.run, segments = shape.segments;
  float* __restrict lanes = scratch;
  float* __restrict block = scratch + inner * kPointLanes;
  std::fill(lanes, lanes + inner * kPointLanes, 0.0f);
  for (int64_t qb = q_begin; qb < q_end; qb += shape.block_pieces) {
    const int64_t qe = std::min(qb + shape.block_pieces, q_end);
    std::fill(block, block + inner * kPointLanes, 0.0f);
    for (int64_t q = qb; q < qe;) {
      const int64_t n1 = q / segments;
      const int64_t s0 = q % segments;
      const int64_t s1 = std::min(segments, s0 + (qe - q));
      const int64_t row = n1 * inner * run;
      for (int64_t i = 0; i < inner; ++i) {
        const int64_t start = row + i * run;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t offset = start + s * kSegment;
          const int64_t len = std::min(kSegment, run - s * kSegment);
          AccumulateSegment(w + offset, g + offset, b + offset, len, block + i * kPointLanes);
        }
      }
      q += s1 - s0;
    }
    for (int64_t j = 0; j < inner * kPointLanes; j += kLanes) {
      Lanes sum, add;
      LoadLanes(&sum, lanes + j);
      LoadLanes(&add, block + j);
      sum += add;
      StoreLanes(lanes + j, &sum);
    }
  }
  for (int64_t i = 0; i < inner; ++i) {
    for (int k = 0; k < kProducts; ++k) {
      const float* l = lanes + i * kPointLanes + k * kLanes;
      sums[k * inner + i] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
  }
}

using AccumulateRowsFn = void (*)(const float*, const float*, const float*, int64_t, int64_t,
                                  int64_t, float*, float*);
using AccumulateRunsFn = void (*)(const float*, const float*, const float*, const RunShape&,
                                  int64_t, int64_t, float*, float*);

struct Variant {
  const char* name;
  AccumulateRowsFn rows;
  AccumulateRunsFn runs;
};

void AccumulateRowsBaseline(const float* w, const float* g, const float* b, int64_t p,
                            int64_t row_begin, int64_t row_end, float* sums, float* block) {
  AccumulateRowsBody(w, g, b, p, row_begin, row_end, sums, block);
}

void AccumulateRunsBaseline(const float* w, const float* g, const float* b, const RunShape& shape,
                            int64_t q_begin, int64_t q_end, float* sums, float* scratch) {
  AccumulateRunsBody(w, g, b, shape, q_begin, q_end, sums, scratch);
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

__attribute__((target("avx2"))) void AccumulateRunsAvx2(const float* w, const float* g,
                                                        const float* b, const RunShape& shape,
                                                        int64_t q_begin, int64_t q_end,
                                                        float* sums, float* scratch) {
  AccumulateRunsBody(w, g, b, shape, q_begin, q_end, sums, scratch);
}
#endif

// The variant for this processor, chosen once when the library is loaded.
// GRASSMANN_OPTAX_CPU_KERNEL_ISA=baseline forces the portable one (for tests that compare them).
Variant SelectVariant() {
  const char* forced = std::getenv("GRASSMANN_OPTAX_CPU_KERNEL_ISA");
  const Variant baseline = {"baseline", AccumulateRowsBaseline, AccumulateRunsBaseline};
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return baseline;
#ifdef GRASSMANN_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return {"avx2", AccumulateRowsAvx2, AccumulateRunsAvx2};
#endif
  return baseline;
}

const Variant kVariant = SelectVariant();

// Shared by the calling thread and the pool tasks; a task that starts after the call has
// returned finds no task left and only drops its reference.
//
// The work is O * chunks units (o, c), unit o * chunks + c summing chunk c of slice x[o] into
// its own [6][I] sums. The chunks of a slice depend only on the slice's shape. A task is `group`
// consecutive units: one where a slice has several chunks, else as many slices as make about
// kChunkElements elements, so that a stack of many small slices is not one task per slice.
struct Work {
  const float* w;
  const float* g;
  const float* b;
  int64_t slice;   // elements per o: N1 * I * N2
  int64_t rows;    // N1
  int64_t inner;   // I
  bool by_runs;    // N2 > 1: the run loop; else the column loop
  RunShape shape;  // for the run loop
  int64_t pieces;  // the pieces of a point that chunks split: rows, or rows * segments
  int64_t chunks;  // per o
  int64_t units;
  int64_t group;
  int64_t tasks;
  std::vector<float> sums;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    std::vector<float> scratch;
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      scratch.resize((by_runs ? 2 * kPointLanes : kProducts) * inner);
      const int64_t stop = std::min(units, (t + 1) * group);
      for (int64_t u = t * group; u < stop; ++u) {
        const int64_t o = u / chunks, c = u % chunks;
        const int64_t offset = o * slice;
        const int64_t begin = pieces * c / chunks, end = pieces * (c + 1) / chunks;
        float* unit_sums = sums.data() + u * kProducts * inner;
        if (by_runs) {
          kVariant.runs(w + offset, g + offset, b + offset, shape, begin, end, unit_sums,
                        scratch.data());
        } else {
          kVariant.rows(w + offset, g + offset, b + offset, inner, begin, end, unit_sums,
                        scratch.data());
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error ColumnGramImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g,
                          ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out, int64_t outer,
                          int64_t reduced, int64_t inner, int64_t run) {
  const int64_t size = static_cast<int64_t>(w.element_count());
  const int64_t points = outer * inner;
  if (outer < 0 || reduced < 0 || inner < 0 || run < 0 || outer * reduced * inner * run != size ||
      static_cast<int64_t>(g.element_count()) != size ||
      static_cast<int64_t>(b.element_count()) != size ||
      static_cast<int64_t>(out->element_count()) != kProducts * points) {
    return ffi::Error::InvalidArgument("column_gram: operands or layout of different sizes");
  }
  float* result = out->typed_data();
  if (points == 0) return ffi::Error::Success();
  if (size == 0) {
    std::fill(result, result + kProducts * points, 0.0f);
    return ffi::Error::Success();
  }

  auto work = std::make_shared<Work>();
  work->w = w.typed_data();
  work->g = g.typed_data();
  work->b = b.typed_data();
  work->slice = reduced * inner * run;
  work->rows = reduced;
  work->inner = inner;
  work->by_runs = run > 1;
  const int64_t segments = (run + kSegment - 1) / kSegment;
  work->shape = {inner, run, segments,
                 segments > 1 ? 1 : std::max<int64_t>(1, kBlockElements / run)};
  work->pieces = work->by_runs ? reduced * segments : reduced;
  work->chunks = std::clamp<int64_t>(work->slice / kChunkElements, 1,
                                     std::min<int64_t>(kMaxChunks, work->pieces));
  work->units = outer * work->chunks;
  work->group = work->chunks > 1 ? 1 : std::max<int64_t>(1, kChunkElements / work->slice);
  work->tasks = (work->units + work->group - 1) / work->group;
  work->sums.assign(work->units * kProducts * inner, 0.0f);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min(threads, work->tasks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  // Every task has been claimed; wait for the ones other threads are still summing.
  while (work->done.load(std::memory_order_acquire) < work->tasks) std::this_thread::yield();

  // Point (o, i) is result column o * I + i: the chunks of o added in order.
  const int64_t chunks = work->chunks;
  for (int64_t o = 0; o < outer; ++o) {
    for (int k = 0; k < kProducts; ++k) {
      for (int64_t i = 0; i < inner; ++i) {
        float total = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) {
          total += work->sums[((o * chunks + c) * kProducts + k) * inner + i];
        }
        result[k * points + o * inner + i] = total;
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// Attributes: the (O, N1, I, N2) view of the operands (see the top of this file).
XLA_FFI_DEFINE_HANDLER_SYMBOL(GrassmannColumnGram, ColumnGramImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("outer")
                                  .Attr<int64_t>("reduced")
                                  .Attr<int64_t>("inner")
                                  .Attr<int64_t>("run"));

// The instruction-set variant in use ("avx2" or "baseline"), for reports.
extern "C" const char* GrassmannColumnGramVariant() { return kVariant.name; }
