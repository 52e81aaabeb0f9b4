// Attention over a ragged layer on CPU, every head over its own kept pairs and the added tokens,
// in one call (see kvtrim/attention/cpu_kernels.py, which builds and loads it).
//
// query (H, Q, D); kept_keys, kept_values (N, D): each KV head's kept pairs packed head after head,
// head j at rows [offsets[j], offsets[j + 1]); added_keys, added_values (Hkv, A, D): the tokens
// added since compression, the last Q of them the queries' own. Query t of head h (KV head
// j = h / G) sees all of j's kept pairs and the added tokens [0, A − Q + t]. Returns the output
// (H, Q, D). float32 throughout.
//
// One work item is one KV head and one query position: each key and value is read once for the G
// query heads that share it. Scores are held for one item at a time; nothing is padded or copied.
// Decoding-sized calls run on the calling thread (a parallel region costs more than their work).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "fast_exp.h"

namespace {

constexpr int64_t kMaxGroup = 16;             // query heads per KV head handled by one item
constexpr int64_t kSerialWork = 1 << 22;      // below this many multiply-adds, one thread

void attend_item(const float* __restrict__ q,       // (G, D) this item's queries
                 const float* __restrict__ keys,    // (kept, D)
                 const float* __restrict__ values,  // (kept, D)
                 int64_t kept,
                 const float* __restrict__ new_keys,    // (visible, D)
                 const float* __restrict__ new_values,  // (visible, D)
                 int64_t visible, int64_t group, int64_t dim, float scale,
                 float* __restrict__ out,  // (G, D), zeroed
                 std::vector<float>& scores) {
  const int64_t total = kept + visible;
  scores.resize(group * total);
  float best[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) best[g] = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < total; ++r) {
    const float* __restrict__ k = r < kept ? keys + r * dim : new_keys + (r - kept) * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* __restrict__ qg = q + g * dim;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dim; ++d) sum += qg[d] * k[d];
      const float score = scale * sum;
      scores[g * total + r] = score;
      best[g] = std::max(best[g], score);
    }
  }
  float norm[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    float* __restrict__ row = scores.data() + g * total;
    const float top = best[g];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t r = 0; r < total; ++r) {
      row[r] = kvtrim::exp_nonpositive(row[r] - top);
      sum += row[r];
    }
    norm[g] = sum;
  }
  for (int64_t r = 0; r < total; ++r) {
    const float* __restrict__ v = r < kept ? values + r * dim : new_values + (r - kept) * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float w = scores[g * total + r];
      float* __restrict__ og = out + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) og[d] += w * v[d];
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inverse = 1.f / norm[g];
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] *= inverse;
  }
}

}  // namespace

torch::Tensor ragged_attention(torch::Tensor query, torch::Tensor kept_keys,
                                            torch::Tensor kept_values, torch::Tensor offsets,
                                            torch::Tensor added_keys, torch::Tensor added_values,
                                            double scale) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && query.is_contiguous(), "query: contiguous float32");
  TORCH_CHECK(kept_keys.is_contiguous() && kept_values.is_contiguous(), "kept pairs: contiguous");
  TORCH_CHECK(added_keys.is_contiguous() && added_values.is_contiguous(), "added tokens: contiguous");
  const int64_t n_heads = query.size(0), q_len = query.size(1), dim = query.size(2);
  const int64_t n_kv = offsets.size(0) - 1, n_added = added_keys.size(1);
  const int64_t group = n_heads / n_kv;
  TORCH_CHECK(group <= kMaxGroup, "at most ", kMaxGroup, " query heads per KV head");
  TORCH_CHECK(n_added >= q_len, "the queries' own tokens must be among the added ones");
  // (Hkv, Q, G, D): one item's queries side by side
  auto grouped = query.view({n_kv, group, q_len, dim}).transpose(1, 2).contiguous();
  auto out = torch::zeros_like(grouped);
  const float* q = grouped.data_ptr<float>();
  const float* kk = kept_keys.data_ptr<float>();
  const float* kv = kept_values.data_ptr<float>();
  const float* ak = added_keys.data_ptr<float>();
  const float* av = added_values.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t items = n_kv * q_len;
  const int64_t work = n_heads * q_len * (kept_keys.size(0) / n_kv + n_added) * dim;
  const int64_t grain = work < kSerialWork ? items : 1;

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv_head = item / q_len, t = item % q_len;
      const int64_t first = off[kv_head], kept = off[kv_head + 1] - first;
      attend_item(q + item * group * dim, kk + first * dim, kv + first * dim, kept,
                  ak + kv_head * n_added * dim, av + kv_head * n_added * dim,
                  n_added - q_len + t + 1, group, dim, s, o + item * group * dim, scores);
    }
  });
  // back to (H, Q, D), head h = j·G + g
  return out.transpose(1, 2).reshape({n_heads, q_len, dim});
}
