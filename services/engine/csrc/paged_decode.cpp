// Paged decode attention on CPU: one query token per sequence attends over its
// K/V blocks where they lie in the cache, with no gathered copy and no padding.
//
// A work item is one sequence (one sequence's kv head when there are fewer sequences
// than threads). Per item, in fp32: the scores of every query head over every context
// token, their softmax, then the V-weighted sum, written in the query's dtype. Only the
// ceil(ctx / block_size) first entries of a block-table row are read, so a padded table
// is fine. Built at first use by services/engine/paged_decode.py against torch's stable
// ABI (header-only, so it compiles in seconds); threads come from torch's own pool
// (at::get_num_threads), through torch::stable::parallel_for.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using torch::headeronly::BFloat16;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// 16 floats: one AVX-512 register, two AVX2 ones; GCC lowers it to what -march offers.
typedef float Vec __attribute__((vector_size(64)));
typedef float Half __attribute__((vector_size(32)));
typedef float Quarter __attribute__((vector_size(16)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec load(const BFloat16* p) {  // bfloat16 is the top half of a float
  U16x16 h;
  std::memcpy(&h, p, sizeof(h));
  U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(Vec v) {  // halves in registers: a spilled vector would stall on reload
  Half a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  Quarter c =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}

inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, BFloat16* out) { *out = BFloat16(x); }

// exp(x) for x <= 0 (scores minus their max), 16 at a time: 2^n * p(r) with
// r = x - n ln2 in [-ln2/2, ln2/2] (Cephes expf polynomial, ~1 ulp); exp(x) for
// x < -87 (including -inf padding) is 0.
inline Vec exp_nonpositive(Vec x) {
  const Vec zero = {};
  const I32x16 underflow = x < zero - 87.0f;
  x = underflow ? zero - 87.0f : x;
  const Vec fx = x * 1.44269504088896341f + 0.5f;
  I32x16 n = __builtin_convertvector(fx, I32x16);  // truncates; floor needs a fix below 0
  n += __builtin_convertvector(n, Vec) > fx;       // true is -1
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

// In place over n (a multiple of 16) scores, -inf past the real ones:
// s -> exp(s - max s); returns the sum (and the max in *max_out when asked).
float softmax_numerators(float* s, int64_t n, float* max_out = nullptr) {
  Vec m = load(s);
  for (int64_t t = kLanes; t < n; t += kLanes) {
    const Vec x = load(s + t);
    m = x > m ? x : m;
  }
  float max = m[0];
  for (int i = 1; i < kLanes; ++i) max = std::max(max, m[i]);
  if (max_out != nullptr) *max_out = max;
  Vec sum = {};
  for (int64_t t = 0; t < n; t += kLanes) {
    const Vec e = exp_nonpositive(load(s + t) - max);
    store(s + t, e);
    sum += e;
  }
  return hsum(sum);
}

// Sixteen dot-product vectors -> one vector of their sums, in order: a tree of
// two-source shuffles, ~3 instructions per sum instead of ~9 for a horizontal add each.
inline Vec sum16(const Vec* p) {
  Vec c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)
    c[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22,
                                   23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    e[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22,
                                   23, 26, 27, 30, 31);
  return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

struct Shape {
  int64_t q_head_stride;  // q may be a strided view (rows of a fused qkv projection)
  int64_t block_shift, kv_heads, group, block_stride, row_stride;
  int64_t row_bytes;  // one token's K (or V) for every kv head
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A tile is 16 consecutive tokens of one sequence: the row (every kv head) of each in
// the cache. Tokens past ctx repeat the tile's first, so loops need no tail; their
// scores are masked to -inf (probability 0).
template <typename T>
void tile_rows(const T* cache, const int64_t* table, int64_t t0, int64_t ctx, const Shape& s,
               const T** rows) {
  const int64_t mask = (int64_t{1} << s.block_shift) - 1;
  for (int64_t j = 0; j < kLanes; ++j) {
    const int64_t t = t0 + j < ctx ? t0 + j : t0;
    rows[j] = cache + table[t >> s.block_shift] * s.block_stride + (t & mask) * s.row_stride;
  }
}

// Pulls the next tile into cache a few lines at a time while the current one is
// computed: blocks lie anywhere in the cache, so the hardware prefetcher cannot guess
// the next one, and each would otherwise start with a stall on memory.
class Prefetcher {
 public:
  template <typename T>
  void start(const T* const* rows, int64_t row_bytes) {
    for (int64_t j = 0; j < kLanes; ++j) rows_[j] = reinterpret_cast<const char*>(rows[j]);
    row_bytes_ = row_bytes;
    row_ = offset_ = 0;
  }
  void stop() { row_ = kLanes; }
  void step(int64_t lines) {
    for (; lines > 0 && row_ < kLanes; --lines) {
      __builtin_prefetch(rows_[row_] + offset_, 0, 3);
      offset_ += 64;
      if (offset_ >= row_bytes_) offset_ = 0, ++row_;
    }
  }

 private:
  const char* rows_[kLanes];
  int64_t row_bytes_ = 0, row_ = kLanes, offset_ = 0;
};

struct Sequence {
  const int64_t* table;  // nullptr: none
  int64_t ctx;
};

// Kv heads [h_begin, h_end) of one sequence, head size kChunks * 16: every query head
// of those kv heads ("rows") over ctx tokens. Two passes, K then V, tile by tile; a
// tile is read once, whole (every head), while the next one (or, after the last V
// tile, the next item's first K tile) is prefetched, and each row's dots over a tile
// are independent, so the loops run at the FMA units' throughput, not their latency.
// scores: rows * round_up(ctx, 16) floats; work: rows * (2 * head size + 1).
template <typename T, int kChunks>
void attend(const T* q, const T* k_cache, const T* v_cache, const Sequence& seq,
            const Sequence& next, int64_t h_begin, int64_t h_end, float scale, const Shape& s,
            float* scores, float* work, T* out, float* lse) {
  constexpr int64_t d = kChunks * kLanes;
  const int64_t rows = (h_end - h_begin) * s.group, ctx = seq.ctx;
  const int64_t stride = round_up(ctx, kLanes), tiles = stride / kLanes;
  float* query = work;
  float* acc = work + rows * d;
  float* inv_sum = acc + rows * d;
  const T* q0 = q + h_begin * s.group * s.q_head_stride;
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < kChunks; ++c)
      store(query + r * d + c * kLanes, load(q0 + r * s.q_head_stride + c * kLanes) * scale);
  // Lines to prefetch per row step so the next tile is in before this one is done.
  const int64_t lines = (kLanes * s.row_bytes / 64 + rows * kLanes - 1) / (rows * kLanes);
  const T* cur[kLanes];
  const T* nxt[kLanes];
  Prefetcher prefetch;
  auto tile = [&](int64_t i, const T** out_rows) {  // i: K tiles, V tiles, next item
    if (i < tiles) return tile_rows(k_cache, seq.table, i * kLanes, ctx, s, out_rows), true;
    if (i < 2 * tiles)
      return tile_rows(v_cache, seq.table, (i - tiles) * kLanes, ctx, s, out_rows), true;
    if (next.table == nullptr) return false;
    return tile_rows(k_cache, next.table, 0, next.ctx, s, out_rows), true;
  };
  auto advance = [&](int64_t i) {  // cur = tile i; prefetch tile i + 1
    tile(i, cur);
    if (tile(i + 1, nxt))
      prefetch.start(nxt, s.row_bytes);
    else
      prefetch.stop();
  };

  for (int64_t i = 0; i < tiles; ++i) {
    advance(i);
    for (int64_t r = 0; r < rows; ++r) {
      Vec qv[kChunks], dots[kLanes];
      for (int c = 0; c < kChunks; ++c) qv[c] = load(query + r * d + c * kLanes);
      const int64_t head = (h_begin + r / s.group) * d;
      for (int64_t j = 0; j < kLanes; ++j) {
        prefetch.step(lines);
        const T* k = cur[j] + head;
        dots[j] = qv[0] * load(k);
        for (int c = 1; c < kChunks; ++c) dots[j] += qv[c] * load(k + c * kLanes);
      }
      store(scores + r * stride + i * kLanes, sum16(dots));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(scores + r * stride + ctx, scores + (r + 1) * stride, -INFINITY);
    float max = 0.0f;
    const float sum = softmax_numerators(scores + r * stride, stride, &max);
    inv_sum[r] = 1.0f / sum;
    // log-sum-exp of the row's scaled scores: what a partial result merges by
    if (lse != nullptr) lse[h_begin * s.group + r] = max + std::log(sum);
  }
  std::fill(acc, acc + rows * d, 0.0f);
  for (int64_t i = 0; i < tiles; ++i) {
    advance(tiles + i);
    for (int64_t r = 0; r < rows; ++r) {
      // Two accumulator sets (even and odd tokens) halve the FMA dependency chains.
      Vec even[kChunks], odd[kChunks] = {};
      for (int c = 0; c < kChunks; ++c) even[c] = load(acc + r * d + c * kLanes);
      const float* p = scores + r * stride + i * kLanes;
      const int64_t head = (h_begin + r / s.group) * d;
      for (int64_t j = 0; j < kLanes; j += 2) {
        prefetch.step(2 * lines);
        for (int c = 0; c < kChunks; ++c) {
          even[c] += p[j] * load(cur[j] + head + c * kLanes);
          odd[c] += p[j + 1] * load(cur[j + 1] + head + c * kLanes);
        }
      }
      for (int c = 0; c < kChunks; ++c) store(acc + r * d + c * kLanes, even[c] + odd[c]);
    }
  }
  T* o = out + h_begin * s.group * d;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < d; ++i) from_float(acc[r * d + i] * inv_sum[r], o + r * d + i);
}

template <typename T, int kChunks>
void run(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& tables,
         const Tensor& lens, double scale, Tensor& out, float* lse) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k_cache.size(2);
  const Shape s{q.stride(1),
                __builtin_ctzll(k_cache.size(1)),
                kv_heads,
                heads / kv_heads,
                k_cache.stride(0),
                k_cache.stride(1),
                k_cache.stride(1) * static_cast<int64_t>(sizeof(T))};
  const T* qp = q.const_data_ptr<T>();
  const int64_t q_stride = q.stride(0);
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t table_stride = tables.stride(0);
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t max_ctx = batch ? *std::max_element(lp, lp + batch) : 0;
  // A work item is a whole sequence (its tiles are read once, whole); with fewer
  // sequences than threads, one kv head of a sequence, so every thread has work.
  const int64_t threads = torch::stable::get_num_threads();
  const int64_t splits = threads > 1 && batch < 2 * threads ? kv_heads : 1;
  const int64_t heads_per_item = kv_heads / splits;
  torch::stable::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads_per_item * s.group * round_up(max_ctx, kLanes));
    std::vector<float> work(heads_per_item * s.group * (2 * d + 1));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / splits, h = (item % splits) * heads_per_item;
      const int64_t nb = (item + 1) / splits;
      const Sequence seq{tp + b * table_stride, lp[b]};
      const Sequence next{item + 1 < end ? tp + nb * table_stride : nullptr,
                             item + 1 < end ? lp[nb] : 0};
      attend<T, kChunks>(qp + b * q_stride, kp, vp, seq, next, h, h + heads_per_item,
                         static_cast<float>(scale), s, scores.data(), work.data(),
                         op + b * heads * d, lse == nullptr ? nullptr : lse + b * heads);
    }
  });
}

template <typename T>
void dispatch_head_size(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& tables, const Tensor& lens, double scale, Tensor& out,
                        float* lse) {
  switch (q.size(2)) {
    case 32: return run<T, 2>(q, k_cache, v_cache, tables, lens, scale, out, lse);
    case 64: return run<T, 4>(q, k_cache, v_cache, tables, lens, scale, out, lse);
    case 128: return run<T, 8>(q, k_cache, v_cache, tables, lens, scale, out, lse);
    default: STD_TORCH_CHECK(false, "paged_decode supports head sizes 32, 64 and 128");
  }
}

bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (a.size(i) != b.size(i) || a.stride(i) != b.stride(i)) return false;
  return true;
}

void check_layouts(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                   const Tensor& out) {
  STD_TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [batch, heads, d], d contiguous");
  STD_TORCH_CHECK(k_cache.dim() == 4 && same_layout(k_cache, v_cache),
                  "k_cache and v_cache must be [blocks, block_size, kv_heads, d] alike");
  STD_TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                      k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
                  "a cache block must be contiguous");
  STD_TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
                  "head sizes of q and the cache disagree");
  const int64_t block_size = k_cache.size(1);
  STD_TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0,
                  "block_size must be a power of two");
  STD_TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                      q.scalar_type() == v_cache.scalar_type() &&
                      out.scalar_type() == q.scalar_type(),
                  "q, the cache and out must share a dtype");
  STD_TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == q.size(0) &&
                      out.size(1) == q.size(1) && out.size(2) == q.size(2),
                  "out must be a contiguous tensor of q's size");
}

// Every block a sequence reads must exist: a bad table would read outside the cache.
void check_tables(const Tensor& tables, const Tensor& lens, int64_t batch, int64_t block_size,
                  int64_t num_blocks) {
  STD_TORCH_CHECK(tables.dim() == 2 && tables.size(0) == batch && tables.stride(1) == 1 &&
                      tables.scalar_type() == ScalarType::Long,
                  "block_tables must be int64 [batch, max_blocks] with contiguous rows");
  STD_TORCH_CHECK(lens.dim() == 1 && lens.size(0) == batch && lens.is_contiguous() &&
                      lens.scalar_type() == ScalarType::Long,
                  "context_lens must be int64 [batch]");
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t cap = tables.size(1) * block_size;
  for (int64_t b = 0; b < batch; ++b) {
    STD_TORCH_CHECK(lp[b] >= 1 && lp[b] <= cap, "context length ", lp[b], " outside [1, ", cap,
                    "]");
    const int64_t* row = tp + b * tables.stride(0);
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      STD_TORCH_CHECK(row[i] >= 0 && row[i] < num_blocks, "block id ", row[i],
                      " outside the cache");
  }
}

void decode_into(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                 const Tensor& block_tables, const Tensor& context_lens, double scale, Tensor& out,
                 float* lse) {
  check_layouts(q, k_cache, v_cache, out);
  check_tables(block_tables, context_lens, q.size(0), k_cache.size(1), k_cache.size(0));
  if (q.scalar_type() == ScalarType::Float)
    dispatch_head_size<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out, lse);
  else if (q.scalar_type() == ScalarType::BFloat16)
    dispatch_head_size<BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale, out,
                                 lse);
  else
    STD_TORCH_CHECK(false, "paged_decode supports float32 and bfloat16 only");
}

void paged_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                  const Tensor& block_tables, const Tensor& context_lens, double scale,
                  Tensor& out) {
  decode_into(q, k_cache, v_cache, block_tables, context_lens, scale, out, nullptr);
}

// paged_decode plus each row's log-sum-exp of its scaled scores, float32 [batch, heads]: the
// normalised output and lse are one partial attention result (attention migration merges them).
void paged_decode_lse(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& block_tables, const Tensor& context_lens, double scale,
                      Tensor& out, Tensor& lse) {
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float && lse.dim() == 2 &&
                      lse.is_contiguous() && lse.size(0) == q.size(0) && lse.size(1) == q.size(1),
                  "lse must be a contiguous float32 [batch, heads] tensor");
  decode_into(q, k_cache, v_cache, block_tables, context_lens, scale, out,
              lse.mutable_data_ptr<float>());
}

}  // namespace

STABLE_TORCH_LIBRARY(banaserve, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor(a!) out) -> ()");
  m.def(
      "paged_decode_lse(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor(a!) out, Tensor(b!) lse) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(banaserve, CPU, m) {
  m.impl("paged_decode", TORCH_BOX(&paged_decode));
  m.impl("paged_decode_lse", TORCH_BOX(&paged_decode_lse));
}
