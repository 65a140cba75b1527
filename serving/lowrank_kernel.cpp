// The row adapters' low-rank update on the CPU, fused: for every row t of x,
// y[t] += (x[t] A^T) B^T (lowrank_update_), or the whole layer, x W^T + bias + (x A^T) B^T
// (lowrank_linear: y written as bias + (x A^T) B^T, then the GEMM accumulating x W^T into it).
//
// BLAS runs the update as two narrow GEMMs (x A^T, then an addmm into y) that use a fraction
// of a core and barely spread over threads. Here each row (each pair of rows with AVX-512) is
// read once and its r inner products stay in registers (float32), and rows are split among
// torch's threads. One source, built once per instruction set: with -mavx512f it runs 16 lanes
// and two rows at a time; with -mavx2 -mfma only, 8 lanes and one row (AVX2's 16 registers
// hold one row's eight sums and its operands; two rows with four sums each were no faster on
// two threads: serve_profile.md, tenth session).
// Both functions answer false or None, changing nothing, for inputs they do not handle (the
// caller then runs BLAS): not float32 CPU tensors, a rank above 64, widths not multiples of
// 16, or a layout other than each row of x and y contiguous, A contiguous (rank x in) and B
// with its transpose contiguous (out x rank, stored as rank x out).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kMaxRank = 64;
constexpr int64_t kGrain = 16;  // rows per task of the thread pool

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
using Vec = __m512;
constexpr int64_t kLanes = 16;
constexpr int kRowsAtOnce = 2;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vsplat(float f) { return _mm512_set1_ps(f); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline __m256 halves_added(Vec v) {
  __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return _mm256_add_ps(_mm512_castps512_ps256(v), high);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
using Vec = __m256;
constexpr int64_t kLanes = 8;
constexpr int kRowsAtOnce = 1;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vsplat(float f) { return _mm256_set1_ps(f); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 halves_added(Vec v) { return v; }
#else
#error "the low-rank kernel is built with -mavx512f or with -mavx2 -mfma"
#endif

// The sums of eight vectors, as the eight lanes of one.
inline __m256 sums_of_8(const Vec* v) {
  __m256 half[8];
  for (int j = 0; j < 8; ++j) half[j] = halves_added(v[j]);
  __m256 a = _mm256_hadd_ps(half[0], half[1]), b = _mm256_hadd_ps(half[2], half[3]);
  __m256 c = _mm256_hadd_ps(half[4], half[5]), d = _mm256_hadd_ps(half[6], half[7]);
  __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

struct Update {
  const float* x;
  const float* a;
  const float* bt;
  float* y;
  int64_t in, out, rank, x_stride, y_stride;
  const float* bias;  // with store: y = bias + h B^T (bias may be null); else y += h B^T
  bool store;

  // Rows row .. row + R - 1.
  template <int R>
  void rows(int64_t row) const {
    alignas(32) float h[R][kMaxRank];
    for (int64_t j0 = 0; j0 < rank; j0 += 8) {
      const int64_t count = std::min<int64_t>(8, rank - j0);  // rows of A in this block
      Vec acc[R][8];
      for (int k = 0; k < R; ++k)
        for (int j = 0; j < 8; ++j) acc[k][j] = vzero();
      if (count == 8) {
        for (int64_t i = 0; i < in; i += kLanes) accumulate<R, 8>(acc, row, j0, i);
      } else {
        for (int64_t i = 0; i < in; i += kLanes) accumulate<R, 0>(acc, row, j0, i, count);
      }
      for (int k = 0; k < R; ++k) _mm256_store_ps(&h[k][j0], sums_of_8(acc[k]));
    }
    int64_t o = 0;
    for (; o + 4 * kLanes <= out; o += 4 * kLanes) outputs<R, 4>(row, o, h);
    for (; o < out; o += kLanes) outputs<R, 1>(row, o, h);
  }

  // y[row + k, o : o + kLanes C] for each of the R rows: its bias (store) or its value, plus
  // h[k] B^T; R x C sums at once, so that the FMAs' latency overlaps.
  template <int R, int C>
  void outputs(int64_t row, int64_t o, const float (&h)[R][kMaxRank]) const {
    Vec yv[R][C];
    for (int k = 0; k < R; ++k)
      for (int c = 0; c < C; ++c) {
        float* at = y + (row + k) * y_stride + o + kLanes * c;
        yv[k][c] = !store ? vload(at) : bias ? vload(bias + o + kLanes * c) : vzero();
      }
    for (int64_t j = 0; j < rank; ++j) {
      Vec bv[C];
      for (int c = 0; c < C; ++c) bv[c] = vload(bt + j * out + o + kLanes * c);
      for (int k = 0; k < R; ++k) {
        const Vec hk = vsplat(h[k][j]);
        for (int c = 0; c < C; ++c) yv[k][c] = vfmadd(hk, bv[c], yv[k][c]);
      }
    }
    for (int k = 0; k < R; ++k)
      for (int c = 0; c < C; ++c) vstore(y + (row + k) * y_stride + o + kLanes * c, yv[k][c]);
  }

  // acc[k][j] += x[row + k, i:i+kLanes] * a[j0 + j, i:i+kLanes] for the block's rows of A:
  // all 8 (Count = 8, unrolled) or the first `count` (Count = 0; the others stay 0).
  template <int R, int Count>
  void accumulate(Vec (&acc)[R][8], int64_t row, int64_t j0, int64_t i,
                  int64_t count = 8) const {
    Vec xv[R];
    for (int k = 0; k < R; ++k) xv[k] = vload(x + (row + k) * x_stride + i);
    for (int j = 0; j < (Count ? Count : count); ++j) {
      Vec av = vload(a + (j0 + j) * in + i);
      for (int k = 0; k < R; ++k) acc[k][j] = vfmadd(xv[k], av, acc[k][j]);
    }
  }

  void span(int64_t begin, int64_t end) const {
    int64_t row = begin;
    for (; row + kRowsAtOnce <= end; row += kRowsAtOnce) rows<kRowsAtOnce>(row);
    if (row < end) rows<1>(row);
  }
};

bool handled(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& b,
             const torch::Tensor& a) {
  for (const auto* t : {&y, &x, &b, &a})
    if (t->dim() != 2 || t->scalar_type() != torch::kFloat || !t->device().is_cpu()) return false;
  const int64_t rows = x.size(0), in = x.size(1), rank = a.size(0), out = b.size(0);
  if (rank > kMaxRank || in % 16 != 0 || out % 16 != 0) return false;
  if (a.size(1) != in || b.size(1) != rank || y.size(0) != rows || y.size(1) != out) return false;
  if (x.stride(1) != 1 || y.stride(1) != 1 || (rows > 1 && y.stride(0) < out)) return false;
  return a.is_contiguous() && b.stride(0) == 1 && b.stride(1) == out;
}

void run(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& b,
         const torch::Tensor& a, const float* bias, bool store) {
  const Update update{x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(),
                      y.data_ptr<float>(), x.size(1), b.size(0), a.size(0), x.stride(0),
                      y.stride(0), bias, store};
  const int64_t rows = x.size(0);
  if (rows <= kGrain) {
    update.span(0, rows);
  } else {
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) { update.span(begin, end); });
  }
}

// y = bias + (x a^T) b^T (y = (x a^T) b^T without a bias): y is only written.
bool lowrank_store_(torch::Tensor y, torch::Tensor x, torch::Tensor b, torch::Tensor a,
                    std::optional<torch::Tensor> bias) {
  if (!handled(y, x, b, a)) return false;
  if (bias && (bias->dim() != 1 || bias->size(0) != y.size(1) || !bias->is_contiguous() ||
               bias->scalar_type() != torch::kFloat || !bias->device().is_cpu()))
    return false;
  run(y, x, b, a, bias ? bias->data_ptr<float>() : nullptr, true);
  return true;
}

}  // namespace

// y += (x a^T) b^T.
bool lowrank_update_(torch::Tensor y, torch::Tensor x, torch::Tensor b, torch::Tensor a) {
  if (!handled(y, x, b, a)) return false;
  run(y, x, b, a, nullptr, false);
  return true;
}

// A linear layer with its low-rank update, x W^T + bias + (x a^T) b^T, for x of any leading
// dimensions (the last is the layer's input; the output has x's leading dimensions): the output
// written as the bias plus the update while x is fresh in cache, then the GEMM accumulating x W^T
// into it (the GEMM reads it once as it writes; an update after the GEMM re-reads and rewrites
// all of it). The reshapes are here: in Python a reshape and a view took ~8 us a layer on a slow
// AVX2 machine (serve_profile.md, eleventh session). None where the inputs are not handled.
std::optional<torch::Tensor> lowrank_linear(torch::Tensor x, torch::Tensor weight,
                                            std::optional<torch::Tensor> bias, torch::Tensor b,
                                            torch::Tensor a) {
  if (weight.dim() != 2 || weight.scalar_type() != torch::kFloat || !weight.device().is_cpu() ||
      x.dim() < 1 || weight.size(1) != x.size(-1) || weight.size(0) != b.size(0))
    return std::nullopt;
  const torch::Tensor flat = x.reshape({-1, x.size(-1)});
  torch::Tensor y = torch::empty({flat.size(0), weight.size(0)}, x.options());
  if (!lowrank_store_(y, flat, b, a, bias)) return std::nullopt;
  y.addmm_(flat, weight.t());
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return y.view(sizes);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_update_", &lowrank_update_,
        "y += (x a^T) b^T in place; false (y unchanged) where the inputs are not handled");
  m.def("lowrank_linear", &lowrank_linear,
        "x W^T + bias + (x a^T) b^T for x (..., in); None where the inputs are not handled");
  m.attr("isa") = kIsa;
}
