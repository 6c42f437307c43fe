// Fused elementwise ops of a Llama decoder layer, float32, one pass each where torch takes
// several (services/engine/models/fused.py says when they are used):
//
// - rms_norm:     out = x / sqrt(mean(x^2) + eps) * w                      (torch: ~6 passes)
// - add_rms_norm: x += r (in place), then out = rms_norm(x)                (an add, then as above)
// - silu_mul:     out = silu(gate) * up, gate_up = [gate | up] per row      (silu, then mul)
// - rotary:       x = x * cos + rotate_half(x) * sin, in place, per row     (mul, neg, cat, mul, add)
//
// Rows are independent and short (a hidden state, a head): each is read once into cache and
// written once. Sums of squares accumulate in float32 lanes, so results differ from torch's
// only in the order of float32 additions; silu's exp is the Cephes polynomial (~1 ulp).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

typedef float Vec __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0, 16 at a time (Cephes expf polynomial, ~1 ulp; 0 below -87).
inline Vec exp_nonpositive(Vec x) {
  const Vec zero = {};
  const I32x16 underflow = x < zero - 87.0f;
  x = underflow ? zero - 87.0f : x;
  const Vec fx = x * 1.44269504088896341f + 0.5f;
  I32x16 n = __builtin_convertvector(fx, I32x16);
  n += __builtin_convertvector(n, Vec) > fx;  // floor for negatives (true is -1)
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I32x16 bits = (n + 127) << 23;
  Vec two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? zero : p * two_n;
}

// silu(g) = g / (1 + e^-g); with e = e^-|g|: g / (1 + e) for g >= 0, g e / (1 + e) below.
inline Vec silu(Vec g) {
  const Vec zero = {};
  const I32x16 neg = g < zero;
  const Vec e = exp_nonpositive(neg ? g : zero - g);
  return (neg ? g * e : g) / (e + 1.0f);
}

inline float silu(float g) {
  const float e = std::exp(-std::fabs(g));
  return (g < 0 ? g * e : g) / (e + 1.0f);
}

void check_rows(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1 && t.scalar_type() == ScalarType::Float,
                  name, " must be float32 [rows, size] with contiguous rows");
}

// out = x / sqrt(mean(x^2) + eps) * w for one row; x may be out.
inline void norm_row(const float* x, const float* w, float eps, int64_t h, float* out) {
  Vec acc = {};
  int64_t j = 0;
  for (; j + kLanes <= h; j += kLanes) {
    const Vec v = load(x + j);
    acc += v * v;
  }
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += acc[i];
  for (; j < h; ++j) sum += x[j] * x[j];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
  j = 0;
  for (; j + kLanes <= h; j += kLanes) store(out + j, load(x + j) * inv * load(w + j));
  for (; j < h; ++j) out[j] = x[j] * inv * w[j];
}

void check_norm(const Tensor& x, const Tensor& weight, const Tensor& out) {
  check_rows(x, "x");
  check_rows(out, "out");
  STD_TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() &&
                      weight.scalar_type() == ScalarType::Float && weight.size(0) == x.size(1),
                  "weight must be a contiguous float32 [size]");
  STD_TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1), "out must match x");
}

void rms_norm(const Tensor& x, const Tensor& weight, double eps, Tensor& out) {
  check_norm(x, weight, out);
  const int64_t rows = x.size(0), h = x.size(1);
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    norm_row(xp + r * x.stride(0), wp, static_cast<float>(eps), h, op + r * out.stride(0));
}

void add_rms_norm(Tensor& x, const Tensor& residual, const Tensor& weight, double eps,
                  Tensor& out) {
  check_norm(x, weight, out);
  check_rows(residual, "residual");
  STD_TORCH_CHECK(residual.size(0) == x.size(0) && residual.size(1) == x.size(1),
                  "residual must match x");
  const int64_t rows = x.size(0), h = x.size(1);
  const float* wp = weight.const_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x.mutable_data_ptr<float>() + r * x.stride(0);
    const float* rr = residual.const_data_ptr<float>() + r * residual.stride(0);
    int64_t j = 0;
    for (; j + kLanes <= h; j += kLanes) store(xr + j, load(xr + j) + load(rr + j));
    for (; j < h; ++j) xr[j] += rr[j];
    norm_row(xr, wp, static_cast<float>(eps), h, out.mutable_data_ptr<float>() + r * out.stride(0));
  }
}

void silu_mul(const Tensor& gate_up, Tensor& out) {
  check_rows(gate_up, "gate_up");
  check_rows(out, "out");
  const int64_t rows = gate_up.size(0), n = out.size(1);
  STD_TORCH_CHECK(out.size(0) == rows && gate_up.size(1) == 2 * n,
                  "gate_up must be [rows, 2 n] for out [rows, n]");
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up.const_data_ptr<float>() + r * gate_up.stride(0);
    const float* u = g + n;
    float* o = out.mutable_data_ptr<float>() + r * out.stride(0);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) store(o + j, silu(load(g + j)) * load(u + j));
    for (; j < n; ++j) o[j] = silu(g[j]) * u[j];
  }
}

// x [rows, heads, d] (d contiguous), cos/sin [rows, d] contiguous: x = x cos + rotate_half(x) sin,
// rotate_half(x) = [-x2, x1] for the halves x1, x2 of each head.
void rotary(Tensor& x, const Tensor& cos, const Tensor& sin) {
  STD_TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.scalar_type() == ScalarType::Float,
                  "x must be float32 [rows, heads, d] with contiguous heads");
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  STD_TORCH_CHECK(d % 2 == 0, "head size must be even");
  for (const Tensor* t : {&cos, &sin})
    STD_TORCH_CHECK(t->dim() == 2 && t->is_contiguous() && t->scalar_type() == ScalarType::Float &&
                        t->size(0) == rows && t->size(1) == d,
                    "cos and sin must be contiguous float32 [rows, d]");
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos.const_data_ptr<float>() + r * d;
    const float* s = sin.const_data_ptr<float>() + r * d;
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* p = x.mutable_data_ptr<float>() + r * x.stride(0) + hd * x.stride(1);
      int64_t j = 0;
      for (; j + kLanes <= half; j += kLanes) {
        const Vec x1 = load(p + j), x2 = load(p + half + j);
        store(p + j, x1 * load(c + j) - x2 * load(s + j));
        store(p + half + j, x2 * load(c + half + j) + x1 * load(s + half + j));
      }
      for (; j < half; ++j) {
        const float x1 = p[j], x2 = p[half + j];
        p[j] = x1 * c[j] - x2 * s[j];
        p[half + j] = x2 * c[half + j] + x1 * s[half + j];
      }
    }
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(banaserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor residual, Tensor weight, float eps, Tensor(b!) out) -> ()");
  m.def("silu_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("rotary(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(banaserve, CPU, m) {
  m.impl("rms_norm", TORCH_BOX(&rms_norm));
  m.impl("add_rms_norm", TORCH_BOX(&add_rms_norm));
  m.impl("silu_mul", TORCH_BOX(&silu_mul));
  m.impl("rotary", TORCH_BOX(&rotary));
}

// ---- causal prefill attention, float32 -------------------------------------------------
//
// out[i] = softmax(q[i] K^T * scale) V over keys j <= offset + i (offset = ctx - n: the
// context before these n queries), for one sequence: q [n, heads, d], k/v [ctx, kv_heads, d]
// (rows may be strided, heads contiguous), out [n, heads, d]. Work is cut into (kv head,
// block of kBlock query positions); a block's rows are the group's query heads at those
// positions, so every K/V row read serves the whole group. Per block: scores for every key up
// to the block's causal end (kept whole in cache: no online rescaling), an exact
// max-subtracted softmax per row, then P V. K is transposed into 16-key tiles once per kv head.
namespace {

constexpr int64_t kBlock = 32;  // query positions per block
constexpr int kQkRows = 12;     // rows per QK^T micro-kernel: 24 accumulators
constexpr int kPvRows = 6;      // rows per PV micro-kernel (d = 64): 24 accumulators

// s[r][0..32) = q[r] . kt tile pair, for R rows; kt is [d][16] per tile, two tiles 16*d apart.
template <int R, int D>
inline void qk_rows(const float* q, const float* kt, float* s, int64_t s_stride, bool two) {
  Vec acc[R][2] = {};
  for (int d = 0; d < D; ++d) {
    const Vec k0 = load(kt + d * kLanes);
    const Vec k1 = two ? load(kt + (D + d) * kLanes) : Vec{};
    for (int r = 0; r < R; ++r) {
      const float x = q[r * D + d];
      acc[r][0] += x * k0;
      acc[r][1] += x * k1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store(s + r * s_stride, acc[r][0]);
    if (two) store(s + r * s_stride + kLanes, acc[r][1]);
  }
}

// o[r] = sum_j p[r][j] v[j] for R rows over keys [0, len).
template <int R, int D>
inline void pv_rows(const float* p, int64_t p_stride, const float* v, int64_t v_stride,
                    int64_t len, float* o) {
  constexpr int V = D / kLanes;
  Vec acc[R][V] = {};
  for (int64_t j = 0; j < len; ++j) {
    Vec vr[V];
    for (int c = 0; c < V; ++c) vr[c] = load(v + j * v_stride + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const float x = p[r * p_stride + j];
      for (int c = 0; c < V; ++c) acc[r][c] += x * vr[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) store(o + r * D + c * kLanes, acc[r][c]);
}

template <int D>
void qk_block(const float* qb, int64_t rows, const float* kt, int64_t tiles, float* s,
              int64_t s_stride) {
  for (int64_t t = 0; t < tiles; t += 2) {
    const bool two = t + 1 < tiles;
    int64_t r = 0;
    for (; r + kQkRows <= rows; r += kQkRows)
      qk_rows<kQkRows, D>(qb + r * D, kt + t * D * kLanes, s + r * s_stride + t * kLanes,
                          s_stride, two);
    for (; r < rows; ++r)
      qk_rows<1, D>(qb + r * D, kt + t * D * kLanes, s + r * s_stride + t * kLanes, s_stride,
                    two);
  }
}

template <int D>
void pv_block(const float* s, int64_t s_stride, int64_t rows, const float* v, int64_t v_stride,
              int64_t len, float* ob) {
  constexpr int R = D >= 128 ? kPvRows / 2 : kPvRows;  // accumulators stay in 32 registers
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    pv_rows<R, D>(s + r * s_stride, s_stride, v, v_stride, len, ob + r * D);
  for (; r < rows; ++r) pv_rows<1, D>(s + r * s_stride, s_stride, v, v_stride, len, ob + r * D);
}

// In place over a row of n (a multiple of 16) scores, valid below `len`: exp(s - max)
// (0 from len on); returns the sum.
float softmax_row(float* s, int64_t len, int64_t n) {
  Vec m = {} ;
  m -= INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const Vec x = load(s + j);
    m = x > m ? x : m;
  }
  float max = m[0];
  for (int i = 1; i < kLanes; ++i) max = std::max(max, m[i]);
  for (; j < len; ++j) max = std::max(max, s[j]);
  Vec sum = {};
  for (int64_t j = 0; j < n; j += kLanes) {
    Vec e = exp_nonpositive(load(s + j) - max);
    if (j + kLanes > len)
      for (int i = 0; i < kLanes; ++i)
        if (j + i >= len) e[i] = 0.0f;
    store(s + j, e);
    sum += e;
  }
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += sum[i];
  return total;
}

template <int D>
void prefill_head(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out,
                  int64_t h, int64_t b0, int64_t b1) {
  const int64_t n = q.size(0), heads = q.size(1), ctx = k.size(0), kv_heads = k.size(1);
  const int64_t group = heads / kv_heads, offset = ctx - n;
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>() + h * k.stride(1);
  const float* vp = v.const_data_ptr<float>() + h * v.stride(1);
  float* op = out.mutable_data_ptr<float>();
  const int64_t last_end = offset + std::min(n, b1 * kBlock);  // keys any block here reads
  const int64_t tiles = (last_end + kLanes - 1) / kLanes;
  std::vector<float> kt(tiles * D * kLanes, 0.0f);  // [tile][d][16]
  for (int64_t j = 0; j < last_end; ++j)
    for (int d = 0; d < D; ++d) kt[(j / kLanes) * D * kLanes + d * kLanes + j % kLanes] = kp[j * k.stride(0) + d];
  const int64_t max_rows = group * kBlock, s_stride = tiles * kLanes;
  std::vector<float> qb(max_rows * D), ob(max_rows * D), s(max_rows * s_stride);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t p0 = blk * kBlock, np = std::min(kBlock, n - p0), rows = group * np;
    const int64_t end = offset + p0 + np, btiles = (end + kLanes - 1) / kLanes;
    for (int64_t g = 0; g < group; ++g)  // scaled once here, not every score
      for (int64_t i = 0; i < np; ++i) {
        const float* src = qp + (p0 + i) * q.stride(0) + (h * group + g) * q.stride(1);
        for (int d = 0; d < D; ++d) qb[(g * np + i) * D + d] = src[d] * static_cast<float>(scale);
      }
    qk_block<D>(qb.data(), rows, kt.data(), btiles, s.data(), s_stride);
    std::vector<float> inv(rows);
    for (int64_t r = 0; r < rows; ++r)
      inv[r] = 1.0f / softmax_row(&s[r * s_stride], offset + p0 + r % np + 1, btiles * kLanes);
    pv_block<D>(s.data(), s_stride, rows, vp, v.stride(0), end, ob.data());
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < np; ++i) {
        float* o = op + (p0 + i) * out.stride(0) + (h * group + g) * out.stride(1);
        const float* src = &ob[(g * np + i) * D];
        const float f = inv[g * np + i];
        for (int d = 0; d < D; ++d) o[d] = src[d] * f;
      }
  }
}

void prefill_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                       Tensor& out) {
  for (const Tensor* t : {&q, &k, &v, static_cast<const Tensor*>(&out)})
    STD_TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->scalar_type() == ScalarType::Float,
                    "q, k, v and out must be float32 [rows, heads, d] with contiguous heads");
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k.size(1);
  STD_TORCH_CHECK(k.size(0) == v.size(0) && v.size(1) == kv_heads && k.size(2) == d &&
                      v.size(2) == d && k.size(0) >= n && kv_heads > 0 && heads % kv_heads == 0,
                  "k and v must be [ctx >= n, kv_heads, d] with heads a multiple of kv_heads");
  STD_TORCH_CHECK(out.size(0) == n && out.size(1) == heads && out.size(2) == d,
                  "out must be q's size");
  // Checked here, not in the workers: an error is raised before any thread starts.
  STD_TORCH_CHECK(d == 32 || d == 64 || d == 128,
                  "prefill_attention supports head sizes 32, 64 and 128");
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  torch::stable::parallel_for(0, kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end;) {  // runs of blocks of one kv head share its K tiles
      const int64_t h = w / blocks, b0 = w % blocks, b1 = std::min(blocks, b0 + (end - w));
      if (d == 32) prefill_head<32>(q, k, v, scale, out, h, b0, b1);
      else if (d == 64) prefill_head<64>(q, k, v, scale, out, h, b0, b1);
      else prefill_head<128>(q, k, v, scale, out, h, b0, b1);
      w += b1 - b0;
    }
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(banaserve, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(banaserve, CPU, m) {
  m.impl("prefill_attention", TORCH_BOX(&prefill_attention));
}
