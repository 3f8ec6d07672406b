// CPU kernels of the mixture-of-LoRA-experts routing ops.
//
// Pairs are the (token, slot) choices of top-k routing, laid out p = t * k + j. `moe_permute`
// counting-sorts pairs by expert; the grouped ops then run one GEMM per expert over its
// gathered rows (BLAS does the arithmetic), and scatter back by pair or add by token.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/dot.h"
#include "routing_checks.h"

namespace alphalora::routing {
namespace {

// Below this many pairs per used expert on average, one GEMM per expert costs more in call overhead
// than it saves; the pair-by-pair loops below take over. Experts no pair uses cost nothing either
// way (a serving batch's stack holds every resident adapter's experts, most of them idle).
constexpr int64_t kMinPairsPerExpertForGemm = 64;

// How the pairs spread over the experts, read once from the offsets: the experts in use, and the
// one that holds every pair (or -1). With one pair per token (top-1) that expert's pairs are the
// tokens in order (the permutation is stable), so its GEMMs need no gather and no scatter: a single
// adapter, or plain LoRA, in a serving batch.
struct ExpertUse {
  int64_t used = 0;
  int64_t holds_every_pair = -1;
};

ExpertUse expert_use(const at::Tensor& offsets, int64_t pairs) {
  const int64_t* offset = offsets.data_ptr<int64_t>();
  ExpertUse use;
  for (int64_t e = 0; e + 1 < offsets.size(0); ++e) {
    const int64_t count = offset[e + 1] - offset[e];
    use.used += count > 0;
    if (count == pairs && use.holds_every_pair < 0) use.holds_every_pair = e;
  }
  return use;
}

bool use_gemm(int64_t pairs, const ExpertUse& use) {
  return pairs >= kMinPairsPerExpertForGemm * std::max<int64_t>(1, use.used);
}

// The pair loops' sums: float for float and the 16-bit types, double for double (as on the GPU).
template <typename T>
using pair_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Every id in [0, experts): the pair loops read A[e_p] and B[e_p] without another check.
void check_ids_in_range(const at::Tensor& ids, int64_t experts, const char* op) {
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < ids.size(0); ++p) {
    TORCH_CHECK(id[p] >= 0 && id[p] < experts, op, ": expert id ", id[p], " of pair ", p, " is outside [0, ",
                experts, ")");
  }
}

// order and offsets as moe_permute makes them, as far as the kernels rely on it: every order entry a pair
// index in [0, pairs), and offsets rising from 0 to pairs, so that each expert's slice of order lies inside
// it. (Checked on every path, the pair loops' included, which read neither: a call is refused or not
// whatever the sizes.) The GPU does not synchronise to check: there a pair no valid entry names comes
// out NaN, as does an expert's weight gradient whose range is broken or names a pair outside.
void check_order_in_range(const at::Tensor& order_in, const at::Tensor& offsets_in, int64_t pairs, const char* op) {
  const at::Tensor order = order_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t* entry = order.data_ptr<int64_t>();
  for (int64_t q = 0; q < order.size(0); ++q) {
    TORCH_CHECK(entry[q] >= 0 && entry[q] < pairs, op, ": order entry ", entry[q], " at position ", q,
                " is outside [0, ", pairs, ") (order must list the pairs, from moe_permute)");
  }
  const int64_t* offset = offsets.data_ptr<int64_t>();
  const int64_t last = offsets.size(0) - 1;
  TORCH_CHECK(offset[0] == 0 && offset[last] == pairs, op, ": offsets must run from 0 to the number of pairs (",
              pairs, "), got ", offset[0], " to ", offset[last], " (from moe_permute)");
  for (int64_t e = 0; e < last; ++e) {
    TORCH_CHECK(offset[e] <= offset[e + 1], op, ": offsets must not decrease, got offsets[", e, "] = ", offset[e],
                " > offsets[", e + 1, "] = ", offset[e + 1], " (from moe_permute)");
  }
}

// order must be what moe_permute makes of these ids: every pair exactly once, each in its own expert's range
// [offsets[e], offsets[e + 1]). Entries in range (check_order_in_range, called first) are not enough: a pair listed
// twice (and so another never) or under another expert made the per-expert GEMMs compute with the wrong expert's
// weights, or leave a row zero, while the pair loops, which read ids and not order, were right: the same call gave
// different results depending on its size. One O(pairs + experts) pass. The GPU does not check (a host sync per
// call): there a pair order misses comes out NaN, and an expert whose range names another's pair gets a NaN
// weight gradient (routing_cuda.h).
void check_order_groups_pairs(const at::Tensor& ids_in, const at::Tensor& order_in, const at::Tensor& offsets_in,
                              const char* op) {
  const at::Tensor ids = ids_in.contiguous(), order = order_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t *id = ids.data_ptr<int64_t>(), *entry = order.data_ptr<int64_t>();
  const int64_t* offset = offsets.data_ptr<int64_t>();
  const int64_t experts = offsets.size(0) - 1;
  std::vector<int64_t> listed_at(static_cast<size_t>(ids.size(0)), -1);
  for (int64_t e = 0; e < experts; ++e) {
    for (int64_t q = offset[e]; q < offset[e + 1]; ++q) {
      const int64_t p = entry[q];
      TORCH_CHECK(listed_at[p] < 0, op, ": order lists pair ", p, " twice (positions ", listed_at[p], " and ", q,
                  ") and so misses another: order must be a permutation of the pairs. Pass the order that "
                  "moe_permute(expert_ids, num_experts) returns for these expert_ids");
      listed_at[p] = q;
      TORCH_CHECK(id[p] == e, op, ": order lists pair ", p, " (expert ", id[p], ") at position ", q, ", in expert ",
                  e, "'s range [", offset[e], ", ", offset[e + 1], "): order and offsets must group the pairs by "
                  "their expert_ids. Pass the order and offsets that moe_permute(expert_ids, num_experts) returns "
                  "for these expert_ids");
    }
  }
}

// The dtype the sums run in: float32 for the 16-bit types (each output rounded to them once, as on the
// GPU), the tensor's own for float32 and float64.
at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf ? at::kFloat : t.scalar_type();
}

// h[p, i] = sum_c A[e_p, i, c] x[t_p, c], pairs in parallel, float (double for double) accumulation.
template <typename T>
void shrink_pairs(const T* x, const T* A, const int64_t* ids, int64_t pairs, int64_t k, int64_t rank, int64_t in,
                  T* h) {
  at::parallel_for(0, pairs, 64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* xr = x + (p / k) * in;
      const T* a = A + ids[p] * rank * in;
      for (int64_t i = 0; i < rank; ++i) h[p * rank + i] = static_cast<T>(dot<pair_acc_t<T>>(a + i * in, xr, in));
    }
  });
}

// y[t, o] = sum_j g[p] sum_i B[e_p, o, i] h[p, i] over p = t * k + j, tokens in parallel. W is B,
// or with `transposed` B laid out as Bt[e, i, o]: then each pair adds rank contiguous rows
// (vectorised multiply-adds over o) instead of a rank-long dot per output column, which is worth
// the transpose when every expert has several pairs.
template <typename T>
void expand_tokens(const T* h, const T* W, bool transposed, const T* gates, const int64_t* ids, int64_t tokens,
                   int64_t k, int64_t out, int64_t rank, T* y) {
  using acc_t = pair_acc_t<T>;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(out);
    std::vector<acc_t> hp(rank);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = t * k + j;
        const acc_t g = static_cast<acc_t>(gates[p]);
        for (int64_t i = 0; i < rank; ++i) hp[i] = g * static_cast<acc_t>(h[p * rank + i]);
        const T* w = W + ids[p] * out * rank;
        if (transposed) {
          for (int64_t i = 0; i < rank; ++i) {
            const T* row = w + i * out;
            for (int64_t o = 0; o < out; ++o) acc[o] += hp[i] * static_cast<acc_t>(row[o]);
          }
        } else {
          for (int64_t o = 0; o < out; ++o) {
            acc_t sum = 0;
            for (int64_t i = 0; i < rank; ++i) sum += static_cast<acc_t>(w[o * rank + i]) * hp[i];
            acc[o] += sum;
          }
        }
      }
      for (int64_t o = 0; o < out; ++o) y[t * out + o] = static_cast<T>(acc[o]);
    }
  });
}

// Pairs per expert from which transposing B once beats a rank-long dot per output column.
constexpr int64_t kMinPairsPerExpertForTranspose = 8;

// The pair loops read half-precision operands element by element, converting each as they go; where
// there are at least as many pairs as experts, converting the operands to float32 once costs less and
// lets the loops vectorise (the sums run in float32 either way, so the results are the same).
bool in_float32_first(const at::Tensor& t, int64_t pairs, int64_t experts) {
  return (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf) && pairs >= experts;
}

// Calls fn(expert, pair indices of that expert) for every expert that has pairs.
template <typename Fn>
void for_each_expert(const at::Tensor& order, const at::Tensor& offsets, Fn fn) {
  const auto* off = offsets.data_ptr<int64_t>();
  for (int64_t e = 0; e + 1 < offsets.size(0); ++e) {
    if (off[e + 1] > off[e]) fn(e, order.slice(0, off[e], off[e + 1]));
  }
}

std::tuple<at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& expert_ids, int64_t num_experts,
                                                   bool /*validate: the CPU checks while it counts*/) {
  TORCH_CHECK(expert_ids.dim() == 1 && expert_ids.scalar_type() == at::kLong, "expert_ids must be flat int64");
  TORCH_CHECK(num_experts >= 1, "num_experts must be positive");
  const at::Tensor ids = expert_ids.contiguous();
  const int64_t pairs = ids.size(0);
  at::Tensor offsets = at::zeros({num_experts + 1}, ids.options());
  at::Tensor order = at::empty({pairs}, ids.options());
  const auto* id = ids.data_ptr<int64_t>();
  auto* off = offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(id[p] >= 0 && id[p] < num_experts, "expert id ", id[p], " is outside [0, ", num_experts, ")");
    ++off[id[p] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) off[e + 1] += off[e];
  std::vector<int64_t> cursor(off, off + num_experts);
  auto* out = order.data_ptr<int64_t>();
  for (int64_t p = 0; p < pairs; ++p) out[cursor[id[p]]++] = p;  // stable: pairs keep their order
  return {order, offsets};
}

at::Tensor grouped_lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& expert_ids,
                                   const at::Tensor& order, const at::Tensor& offsets) {
  check_shrink(x, A, expert_ids, order, offsets);
  const int64_t k = top_k_of(expert_ids.size(0), x.size(0));
  check_ids_in_range(expert_ids.contiguous(), A.size(0), "grouped_lora_shrink");
  check_order_in_range(order, offsets, expert_ids.size(0), "grouped_lora_shrink");
  check_order_groups_pairs(expert_ids, order, offsets, "grouped_lora_shrink");
  const ExpertUse use = expert_use(offsets, expert_ids.size(0));
  if (!use_gemm(expert_ids.size(0), use)) {
    if (in_float32_first(x, expert_ids.size(0), A.size(0))) {
      return grouped_lora_shrink_cpu(x.to(at::kFloat), A.to(at::kFloat), expert_ids, order, offsets)
          .to(x.scalar_type());
    }
    const at::Tensor xc = x.contiguous(), Ac = A.contiguous(), ids = expert_ids.contiguous();
    at::Tensor h = at::empty({ids.size(0), A.size(1)}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_lora_shrink", [&] {
      shrink_pairs<scalar_t>(xc.data_ptr<scalar_t>(), Ac.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(),
                             ids.size(0), k, Ac.size(1), Ac.size(2), h.data_ptr<scalar_t>());
    });
    return h;
  }
  if (k == 1 && use.holds_every_pair >= 0) return at::mm(x, A[use.holds_every_pair].t());
  at::Tensor h = at::zeros({expert_ids.size(0), A.size(1)}, x.options());
  for_each_expert(order, offsets, [&](int64_t e, const at::Tensor& pairs) {
    const at::Tensor rows = x.index_select(0, at::floor_divide(pairs, k));
    h.index_copy_(0, pairs, at::mm(rows, A[e].t()));
  });
  return h;
}

at::Tensor grouped_lora_expand_cpu(const at::Tensor& h, const at::Tensor& B, const at::Tensor& gates,
                                   const at::Tensor& expert_ids, const at::Tensor& order, const at::Tensor& offsets,
                                   int64_t num_tokens) {
  check_expand(h, B, gates, expert_ids, order, offsets);
  const int64_t k = top_k_of(h.size(0), num_tokens);
  check_ids_in_range(expert_ids.contiguous(), B.size(0), "grouped_lora_expand");
  check_order_in_range(order, offsets, h.size(0), "grouped_lora_expand");
  check_order_groups_pairs(expert_ids, order, offsets, "grouped_lora_expand");
  const ExpertUse use = expert_use(offsets, h.size(0));
  if (!use_gemm(h.size(0), use)) {
    if (in_float32_first(h, h.size(0), B.size(0))) {
      return grouped_lora_expand_cpu(h.to(at::kFloat), B.to(at::kFloat), gates.to(at::kFloat), expert_ids, order,
                                     offsets, num_tokens)
          .to(h.scalar_type());
    }
    const at::Tensor hc = h.contiguous(), gc = gates.contiguous(), ids = expert_ids.contiguous();
    at::Tensor y = at::empty({num_tokens, B.size(1)}, h.options());
    const bool transpose = h.size(0) >= kMinPairsPerExpertForTranspose * B.size(0);
    const at::Tensor Bc = transpose ? B.transpose(1, 2).contiguous() : B.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "grouped_lora_expand", [&] {
      expand_tokens<scalar_t>(hc.data_ptr<scalar_t>(), Bc.data_ptr<scalar_t>(), transpose, gc.data_ptr<scalar_t>(),
                              ids.data_ptr<int64_t>(), num_tokens, k, B.size(1), B.size(2), y.data_ptr<scalar_t>());
    });
    return y;
  }
  // The gate products, the GEMMs and the sum over a token's pairs in float32 for the 16-bit types (one
  // expert's B at a time: a serving stack holds many idle experts), rounded once at the end. With one
  // pair per token there is no sum over pairs: each expert's GEMM is rounded once into its tokens' rows.
  const at::ScalarType acc = acc_type(h);
  auto weighted_product = [&](const at::Tensor& hp, const at::Tensor& gp, int64_t e) {
    return at::mm(hp.to(acc) * gp.to(acc).unsqueeze(1), B[e].to(acc).t());
  };
  if (k == 1 && use.holds_every_pair >= 0) {
    return weighted_product(h, gates, use.holds_every_pair).to(h.scalar_type());
  }
  at::Tensor y = at::zeros({num_tokens, B.size(1)}, h.options().dtype(k == 1 ? h.scalar_type() : acc));
  for_each_expert(order, offsets, [&](int64_t e, const at::Tensor& pairs) {
    const at::Tensor product = weighted_product(h.index_select(0, pairs), gates.index_select(0, pairs), e);
    if (k == 1) {
      y.index_copy_(0, pairs, product.to(h.scalar_type()));
    } else {
      y.index_add_(0, at::floor_divide(pairs, k), product);
    }
  });
  return y.to(h.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> grouped_lora_shrink_backward_cpu(
    const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& A, const at::Tensor& expert_ids,
    const at::Tensor& order, const at::Tensor& offsets) {
  check_shrink_backward(grad_h, x, A, expert_ids, order, offsets);
  const int64_t k = top_k_of(expert_ids.size(0), x.size(0));
  check_order_in_range(order, offsets, expert_ids.size(0), "grouped_lora_shrink_backward");
  check_order_groups_pairs(expert_ids, order, offsets, "grouped_lora_shrink_backward");
  // grad_A[e] is one GEMM (rounded once); grad_x sums a token's k pairs, in float32 for the 16-bit types
  // (with one pair per token, each of its rows is one GEMM's, rounded once).
  const at::ScalarType acc = k == 1 ? x.scalar_type() : acc_type(x);
  at::Tensor grad_x = at::zeros(x.sizes(), x.options().dtype(acc));
  at::Tensor grad_A = at::zeros_like(A);
  for_each_expert(order, offsets, [&](int64_t e, const at::Tensor& pairs) {
    const at::Tensor tokens = at::floor_divide(pairs, k);
    const at::Tensor g = grad_h.index_select(0, pairs);  // (n_e, r)
    grad_A[e].copy_(at::mm(g.t(), x.index_select(0, tokens)));
    grad_x.index_add_(0, tokens, at::mm(g.to(acc), A[e].to(acc)));
  });
  return {grad_x.to(x.scalar_type()), grad_A};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_expand_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& B, const at::Tensor& gates,
    const at::Tensor& expert_ids, const at::Tensor& order, const at::Tensor& offsets) {
  check_expand_backward(grad_y, h, B, gates, expert_ids, order, offsets);
  const int64_t k = top_k_of(h.size(0), grad_y.size(0));
  check_order_in_range(order, offsets, h.size(0), "grouped_lora_expand_backward");
  check_order_groups_pairs(expert_ids, order, offsets, "grouped_lora_expand_backward");
  // As on the GPU: back = B_e^T grad_y is rounded to h's dtype once; the gate and h products and grad_B's
  // sum run in float32 for the 16-bit types, each rounded once.
  const at::ScalarType acc = acc_type(h);
  at::Tensor grad_h = at::zeros_like(h);
  at::Tensor grad_B = at::zeros_like(B);
  at::Tensor grad_gates = at::zeros_like(gates);
  for_each_expert(order, offsets, [&](int64_t e, const at::Tensor& pairs) {
    const at::Tensor gy = grad_y.index_select(0, at::floor_divide(pairs, k));  // (n_e, out)
    const at::Tensor hp = h.index_select(0, pairs).to(acc);                    // (n_e, r)
    const at::Tensor gp = gates.index_select(0, pairs).to(acc).unsqueeze(1);
    const at::Tensor back = at::mm(gy, B[e]).to(acc);                          // (n_e, r) = B_e^T grad_y
    grad_h.index_copy_(0, pairs, (back * gp).to(h.scalar_type()));
    grad_gates.index_copy_(0, pairs, (back * hp).sum(1).to(h.scalar_type()));
    grad_B[e].copy_(at::mm(gy.t().to(acc), hp * gp));
  });
  return {grad_h, grad_B, grad_gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CPU, m) {
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("grouped_lora_shrink", &grouped_lora_shrink_cpu);
  m.impl("grouped_lora_expand", &grouped_lora_expand_cpu);
  m.impl("grouped_lora_shrink_backward", &grouped_lora_shrink_backward_cpu);
  m.impl("grouped_lora_expand_backward", &grouped_lora_expand_backward_cpu);
}

}  // namespace alphalora::routing
