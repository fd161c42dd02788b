// Adam's moments and the inner products of an AdamH step, in one pass over memory.
//
// The AdamH step (Wen et al. 2025, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
// Hyperball Optimization") moves each point W (a matrix, or a slice of a stack) on the sphere of
// its radius R along Adam's update u. Its per-point coefficients follow from inner products of
// w, u and the new first moment (grassmann_optax/_src/sphere.py), and u from the new moments:
//
//   h = g − c·w (with `tangent`; else h = g),
//   m' = b1·m + (1 − b1)·h,   v' = b2·v + ((1 − b2)·h)·h,   u = (m'/d1) / (sqrt(v'/d2) + eps),
//
// with d1 = 1 − b1^t, d2 = 1 − b2^t and c the per-point coefficient of the tangent projection
// (the 'geodesic' step projects the gradient first). XLA:CPU emits one loop per output: the two
// moments, u and the sums would be four passes that write three arrays of the size of the
// params. This kernel reads w, g, m and v once, writes m' and v' (in place of m and v: native.py
// aliases them), and sums w·w, w·u, u·u, w·m' and u·m' per point without writing u; XLA then
// writes W' (and, for 'geodesic', the transported m') in passes that recompute u from m' and v'.
// For the published step ('normalize') that is AdamW's memory traffic.
//
// The operands are read as (points, size) row-major arrays: each point is `size` contiguous
// elements (native.py uses the kernel only for such layouts). The sums of a point are taken in
// chunks of kChunk elements, each in blocks of kBlock elements summed in kLanes lanes from zero,
// the block lanes added to the chunk's and the chunk's lanes added up in a fixed tree; a point's
// sum is 0 plus its chunks' in order. So the bits depend on the layout only, not on the threads
// (the XLA:CPU intra-op pool and the calling thread claim tasks from a shared counter, as in
// column_gram.cc), and the AVX2 and portable builds return the same bits: both do the same float32
// operations, none contracted into a fused multiply-add (-ffp-contract=off), and IEEE division
// and square root are correctly rounded in every width.
//
// Built at install time into the extension module grassmann_optax._src._column_gram beside
// column_gram.cc (CMakeLists.txt, column_gram_module.cc).

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

constexpr int kSums = 5;  // w·w, w·u, u·u, w·m', u·m'
constexpr int64_t kBlock = 512;
constexpr int64_t kChunk = int64_t{1} << 16;
// Each cache line of the four operands is prefetched kPrefetch elements (2 KiB) ahead, within the
// chunk. Without it, the loop's arithmetic (a square root and a division per element) and its six
// streams overlapped poorly: on 94M elements from memory on two threads of this project's Intel
// Xeon the pass took 57.5 ms without, 50.5 ms at 512 bytes ahead, 47.3 ms at 1 or 2 KiB (a loop
// that only updates the two moments: 58 ms).
constexpr int64_t kPrefetch = 512;
constexpr int64_t kLineFloats = 16;
// The scalars operand: b1, 1 − b1, b2, 1 − b2, eps, d1, d2.
constexpr int64_t kScalars = 7;

// The bias corrections are applied as products with r1 = 1/d1 and r2 = 1/d2: one division per
// element instead of three, which took the loop from 0.93 to 0.62 ns per element on one core of this
// project's Intel Xeon, where the divider bounded it. u differs from XLA's division by d1 and d2
// by an ulp or two, far below the round-off of the sums it enters.
struct Scalars {
  float b1, c1, b2, c2, eps, r1, r2;
};

[[gnu::always_inline]] inline Lanes Sqrt(Lanes v) {
  Lanes r;
#pragma GCC unroll 8
  for (int64_t l = 0; l < kLanes; ++l) r[l] = __builtin_sqrtf(v[l]);
  return r;
}

// The step on eight elements: the new moments (returned in m and v) and Adam's update, from the
// gradient h (already projected where the step asks for it).
[[gnu::always_inline]] inline Lanes Update(const Scalars& s, Lanes h, Lanes& m, Lanes& v) {
  m = s.b1 * m + s.c1 * h;
  v = s.b2 * v + (s.c2 * h) * h;
  return (m * s.r1) / (Sqrt(v * s.r2) + s.eps);
}

// Elements [begin, end) of one point (end − begin at most kChunk), whose tangent coefficient is
// `c`: writes the new moments over `mu` and `nu` (which hold the old ones) and stores the chunk's
// sums in `sums`. Element j of a block goes to lane j % kLanes; the last (end − begin) % kLanes
// elements of the chunk are read into a vector padded with zeros, whose extra lanes are not
// stored and add +0 to every sum (their u is set to 0).
template <bool kTangent>
[[gnu::always_inline]] inline void ChunkBody(const Scalars& s, float c, const float* __restrict w,
                                             const float* __restrict g, float* __restrict mu,
                                             float* __restrict nu, float* __restrict update,
                                             int64_t begin, int64_t end, float* __restrict sums) {
  Lanes total[kSums] = {};
  const auto step = [&](const Lanes& wv, const Lanes& gv, Lanes& m, Lanes& v, int64_t valid,
                        Lanes* block) -> Lanes {
    const Lanes h = kTangent ? gv - c * wv : gv;
    Lanes u = Update(s, h, m, v);
    const Lanes out = u;
    for (int64_t l = valid; l < kLanes; ++l) u[l] = 0.0f;
    block[0] += wv * wv;
    block[1] += wv * u;
    block[2] += u * u;
    block[3] += wv * m;
    block[4] += u * m;
    return out;
  };
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t stop = std::min(start + kBlock, end);
    Lanes block[kSums] = {};
    int64_t j = start;
    for (; j + kLanes <= stop; j += kLanes) {
      if (j % kLineFloats == 0 && j + kPrefetch < end) {
        __builtin_prefetch(w + j + kPrefetch);
        __builtin_prefetch(g + j + kPrefetch);
        __builtin_prefetch(mu + j + kPrefetch, 1);
        __builtin_prefetch(nu + j + kPrefetch, 1);
      }
      Lanes wv, gv, m, v;
      LoadLanes(&wv, w + j);
      LoadLanes(&gv, g + j);
      LoadLanes(&m, mu + j);
      LoadLanes(&v, nu + j);
      const Lanes u = step(wv, gv, m, v, kLanes, block);
      StoreLanes(mu + j, &m);
      StoreLanes(nu + j, &v);
      if (kTangent) StoreLanes(update + j, &u);
    }
    if (j < stop) {
      const int64_t rest = stop - j;
      float wr[kLanes] = {}, gr[kLanes] = {}, mr[kLanes] = {}, vr[kLanes] = {};
      std::memcpy(wr, w + j, rest * sizeof(float));
      std::memcpy(gr, g + j, rest * sizeof(float));
      std::memcpy(mr, mu + j, rest * sizeof(float));
      std::memcpy(vr, nu + j, rest * sizeof(float));
      Lanes wv, gv, m, v;
      LoadLanes(&wv, wr);
      LoadLanes(&gv, gr);
      LoadLanes(&m, mr);
      LoadLanes(&v, vr);
      const Lanes u = step(wv, gv, m, v, rest, block);
      StoreLanes(mr, &m);
      StoreLanes(vr, &v);
      std::memcpy(mu + j, mr, rest * sizeof(float));
      std::memcpy(nu + j, vr, rest * sizeof(float));
      if (kTangent) {
        float ur[kLanes];
        StoreLanes(ur, &u);
        std::memcpy(update + j, ur, rest * sizeof(float));
      }
    }
    for (int k = 0; k < kSums; ++k) total[k] += block[k];
  }
  for (int k = 0; k < kSums; ++k) {
    const Lanes& l = total[k];
    sums[k] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
}

using ChunkFn = void (*)(const Scalars&, float, const float*, const float*, float*, float*,
                         float*, int64_t, int64_t, float*);

struct Variant {
  ChunkFn plain;    // h = g
  ChunkFn tangent;  // h = g − c·w, and u written out
};

void ChunkBaseline(const Scalars& s, float c, const float* w, const float* g, float* mu, float* nu,
                   float* update, int64_t begin, int64_t end, float* sums) {
  ChunkBody<false>(s, c, w, g, mu, nu, update, begin, end, sums);
}

void ChunkTangentBaseline(const Scalars& s, float c, const float* w, const float* g, float* mu,
                          float* nu, float* update, int64_t begin, int64_t end, float* sums) {
  ChunkBody<true>(s, c, w, g, mu, nu, update, begin, end, sums);
}

#ifdef GRASSMANN_HAVE_AVX2_VARIANT
__attribute__((target("avx2"))) void ChunkAvx2(const Scalars& s, float c, const float* w,
                                               const float* g, float* mu, float* nu, float* update,
                                               int64_t begin, int64_t end, float* sums) {
  ChunkBody<false>(s, c, w, g, mu, nu, update, begin, end, sums);
}

__attribute__((target("avx2"))) void ChunkTangentAvx2(const Scalars& s, float c, const float* w,
                                                      const float* g, float* mu, float* nu,
                                                      float* update, int64_t begin, int64_t end,
                                                      float* sums) {
  ChunkBody<true>(s, c, w, g, mu, nu, update, begin, end, sums);
}
#endif

// The same choice as column_gram.cc (grassmann_kernel::UseAvx2).
Variant SelectVariant() {
#ifdef GRASSMANN_HAVE_AVX2_VARIANT
  if (grassmann_kernel::UseAvx2()) return {ChunkAvx2, ChunkTangentAvx2};
#endif
  return {ChunkBaseline, ChunkTangentBaseline};
}

const Variant kVariant = SelectVariant();

// Shared by the calling thread and the pool tasks (see column_gram.cc). Unit c is chunk
// c % chunks of point c / chunks; a task is `group` consecutive units, so that a stack of many
// small points is not one task per point.
struct Work {
  Scalars s;
  ChunkFn chunk;
  const float* coefficients;  // c, per point
  const float* w;
  const float* g;
  float* mu;
  float* nu;
  float* update;   // u, written with the tangent projection; else nullptr
  int64_t size;    // elements per point
  int64_t chunks;  // per point
  int64_t units;
  int64_t group;
  int64_t tasks;
  std::unique_ptr<float[]> sums;  // unit c's sums at sums + c * kSums
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t stop = std::min(units, (t + 1) * group);
      for (int64_t c = t * group; c < stop; ++c) {
        const int64_t offset = c / chunks * size;
        const int64_t begin = c % chunks * kChunk, end = std::min(size, begin + kChunk);
        chunk(s, coefficients[c / chunks], w + offset, g + offset, mu + offset, nu + offset,
              update ? update + offset : nullptr, begin, end, sums.get() + c * kSums);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error AdamProductsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g,
                            ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                            ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> scalars,
                            ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out,
                            ffi::ResultBuffer<ffi::F32> u_out, ffi::ResultBuffer<ffi::F32> out,
                            int64_t points, bool tangent) {
  const int64_t total = static_cast<int64_t>(w.element_count());
  if (points <= 0 || total % points != 0 || static_cast<int64_t>(g.element_count()) != total ||
      static_cast<int64_t>(mu.element_count()) != total ||
      static_cast<int64_t>(nu.element_count()) != total ||
      static_cast<int64_t>(mu_out->element_count()) != total ||
      static_cast<int64_t>(nu_out->element_count()) != total ||
      static_cast<int64_t>(u_out->element_count()) != (tangent ? total : 0) ||
      static_cast<int64_t>(c.element_count()) != points ||
      static_cast<int64_t>(scalars.element_count()) != kScalars ||
      static_cast<int64_t>(out->element_count()) != kSums * points) {
    return ffi::Error::InvalidArgument("adam_products: operands or layout of different sizes");
  }
  // The moments are updated where the results are; native.py aliases them to the old moments,
  // and where XLA did not, they are copied there first.
  float* m = mu_out->typed_data();
  float* v = nu_out->typed_data();
  if (m != mu.typed_data()) std::memcpy(m, mu.typed_data(), total * sizeof(float));
  if (v != nu.typed_data()) std::memcpy(v, nu.typed_data(), total * sizeof(float));
  const float* k = scalars.typed_data();
  float* result = out->typed_data();
  const int64_t size = total / points;
  if (size == 0) {
    std::fill(result, result + kSums * points, 0.0f);
    return ffi::Error::Success();
  }

  auto work = std::make_shared<Work>();
  work->s = {k[0], k[1], k[2], k[3], k[4], 1.0f / k[5], 1.0f / k[6]};
  work->chunk = tangent ? kVariant.tangent : kVariant.plain;
  work->coefficients = c.typed_data();
  work->w = w.typed_data();
  work->g = g.typed_data();
  work->mu = m;
  work->nu = v;
  work->update = tangent ? u_out->typed_data() : nullptr;
  work->size = size;
  work->chunks = (size + kChunk - 1) / kChunk;
  work->units = points * work->chunks;
  work->group = work->chunks > 1 ? 1 : std::max<int64_t>(1, kChunk / size);
  work->tasks = (work->units + work->group - 1) / work->group;
  work->sums.reset(new float[work->units * kSums]);
  grassmann_kernel::RunOnPool(pool, work);

  // Result [k, p]: 0 plus the sums of point p's chunks, in order.
  const int64_t chunks = work->chunks;
  for (int64_t p = 0; p < points; ++p) {
    for (int k = 0; k < kSums; ++k) {
      float sum = 0.0f;
      for (int64_t j = 0; j < chunks; ++j) sum += work->sums[(p * chunks + j) * kSums + k];
      result[k * points + p] = sum;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// Operands w, g, m, v (float32, `points` points of equal size, contiguous), the (points,) tangent
// coefficients c (read where `tangent`) and the seven scalars; results m', v', u (where
// `tangent`; else an empty array) and the (5, points) sums [w·w, w·u, u·u, w·m', u·m'].
XLA_FFI_DEFINE_HANDLER_SYMBOL(GrassmannAdamProducts, AdamProductsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("points")
                                  .Attr<bool>("tangent"));
