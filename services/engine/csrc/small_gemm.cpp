// y = x W^T (+ bias) for the few rows of a decode step, weights in bfloat16 or float32.
//
// Without native bfloat16 instructions (no AVX512-BF16/AMX), oneDNN's bfloat16 matmul for a
// handful of rows runs at about half its float32 speed. Here every weight is widened to float32
// in registers as it is read (a bfloat16 is the top half of a float: a shift), and multiplied
// into float32 accumulators held in registers for a block of rows, so each weight is read
// from memory once per block of rows and each row's input once per 32 outputs.
//
// The weight is packed once at load time (services/engine/paged_decode.py: pack_weight) as
// [ceil(N / 32), K, 32]: tile t holds outputs 32t..32t+31 (zero-padded past N), one k after
// the other, so a tile is one sequential stream of 64 (bfloat16) or 128 (float32) bytes per k.
// Rows are cut into blocks of at most kMaxRows; the input is widened to float32 once.
// Accumulation is in float32, in k order, then the bias (float32) is added and the result is
// rounded once to the output dtype (round to nearest even), as oneDNN does.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

typedef float Vec __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
constexpr int64_t kTile = 32;  // outputs per tile: two 16-float vectors
constexpr int64_t kChunkFloats = 32768;  // input rows kept in cache at once: 128 KiB
#ifdef __AVX512F__
constexpr int kMaxRows = 12;  // 24 accumulators + 2 weights in 32 registers
#else
constexpr int kMaxRows = 3;  // 16 AVX2 registers: a Vec is two of them
#endif

inline Vec widen(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec widen(const BFloat16* p) {
  U16x16 h;
  std::memcpy(&h, p, sizeof(h));
  U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, BFloat16* out) { *out = BFloat16(x); }

// R rows of x (float32, row stride xs) times one weight tile [K][32]: out[r][0..n) (+ bias).
// With few rows, U interleaved k streams (summed at the end) keep enough independent
// multiply-adds in flight to hide their latency.
template <typename W, typename T, int R>
void micro(const float* x, int64_t xs, const W* w, int64_t K, const float* bias, int64_t n,
           T* out, int64_t os) {
  constexpr int U = R <= 2 ? 4 : (R <= 4 ? 2 : 1);
  Vec a0[U][R], a1[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) a0[u][r] = a1[u][r] = Vec{};
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u) {
      const Vec w0 = widen(w + (k + u) * kTile), w1 = widen(w + (k + u) * kTile + 16);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * xs + k + u];
        a0[u][r] += xv * w0;
        a1[u][r] += xv * w1;
      }
    }
  }
  for (; k < K; ++k) {
    const Vec w0 = widen(w + k * kTile), w1 = widen(w + k * kTile + 16);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * xs + k];
      a0[0][r] += xv * w0;
      a1[0][r] += xv * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 1; u < U; ++u) a0[0][r] += a0[u][r], a1[0][r] += a1[u][r];
    float y[kTile];
    std::memcpy(y, &a0[0][r], sizeof(Vec));
    std::memcpy(y + 16, &a1[0][r], sizeof(Vec));
    for (int64_t j = 0; j < n; ++j) narrow(bias ? y[j] + bias[j] : y[j], out + r * os + j);
  }
}

template <typename W, typename T, int R = kMaxRows>
void micro_rows(int rows, const float* x, int64_t xs, const W* w, int64_t K, const float* bias,
                int64_t n, T* out, int64_t os) {
  if constexpr (R > 1) {
    if (rows < R) return micro_rows<W, T, R - 1>(rows, x, xs, w, K, bias, n, out, os);
  }
  micro<W, T, R>(x, xs, w, K, bias, n, out, os);
}

template <typename T>
void to_float(const T* src, int64_t rows, int64_t K, int64_t stride, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) dst[r * K + k] = static_cast<float>(src[r * stride + k]);
}

template <typename T, typename W>
void run(const Tensor& x, const Tensor& packed, const Tensor& bias, Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const int64_t tiles = packed.size(0);
  std::vector<float> xf(M * K);
  to_float(x.const_data_ptr<T>(), M, K, x.stride(0), xf.data());
  std::vector<float> bf;
  if (bias.numel()) {
    bf.resize(N);
    to_float(bias.const_data_ptr<T>(), 1, N, N, bf.data());
  }
  const W* wp = packed.const_data_ptr<W>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t os = out.stride(0);
  // Row blocks of about equal size: 16 rows run as 8 + 8, not 12 + 4.
  const int64_t blocks = (M + kMaxRows - 1) / kMaxRows;
  const int64_t per_block = blocks ? (M + blocks - 1) / blocks : 0;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, M * K / 64));
  // Many rows (a prefill): a chunk of rows at a time, so its input stays in cache while
  // every tile of the thread passes over it.
  const int64_t chunk = std::max(per_block, kChunkFloats / std::max<int64_t>(1, K) / per_block * per_block);
  torch::stable::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
      const int64_t c1 = std::min(M, c0 + chunk);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTile, n = std::min(kTile, N - n0);
        const float* b = bf.empty() ? nullptr : bf.data() + n0;
        for (int64_t r0 = c0; r0 < c1; r0 += per_block) {
          const int rows = static_cast<int>(std::min(per_block, c1 - r0));
          micro_rows<W, T>(rows, xf.data() + r0 * K, K, wp + t * K * kTile, K, b, n,
                           op + r0 * os + n0, os);
        }
      }
    }
  });
}

void small_gemm(const Tensor& x, const Tensor& packed, const Tensor& bias, Tensor& out) {
  STD_TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, K], K contiguous");
  STD_TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(1) == x.size(1) &&
                      packed.size(2) == kTile,
                  "packed must be a contiguous [ceil(N / 32), K, 32]");
  STD_TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.stride(1) == 1 &&
                      out.size(1) <= packed.size(0) * kTile &&
                      out.size(1) > (packed.size(0) - 1) * kTile,
                  "out must be [rows, N] with N matching packed");
  STD_TORCH_CHECK(out.scalar_type() == x.scalar_type(), "x and out must share a dtype");
  STD_TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 1 && bias.size(0) == out.size(1) &&
                                        bias.is_contiguous() &&
                                        bias.scalar_type() == x.scalar_type()),
                  "bias must be empty or a contiguous [N] of x's dtype");
  const ScalarType xt = x.scalar_type(), wt = packed.scalar_type();
  if (xt == ScalarType::BFloat16 && wt == ScalarType::BFloat16)
    run<BFloat16, BFloat16>(x, packed, bias, out);
  else if (xt == ScalarType::Float && wt == ScalarType::Float)
    run<float, float>(x, packed, bias, out);
  else
    STD_TORCH_CHECK(false, "small_gemm supports float32 and bfloat16 (x and weight alike)");
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(banaserve, m) {
  m.def("small_gemm(Tensor x, Tensor packed, Tensor bias, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(banaserve, CPU, m) { m.impl("small_gemm", TORCH_BOX(&small_gemm)); }
