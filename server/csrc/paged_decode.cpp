// Paged decode attention for CPU float32: one query token per sequence, keys and values read
// straight from the layer's block pool (no gather into a dense tensor first).
// Registered as torch.ops.loraswap.paged_decode; built and loaded by server/paged_attention.py.
//
// Batch invariance: each (row, kv head) task runs on one thread as a fixed sequence of float
// operations that depends only on that row's q, length, window and the keys/values at its own
// positions -- never on n, max_blocks, the thread count or other rows. Lanes are indexed by the
// head_dim index (dot products) or by a position's offset from the row's first attended position
// (softmax sums), and every horizontal sum uses one fixed tree. The SIMD is written out with GCC
// vector types, built without -ffast-math and with -ffp-contract=off: the compiler may neither
// reassociate nor fuse a*b+c, so these orders are the ones that run.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Eight float lanes (one AVX2 register) as a GCC vector type: explicit SIMD without
// intrinsics, so the same source builds for any target (without AVX it becomes SSE pairs).
typedef float vec8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
constexpr int64_t kTile = 16;  // positions per pass-3 tile: their value rows stay in L1
constexpr int64_t kAhead = 16;  // prefetch distance in positions (measured: 16 beats 0, 32, 64)

inline vec8 load(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}
inline void store(float* p, vec8 v) { std::memcpy(p, &v, sizeof v); }
inline vec8 splat(float x) { return vec8{x, x, x, x, x, x, x, x}; }

// Pairwise sums inside 128-bit halves: [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7].
inline vec8 hadd(vec8 a, vec8 b) {
  using idx = int __attribute__((vector_size(32)));
  return __builtin_shuffle(a, b, idx{0, 2, 8, 10, 4, 6, 12, 14}) + __builtin_shuffle(a, b, idx{1, 3, 9, 11, 5, 7, 13, 15});
}

// out[j] = ((a[j]0 + a[j]1) + (a[j]2 + a[j]3)) + ((a[j]4 + a[j]5) + (a[j]6 + a[j]7)): eight
// horizontal sums at once, each by the same tree.
inline vec8 reduce8(const vec8* a) {
  using idx = int __attribute__((vector_size(32)));
  const vec8 u0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));  // [j0123 for j<4 | j4567 for j<4]
  const vec8 u1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return __builtin_shuffle(u0, u1, idx{0, 1, 2, 3, 8, 9, 10, 11}) + __builtin_shuffle(u0, u1, idx{4, 5, 6, 7, 12, 13, 14, 15});
}

// exp for x <= 0 (scores minus their max), Cephes' expf polynomial (about 1 ulp): exp(x) =
// 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2. Below -87 it returns 0 (exp(-inf),
// the padding, included); weights that small vanish against the max's weight of 1 anyway.
inline vec8 exp8(vec8 x) {
  using ivec8 = int32_t __attribute__((vector_size(32)));
  const auto tiny = x < splat(-87.0f);  // also -inf; NaN stays NaN
  x = tiny ? splat(-87.0f) : x;
  vec8 fx = x * splat(1.44269504088896341f) + splat(0.5f);
  ivec8 n = __builtin_convertvector(fx, ivec8);  // truncates toward zero: fix into floor
  n += __builtin_convertvector(n, vec8) > fx ? ivec8{} - 1 : ivec8{};
  fx = __builtin_convertvector(n, vec8);
  x = x - fx * splat(0.693359375f);
  x = x - fx * splat(-2.12194440e-4f);
  vec8 y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * (x * x) + x + splat(1.0f);
  const ivec8 bits = (n + 127) << 23;  // 2^n; n = -126 at the clamp, still a normal float
  vec8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return tiny ? vec8{} : y * scale;
}

inline float lane_sum(vec8 a) {  // a fixed tree
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// dot(q, k[j]) for eight key rows: lane l of each accumulator sums the products at d % 8 == l.
// Every score takes this path (a short last group is padded with zero rows), so a score's
// arithmetic does not depend on its neighbours.
inline vec8 dot8(const float* q, const float* const* k, int64_t hd) {
  vec8 acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= hd; d += kLanes) {
    const vec8 qv = load(q + d);
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += qv * load(k[j] + d);
  }
  if (d < hd) {  // hd % 8 tail: the same lanes, zero-filled (adding +0 changes nothing)
    float qt[kLanes] = {};
    std::memcpy(qt, q + d, (hd - d) * sizeof(float));
    for (int64_t j = 0; j < kLanes; ++j) {
      float kt[kLanes] = {};
      std::memcpy(kt, k[j] + d, (hd - d) * sizeof(float));
      acc[j] += load(qt) * load(kt);
    }
  }
  return reduce8(acc);
}

// out[c] += w[i] * v[i][c] for i < count, in position order; C vectors of out held in registers.
template <int64_t C>
inline void weighted_sum(float* out, const float* w, const float* const* v, int64_t count, int64_t d0) {
  vec8 acc[C];
  for (int64_t c = 0; c < C; ++c) acc[c] = load(out + d0 + c * kLanes);
  for (int64_t i = 0; i < count; ++i) {
    const vec8 wv = splat(w[i]);
    for (int64_t c = 0; c < C; ++c) acc[c] += wv * load(v[i] + d0 + c * kLanes);
  }
  for (int64_t c = 0; c < C; ++c) store(out + d0 + c * kLanes, acc[c]);
}

inline void prefetch_rows(const float* const* rows, int64_t count, int64_t bytes) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(reinterpret_cast<const char*>(rows[i]) + off, 0, 3);
}

struct Layout {
  int64_t heads, kv_heads, group, head_dim, block_size, max_blocks, window;
  float scale, softcap;  // softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2)
};

struct Scratch {  // per thread, sized for the longest row of the call
  std::vector<float> scores;  // [group, padded count]
  std::vector<const float*> keys, values;  // [padded count] row pointers
  std::vector<float> zeros;  // [hd]: the key row of padding positions
  std::vector<float> sums;  // [group]
};

// One row and one kv head: the `group` query heads sharing it, each key/value row read once
// from memory (later reads of it hit L1).
void attend_group(
    const Layout& s,
    const float* q,  // [group, hd]: this row's query heads for kv head kvh
    const float* k_pool,  // [num_slots, kv_heads, hd]
    const float* v_pool,
    const int64_t* blocks,  // [max_blocks]: this row's block table
    int64_t len,
    int64_t kvh,
    Scratch& w,
    float* out) {  // [group, hd]
  const int64_t hd = s.head_dim, g = s.group, bs = s.block_size;
  const int64_t start = s.window > 0 ? std::max<int64_t>(0, len - s.window) : 0;
  const int64_t count = len - start;
  std::fill(out, out + g * hd, 0.0f);
  if (count <= 0) return;  // padding row: zeros
  const int64_t padded = (count + kLanes - 1) / kLanes * kLanes;
  const int64_t row_stride = s.kv_heads * hd;
  // Where each position's rows live, walking the row's blocks (no division per position).
  for (int64_t i = 0, j = start / bs, o = start % bs; i < count; ++j, o = 0) {
    const int64_t base = blocks[j] * bs * row_stride + kvh * hd;
    for (; o < bs && i < count; ++o, ++i) {
      w.keys[i] = k_pool + base + o * row_stride;
      w.values[i] = v_pool + base + o * row_stride;
    }
  }
  for (int64_t i = count; i < padded; ++i) w.keys[i] = w.zeros.data();
  float* scores = w.scores.data();
  const int64_t bytes = hd * sizeof(float);

  // Pass 1: scaled scores, eight positions at a time; keys prefetched kAhead positions ahead
  // because the blocks are scattered and the hardware prefetcher cannot guess the next one.
  prefetch_rows(w.keys.data(), std::min(count, kAhead), bytes);
  const vec8 scale = splat(s.scale);
  for (int64_t i = 0; i < padded; i += kLanes) {
    if (i + kAhead < count) prefetch_rows(w.keys.data() + i + kAhead, std::min(kLanes, count - i - kAhead), bytes);
    for (int64_t h = 0; h < g; ++h) store(scores + h * padded + i, dot8(q + h * hd, w.keys.data() + i, hd) * scale);
  }

  // Pass 2: per head, exp(score - max) in place (padding: exp(-inf) = 0) and its lane sums.
  float* sums = w.sums.data();
  for (int64_t h = 0; h < g; ++h) {
    float* row = scores + h * padded;
    if (s.softcap > 0.0f)
      for (int64_t i = 0; i < count; ++i) row[i] = std::tanh(row[i] / s.softcap) * s.softcap;
    std::fill(row + count, row + padded, -std::numeric_limits<float>::infinity());
    float m = row[0];
    for (int64_t i = 1; i < count; ++i) m = std::max(m, row[i]);  // exact in any order
    vec8 acc = {};
    for (int64_t i = 0; i < padded; i += kLanes) {
      const vec8 e = exp8(load(row + i) - splat(m));
      store(row + i, e);
      acc += e;
    }
    sums[h] = lane_sum(acc);
  }

  // Pass 3: weighted sum of values, kTile positions at a time; out[h] += w * v in position order.
  prefetch_rows(w.values.data(), std::min(count, kAhead), bytes);
  const int64_t vecs = hd / kLanes;
  for (int64_t t = 0; t < count; t += kTile) {
    const int64_t n = std::min(kTile, count - t);
    if (t + kAhead < count) prefetch_rows(w.values.data() + t + kAhead, std::min(kTile, count - t - kAhead), bytes);
    const float* const* v = w.values.data() + t;
    for (int64_t h = 0; h < g; ++h) {
      float* o = out + h * hd;
      const float* wt = scores + h * padded + t;
      int64_t c = 0;
      for (; c + 8 <= vecs; c += 8) weighted_sum<8>(o, wt, v, n, c * kLanes);
      for (; c < vecs; ++c) weighted_sum<1>(o, wt, v, n, c * kLanes);
      for (int64_t d = vecs * kLanes; d < hd; ++d)
        for (int64_t i = 0; i < n; ++i) o[d] += wt[i] * v[i][d];
    }
  }
  for (int64_t h = 0; h < g; ++h)
    for (int64_t d = 0; d < hd; ++d) out[h * hd + d] /= sums[h];
}

at::Tensor paged_decode(
    const at::Tensor& q,  // [n, heads, hd]
    const at::Tensor& k_pool,  // [num_slots, kv_heads, hd]
    const at::Tensor& v_pool,  // [num_slots, kv_heads, hd]
    const at::Tensor& block_tables,  // [n, max_blocks] int64
    const at::Tensor& lengths,  // [n] int64
    int64_t block_size,
    int64_t window,
    double scale,
    double softcap) {
  const char* shapes = "paged_decode expects q [n, heads, hd], k_pool and v_pool [num_slots, kv_heads, hd]";
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3, shapes, "; got q ", q.sizes(), ", k_pool ", k_pool.sizes());
  TORCH_CHECK(v_pool.sizes() == k_pool.sizes(), "paged_decode: v_pool ", v_pool.sizes(), " differs from k_pool ", k_pool.sizes());
  for (const at::Tensor* t : {&q, &k_pool, &v_pool}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "paged_decode: q, k_pool and v_pool must be float32, got ", t->scalar_type());
  }
  for (const at::Tensor* t : {&block_tables, &lengths}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "paged_decode: block_tables and lengths must be int64, got ", t->scalar_type());
  }
  for (const at::Tensor* t : {&q, &k_pool, &v_pool, &block_tables, &lengths}) {
    TORCH_CHECK(t->device().is_cpu(), "paged_decode: every tensor must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "paged_decode: every tensor must be contiguous");
  }
  const int64_t n = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t num_slots = k_pool.size(0), kv_heads = k_pool.size(1);
  TORCH_CHECK(k_pool.size(2) == hd, "paged_decode: head_dim of q (", hd, ") and k_pool (", k_pool.size(2), ") differ");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "paged_decode: heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == n, "paged_decode: block_tables must be [n=", n, ", max_blocks], got ", block_tables.sizes());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == n, "paged_decode: lengths must be [n=", n, "], got ", lengths.sizes());
  TORCH_CHECK(block_size > 0, "paged_decode: block_size must be positive, got ", block_size);

  const Layout s{heads, kv_heads, heads / kv_heads, hd, block_size, block_tables.size(1), window, static_cast<float>(scale),
                 static_cast<float>(softcap)};
  const int64_t num_blocks = num_slots / block_size;  // a partial trailing block is never addressable
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();

  // Validate every block id the kernel will read before reading any (serially, on this thread).
  int64_t max_count = 0, total = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t len = lens[r];
    TORCH_CHECK(len >= 0 && len <= s.max_blocks * block_size, "paged_decode: lengths[", r, "] = ", len,
                " is outside [0, max_blocks * block_size = ", s.max_blocks * block_size, "]");
    const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    if (len > start) {
      for (int64_t j = start / block_size; j <= (len - 1) / block_size; ++j) {
        const int64_t b = bt[r * s.max_blocks + j];
        TORCH_CHECK(b >= 0 && b < num_blocks, "paged_decode: block_tables[", r, ", ", j, "] = ", b,
                    " is out of range for a pool of ", num_blocks, " blocks of ", block_size, " slots");
      }
    }
    max_count = std::max(max_count, len - start);
    total += len - start;
  }

  at::Tensor out = at::empty({n, heads, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tasks = n * kv_heads;
  // Small calls stay on one thread (thread start-up costs more than they do); the split never
  // changes a task's arithmetic, only which thread runs it.
  const int64_t work = std::max<int64_t>(1, total * kv_heads * hd * (s.group + 1));
  const int64_t grain = std::max<int64_t>(1, tasks * 32768 / work);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t padded = (max_count + kLanes - 1) / kLanes * kLanes;
    Scratch w{std::vector<float>(s.group * padded), std::vector<const float*>(padded),
              std::vector<const float*>(padded), std::vector<float>(hd, 0.0f), std::vector<float>(s.group)};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / kv_heads, kvh = t % kv_heads;
      const int64_t head0 = kvh * s.group;
      attend_group(s, qp + (r * heads + head0) * hd, kp, vp, bt + r * s.max_blocks, lens[r], kvh, w,
                   op + (r * heads + head0) * hd);
    }
  });
  return out;
}

}  // namespace

// A fragment: the loraswap namespace also holds ops defined from Python (packed_linear).
TORCH_LIBRARY_FRAGMENT(loraswap, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor lengths, "
      "int block_size, int window, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraswap, CPU, m) {
  m.impl("paged_decode", &paged_decode);
}
