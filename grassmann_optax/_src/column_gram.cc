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
// keeps one float32 accumulator per column and product and sweeps rows; where N2 >= kShortRun
// (each point is made of contiguous runs of N2 elements) the run loop sums each run in 8 vector
// lanes; shorter runs take the column loop over the I * N2 columns of x[o], whose sums are then
// added per point (ColumnGramImpl says why).
//
// The work is split into chunks (a range of rows of one o) that the XLA:CPU intra-op thread pool
// and the calling thread claim from a shared counter, so the call finishes on the calling thread
// alone when no pool thread is free (no thread ever waits for a task that has not started). Each
// chunk has its own accumulators; they are added in chunk order, so the result does not depend on
// the scheduling. The chunks depend only on (O, N1, I, N2), and with O == 1 they are those of the
// kernel before it read other layouts, so columns keep their bits.
//
// Built at install time into the extension module grassmann_optax._src._column_gram
// (CMakeLists.txt, column_gram_module.cc), whose handler grassmann_optax/_src/native.py registers
// through jax.ffi.
// Reference: Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
// arXiv:1709.09603.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernel_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using grassmann_kernel::kLanes;
using grassmann_kernel::Lanes;
using grassmann_kernel::LoadLanes;
using grassmann_kernel::StoreLanes;

constexpr int kProducts = 6;
// Rows per chunk are chosen so that a chunk reads about this many elements of each array.
constexpr int64_t kChunkElements = int64_t{1} << 16;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kBlockRows = 64;
// Each row's loads prefetch the same columns kPrefetchRows rows further on, once per cache line
// of kLineFloats floats.
constexpr int64_t kPrefetchRows = 2;
// The run loop prefetches each cache line kRunPrefetch elements (2 KiB) ahead, within the slice
// (or the rows) it reads. On 40 matrices of (768, 3072) from memory, each one point, with two
// threads of this project's Intel Xeon, it took the pass over w and g from 1.32x to 1.00x the time
// XLA needs to read the two arrays.
constexpr int64_t kRunPrefetch = 512;
constexpr int64_t kLineFloats = 16;
// The column loop sweeps a block's rows over at most kPanelColumns columns at a time, so that
// the block's accumulators (6 * 4 bytes per column: 12 KiB) stay in the L1 cache. On this
// project's 2-core AMD EPYC, with (768, 3072) resident in L3, one thread took 2.3-2.5x the time
// of a plain read of the arrays without panels (1.35-1.45x at p = 256) and 1.5-1.6x with them;
// panels of 1024 columns were no better. Each column's sum is the same sequence of operations
// either way, so the bits do not change.
constexpr int64_t kPanelColumns = 512;
// The run loop sums a run in segments of at most kSegment elements (a multiple of kLanes), and
// adds its lane sums to a chunk's every kBlockElements elements or so (whole runs, or one
// segment), so that float32 rounding grows with that block and not with the length of a point.
constexpr int64_t kSegment = 512;
constexpr int64_t kBlockElements = 512;
// Runs shorter than this take the column loop: see ColumnGramImpl.
constexpr int64_t kShortRun = 16;
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

// Adds rows [row_begin, row_end) to the six accumulator rows of `sums` (product k at
// sums + k * stride; the first block's sums are stored, not added), in blocks of kBlockRows rows
// summed in `block` first, so that float32 rounding grows with kBlockRows + rows / kBlockRows
// instead of with the number of rows. One row at a time keeps
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
                                                      float* __restrict sums, int64_t stride,
                                                      float* __restrict block) {
  // Whole groups of kLanes columns (a constant width the compiler vectorizes), then the last
  // p - vec columns as one narrower group; group j0 starts at block + j0 * kProducts.
  const int64_t vec = p / kLanes * kLanes;
  for (int64_t start = row_begin; start < row_end; start += kBlockRows) {
    const int64_t stop = std::min(start + kBlockRows, row_end);
    // The first block's sums are stored as 0 + sum (the bits of adding them to zeroed sums), so
    // that `sums` needs no zeroing.
    const bool first = start == row_begin;
    // The block's rows, one panel of columns after the other (see kPanelColumns).
    for (int64_t panel = 0; panel < p; panel += kPanelColumns) {
      const int64_t panel_end = std::min(panel + kPanelColumns, p);
      const int64_t panel_vec = std::min(panel_end, vec);
      std::fill(block + panel * kProducts, block + panel_end * kProducts, 0.0f);
      for (int64_t i = start; i < stop; ++i) {
        const float* __restrict wi = w + i * p;
        const float* __restrict gi = g + i * p;
        const float* __restrict bi = b + i * p;
        // Within this chunk's rows, so that no address beyond the arrays is formed. (Prefetching
        // instead the rows the loop visits next, the next panel's at a panel's last rows, gained
        // nothing measurable.)
        const bool prefetch = i + kPrefetchRows < row_end;
        for (int64_t j0 = panel; j0 < panel_vec; j0 += kLanes) {
          if (prefetch && j0 % kLineFloats == 0) {
            __builtin_prefetch(wi + kPrefetchRows * p + j0);
            __builtin_prefetch(gi + kPrefetchRows * p + j0);
            __builtin_prefetch(bi + kPrefetchRows * p + j0);
          }
          AccumulateGroup(wi + j0, gi + j0, bi + j0, kLanes, block + j0 * kProducts);
        }
        if (panel_vec < panel_end) {
          AccumulateGroup(wi + vec, gi + vec, bi + vec, p - vec, block + vec * kProducts);
        }
      }
      // The block's sums into the chunk's, a whole group of kLanes (a constant width the
      // compiler vectorizes) at a time.
      for (int64_t j0 = panel; j0 < panel_vec; j0 += kLanes) {
        const float* group = block + j0 * kProducts;
        for (int k = 0; k < kProducts; ++k) {
#pragma GCC unroll 8
          for (int64_t l = 0; l < kLanes; ++l) {
            float& sum = sums[k * stride + j0 + l];
            sum = (first ? 0.0f : sum) + group[k * kLanes + l];
          }
        }
      }
      if (panel_vec < panel_end) {
        const int64_t lanes = p - vec;
        const float* group = block + vec * kProducts;
        for (int k = 0; k < kProducts; ++k) {
          for (int64_t l = 0; l < lanes; ++l) {
            float& sum = sums[k * stride + vec + l];
            sum = (first ? 0.0f : sum) + group[k * lanes + l];
          }
        }
      }
    }
  }
}

typedef int32_t LaneMask __attribute__((vector_size(kLanes * sizeof(int32_t))));
constexpr LaneMask kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7};

// Adds the products of `len` contiguous elements (a segment of one run, starting at a multiple of
// kLanes within the run) to the lane sums at `acc` (layout [product][lane]): element j goes to
// lane j % kLanes, except the last len % kLanes elements: they are read as the vector of the
// segment's last kLanes elements, with the lanes already added set to +0 (so element j goes to
// lane j - len + kLanes; adding +0 leaves a sum unchanged but for the sign of a zero). That load
// reaches back before the segment where len < kLanes, so the run must hold kLanes elements
// before the segment's end: runs are at least kShortRun long. The six sums stay in registers.
// Building the last vector from scalars instead (in memory or by lane) took 3-4x as long per
// element for runs of 12 or 20.
[[gnu::always_inline]] inline void AccumulateSegment(const float* __restrict x,
                                                     const float* __restrict y,
                                                     const float* __restrict z, int64_t len,
                                                     int64_t readable, float* __restrict acc) {
  Lanes a0, a1, a2, a3, a4, a5, xv, yv, zv;
  LoadLanes(&a0, acc);
  LoadLanes(&a1, acc + kLanes);
  LoadLanes(&a2, acc + 2 * kLanes);
  LoadLanes(&a3, acc + 3 * kLanes);
  LoadLanes(&a4, acc + 4 * kLanes);
  LoadLanes(&a5, acc + 5 * kLanes);
  const auto add = [&] {
    a0 += xv * xv;
    a1 += xv * yv;
    a2 += yv * yv;
    a3 += xv * zv;
    a4 += yv * zv;
    a5 += zv * zv;
  };
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    if (j % kLineFloats == 0 && j + kRunPrefetch < readable) {
      __builtin_prefetch(x + j + kRunPrefetch);
      __builtin_prefetch(y + j + kRunPrefetch);
      __builtin_prefetch(z + j + kRunPrefetch);
    }
    LoadLanes(&xv, x + j);
    LoadLanes(&yv, y + j);
    LoadLanes(&zv, z + j);
    add();
  }
  if (j < len) {
    const int32_t skip = static_cast<int32_t>(kLanes - (len - j));
    const LaneMask keep = kLaneIndex >= skip;
    LoadLanes(&xv, x + len - kLanes);
    LoadLanes(&yv, y + len - kLanes);
    LoadLanes(&zv, z + len - kLanes);
    xv = reinterpret_cast<Lanes>(reinterpret_cast<LaneMask>(xv) & keep);
    yv = reinterpret_cast<Lanes>(reinterpret_cast<LaneMask>(yv) & keep);
    zv = reinterpret_cast<Lanes>(reinterpret_cast<LaneMask>(zv) & keep);
    add();
  }
  StoreLanes(acc, &a0);
  StoreLanes(acc + kLanes, &a1);
  StoreLanes(acc + 2 * kLanes, &a2);
  StoreLanes(acc + 3 * kLanes, &a3);
  StoreLanes(acc + 4 * kLanes, &a4);
  StoreLanes(acc + 5 * kLanes, &a5);
}

// The layout of one slice x[o] of shape (N1, I, N2) for the run loop. A point's N1 * N2 elements
// are read as N1 * segments pieces q = n1 * segments + s (segment s of run n1); a chunk is a range
// of q, summed in blocks of block_pieces pieces.
struct RunShape {
  int64_t inner;         // I
  int64_t run;           // N2
  int64_t segments;      // ceil(N2 / kSegment)
  int64_t block_pieces;  // pieces per block: whole runs where a run is short, else one segment
  int64_t elements;      // N1 * I * N2: how far from a slice's start the loop may prefetch
};

// Stores the sums of pieces [q_begin, q_end) of the I points of one slice (plus 0) in `sums`
// (product k at sums + k * stride), reading the slice in memory order: row n1, then point i,
// then the run's segments. Per point the pieces
// are summed in order into kLanes lanes per product: in a block (zeroed at its start), whose
// lanes are then added to the chunk's lanes, which are finally added up in a fixed tree. So each
// point's sum is the same sequence of float32 operations in both variants and whatever I is.
// `scratch` holds 2 * I * kPointLanes floats.
[[gnu::always_inline]] inline void AccumulateRunsBody(const float* __restrict w,
                                                      const float* __restrict g,
                                                      const float* __restrict b,
                                                      const RunShape& shape, int64_t q_begin,
                                                      int64_t q_end, float* __restrict sums,
                                                      int64_t stride, float* __restrict scratch) {
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
          AccumulateSegment(w + offset, g + offset, b + offset, len, shape.elements - offset,
                            block + i * kPointLanes);
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
      const float tree = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
      sums[k * stride + i] = 0.0f + tree;
    }
  }
}

// Rows of runs: where each point is one run (I == 1, so N1 == 1) and has one chunk, stores the
// sums of points (rows) [row_begin, row_end) (plus 0) at sums + k * stride + row. The same float32
// operations as AccumulateRunsBody (lanes from 0, each segment a block added to them, the same
// tree), in registers and for many rows per call: through AccumulateRunsBody, one call and its
// scratch per row, rows of 16 or 64 elements took 2.5-4x the time of a plain read.
[[gnu::always_inline]] inline void AccumulateRowRunsBody(const float* __restrict w,
                                                         const float* __restrict g,
                                                         const float* __restrict b, int64_t run,
                                                         int64_t row_begin, int64_t row_end,
                                                         float* __restrict sums, int64_t stride) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t start = row * run;
    Lanes lanes[kProducts] = {};
    for (int64_t s = 0; s < run; s += kSegment) {
      float block[kPointLanes] = {};
      AccumulateSegment(w + start + s, g + start + s, b + start + s, std::min(kSegment, run - s),
                        row_end * run - start - s, block);
      for (int k = 0; k < kProducts; ++k) {
        Lanes add;
        LoadLanes(&add, block + k * kLanes);
        lanes[k] += add;
      }
    }
    for (int k = 0; k < kProducts; ++k) {
      const Lanes& l = lanes[k];
      const float tree = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
      sums[k * stride + row] = 0.0f + tree;
    }
  }
}

using AccumulateRowsFn = void (*)(const float*, const float*, const float*, int64_t, int64_t,
                                  int64_t, float*, int64_t, float*);
using AccumulateRunsFn = void (*)(const float*, const float*, const float*, const RunShape&,
                                  int64_t, int64_t, float*, int64_t, float*);
using AccumulateRowRunsFn = void (*)(const float*, const float*, const float*, int64_t, int64_t,
                                     int64_t, float*, int64_t);

struct Variant {
  const char* name;
  AccumulateRowsFn rows;
  AccumulateRunsFn runs;
  AccumulateRowRunsFn row_runs;
};

void AccumulateRowsBaseline(const float* w, const float* g, const float* b, int64_t p,
                            int64_t row_begin, int64_t row_end, float* sums, int64_t stride,
                            float* block) {
  AccumulateRowsBody(w, g, b, p, row_begin, row_end, sums, stride, block);
}

void AccumulateRunsBaseline(const float* w, const float* g, const float* b, const RunShape& shape,
                            int64_t q_begin, int64_t q_end, float* sums, int64_t stride,
                            float* scratch) {
  AccumulateRunsBody(w, g, b, shape, q_begin, q_end, sums, stride, scratch);
}

void AccumulateRowRunsBaseline(const float* w, const float* g, const float* b, int64_t run,
                               int64_t row_begin, int64_t row_end, float* sums, int64_t stride) {
  AccumulateRowRunsBody(w, g, b, run, row_begin, row_end, sums, stride);
}

#ifdef GRASSMANN_HAVE_AVX2_VARIANT
// 256-bit vectors where the processor has them (the x86-64 baseline is 128-bit SSE2). Measured
// on the WRN-28-10 tree on a 2-core AMD EPYC, AVX2 takes the pass from about 16 ms to 13 ms, near
// the time XLA needs only to read the three arrays once; AVX-512 was no faster.
__attribute__((target("avx2"))) void AccumulateRowsAvx2(const float* w, const float* g,
                                                        const float* b, int64_t p,
                                                        int64_t row_begin, int64_t row_end,
                                                        float* sums, int64_t stride,
                                                        float* block) {
  AccumulateRowsBody(w, g, b, p, row_begin, row_end, sums, stride, block);
}

__attribute__((target("avx2"))) void AccumulateRunsAvx2(const float* w, const float* g,
                                                        const float* b, const RunShape& shape,
                                                        int64_t q_begin, int64_t q_end,
                                                        float* sums, int64_t stride,
                                                        float* scratch) {
  AccumulateRunsBody(w, g, b, shape, q_begin, q_end, sums, stride, scratch);
}

__attribute__((target("avx2"))) void AccumulateRowRunsAvx2(const float* w, const float* g,
                                                           const float* b, int64_t run,
                                                           int64_t row_begin, int64_t row_end,
                                                           float* sums, int64_t stride) {
  AccumulateRowRunsBody(w, g, b, run, row_begin, row_end, sums, stride);
}
#endif

// The variant for this processor, chosen once when the library is loaded
// (grassmann_kernel::UseAvx2).
Variant SelectVariant() {
#ifdef GRASSMANN_HAVE_AVX2_VARIANT
  if (grassmann_kernel::UseAvx2()) {
    return {"avx2", AccumulateRowsAvx2, AccumulateRunsAvx2, AccumulateRowRunsAvx2};
  }
#endif
  return {"baseline", AccumulateRowsBaseline, AccumulateRunsBaseline, AccumulateRowRunsBaseline};
}

const Variant kVariant = SelectVariant();

// Shared by the calling thread and the pool tasks; a task that starts after the call has
// returned finds no task left and only drops its reference.
//
// The work is O * chunks units (o, c), unit o * chunks + c summing chunk c of slice x[o] into
// its own [6][width] sums. The chunks of a slice depend on its shape and on O only. A task is
// `group` consecutive units: one where a slice has several chunks, else as many slices as make
// about kChunkElements elements, so that a stack of many small slices is not one task per slice.
struct Work {
  const float* w;
  const float* g;
  const float* b;
  int64_t slice;   // elements per o: N1 * I * N2
  int64_t width;   // sums per product of a unit: I, or I * N2 for short runs
  bool by_runs;    // the run loop; else the column loop over `width` columns
  bool row_runs;   // the run loop over rows, each a point with one chunk
  RunShape shape;  // for the run loop
  int64_t pieces;  // what chunks split: rows, or rows * segments for the run loop
  int64_t chunks;  // per o
  int64_t units;
  int64_t group;
  int64_t tasks;
  std::unique_ptr<float[]> sums_buffer;
  float* sums = nullptr;  // unit u's [6][width] sums at sums + u * 6 * width
  // Where there is one chunk per o and no short runs, x[o]'s sums go straight to the result.
  float* result = nullptr;
  int64_t points;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    std::vector<float> scratch;
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      scratch.resize(by_runs ? 2 * kPointLanes * shape.inner : kProducts * width);
      const int64_t stop = std::min(units, (t + 1) * group);
      if (row_runs) {
        kVariant.row_runs(w, g, b, shape.run, t * group, stop, result, points);
        done.fetch_add(1, std::memory_order_release);
        continue;
      }
      for (int64_t u = t * group; u < stop; ++u) {
        const int64_t o = u / chunks, c = u % chunks;
        const int64_t offset = o * slice;
        const int64_t begin = pieces * c / chunks, end = pieces * (c + 1) / chunks;
        float* unit_sums = result ? result + o * width : sums + u * kProducts * width;
        const int64_t stride = result ? points : width;
        if (by_runs) {
          kVariant.runs(w + offset, g + offset, b + offset, shape, begin, end, unit_sums, stride,
                        scratch.data());
        } else {
          kVariant.rows(w + offset, g + offset, b + offset, width, begin, end, unit_sums, stride,
                        scratch.data());
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Three ways through the (O, N1, I, N2) view:
// - N2 == 1 (columns): the column loop on each (N1, I) matrix x[o].
// - N2 >= kShortRun: the run loop.
// - 1 < N2 < kShortRun: the column loop on each (N1, I * N2) matrix, whose column sums are then
//   added N2 at a time in order. Measured on one thread of this project's 2-core AMD EPYC (7 MB,
//   in L3), the run loop took 3.4x (N2 = 8) and 20x (N2 = 4) the time of a plain read, where
//   each run is one vector or less; this way takes about 2.1-2.3x. From N2 = 16 the run loop is
//   as fast or faster (2.1x) and gains with N2 (1.3-1.7x at 64, 1.1-1.3x at 2304).
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
  work->by_runs = run >= kShortRun;
  const bool short_runs = run > 1 && !work->by_runs;
  work->width = short_runs ? inner * run : inner;
  const int64_t segments = (run + kSegment - 1) / kSegment;
  work->shape = {inner, run, segments,
                 segments > 1 ? 1 : std::max<int64_t>(1, kBlockElements / run),
                 reduced * inner * run};
  work->pieces = work->by_runs ? reduced * segments : reduced;
  // A stack of slices shares the kMaxChunks (O == 1 keeps every chunk of a single matrix): each
  // chunk's sums take 6 * width floats, and with the chunks of each matrix of a (12, 768, 3072)
  // stack (32 MiB of sums, page-faulted in on every call) the pass took 1.46x the time XLA needs
  // to read the three arrays, with the 64 shared 0.96x (2 threads).
  const int64_t max_chunks = std::max<int64_t>(1, kMaxChunks / outer);
  work->chunks = std::clamp<int64_t>(work->slice / kChunkElements, 1,
                                     std::min<int64_t>(max_chunks, work->pieces));
  work->units = outer * work->chunks;
  work->group = work->chunks > 1 ? 1 : std::max<int64_t>(1, kChunkElements / work->slice);
  work->tasks = (work->units + work->group - 1) / work->group;
  // Every unit writes all its sums, so the buffer is not zeroed. With one chunk per o, a unit's
  // sums are the result: written there directly, the bits of 0 plus them (they are never -0), and
  // without a pass over a buffer of 6 * O * width floats, which for rows of 16 or 64 elements
  // took most of the time.
  const int64_t width = work->width;
  work->points = points;
  const bool direct = work->chunks == 1 && !short_runs;
  work->result = direct ? result : nullptr;
  work->row_runs = direct && work->by_runs && inner == 1;
  if (!direct) {
    work->sums_buffer.reset(new float[work->units * kProducts * width]);
    work->sums = work->sums_buffer.get();
  }
  grassmann_kernel::RunOnPool(pool, work);

  if (direct) return ffi::Error::Success();
  // Point (o, i) is result column o * I + i: 0 plus the sums of the chunks of o in order (the
  // loop over columns innermost, so that it reads the sums in order and vectorizes); for short
  // runs, then 0 plus the N2 column sums of the point in order.
  const int64_t chunks = work->chunks;
  std::vector<float> columns(short_runs ? width : 0);
  for (int k = 0; k < kProducts; ++k) {
    for (int64_t o = 0; o < outer; ++o) {
      float* __restrict total = short_runs ? columns.data() : result + k * points + o * inner;
      std::fill(total, total + width, 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* __restrict chunk = work->sums + ((o * chunks + c) * kProducts + k) * width;
        for (int64_t j = 0; j < width; ++j) total[j] += chunk[j];
      }
      if (!short_runs) continue;
      for (int64_t i = 0; i < inner; ++i) {
        float sum = 0.0f;
        for (int64_t n2 = 0; n2 < run; ++n2) sum += total[i * run + n2];
        result[k * points + o * inner + i] = sum;
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
