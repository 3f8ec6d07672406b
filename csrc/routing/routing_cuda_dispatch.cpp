// CUDA bindings of the routing ops: checks, allocation, dtype mapping and stream, then the
// plain-CUDA launchers of routing_cuda.cu. Elementwise glue stays in ATen.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../common/cuda_binding.h"
#include "routing_checks.h"
#include "routing_cuda.h"

namespace alphalora::routing {
namespace {

// The index tensors as the kernels read them: contiguous int64.
struct Pairs {
  at::Tensor ids, order, offsets;
  Pairs(const at::Tensor& i, const at::Tensor& o, const at::Tensor& f)
      : ids(i.contiguous()), order(o.contiguous()), offsets(f.contiguous()) {}
};

std::tuple<at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& expert_ids, int64_t num_experts,
                                                    bool validate) {
  TORCH_CHECK(expert_ids.dim() == 1 && expert_ids.scalar_type() == at::kLong, "expert_ids must be flat int64");
  TORCH_CHECK(num_experts >= 1, "num_experts must be positive");
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, ids.options());
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options());
  at::Tensor order = at::empty({ids.size(0)}, ids.options());
  check(cuda::launch_permute(ids.data_ptr<int64_t>(), ids.size(0), num_experts, counts.data_ptr<int64_t>(),
                             offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>(), stream()),
        "moe_permute");
  // Ids outside [0, num_experts) are counted nowhere; finding that out costs a host sync.
  TORCH_CHECK(!validate || offsets[num_experts].item<int64_t>() == ids.size(0),
              "expert ids outside [0, ", num_experts, ") in moe_permute");
  return {order, offsets};
}

at::Tensor grouped_lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& ids_in,
                                    const at::Tensor& order_in, const at::Tensor& offsets_in) {
  check_shrink(x_in, A_in, ids_in, order_in, offsets_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Pairs pairs_of(ids_in, order_in, offsets_in);
  const at::Tensor &ids = pairs_of.ids, &order = pairs_of.order;
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous();
  const int64_t pairs = ids.size(0), rank = A.size(1), in = A.size(2);
  const int64_t k = top_k_of(pairs, x.size(0));
  at::Tensor h = at::empty({pairs, rank}, x.options());
  dispatch_float(x.scalar_type(), "grouped_lora_shrink", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(cuda::launch_gathered_dot<T>(ptr<T>(A), rank * in, in, 1, ptr<T>(x), in, k, ids.data_ptr<int64_t>(),
                                       order.data_ptr<int64_t>(), pairs, rank, in, A.size(0), ptr<T>(h), stream()),
          "grouped_lora_shrink");
  });
  return h;
}

at::Tensor grouped_lora_expand_cuda(const at::Tensor& h_in, const at::Tensor& B_in, const at::Tensor& gates_in,
                                    const at::Tensor& ids_in, const at::Tensor& order_in,
                                    const at::Tensor& offsets_in, int64_t num_tokens) {
  check_expand(h_in, B_in, gates_in, ids_in, order_in, offsets_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const Pairs pairs_of(ids_in, order_in, offsets_in);
  const at::Tensor& ids = pairs_of.ids;
  const at::Tensor h = h_in.contiguous(), B = B_in.contiguous(), gates = gates_in.contiguous();
  const int64_t out = B.size(1), rank = B.size(2);
  const int64_t k = top_k_of(h.size(0), num_tokens);
  at::Tensor y = at::empty({num_tokens, out}, h.options());
  dispatch_float(h.scalar_type(), "grouped_lora_expand", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(cuda::launch_token_expand<T>(ptr<T>(B), out * rank, rank, 1, ptr<T>(h), ptr<T>(gates),
                                       ids.data_ptr<int64_t>(), num_tokens, k, out, rank, B.size(0), ptr<T>(y), stream()),
          "grouped_lora_expand");
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grouped_lora_shrink_backward_cuda(
    const at::Tensor& grad_h_in, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& ids_in,
    const at::Tensor& order_in, const at::Tensor& offsets_in) {
  check_shrink_backward(grad_h_in, x_in, A_in, ids_in, order_in, offsets_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Pairs pairs_of(ids_in, order_in, offsets_in);
  const at::Tensor &ids = pairs_of.ids, &order = pairs_of.order, &offsets = pairs_of.offsets;
  const at::Tensor grad_h = grad_h_in.contiguous(), x = x_in.contiguous(), A = A_in.contiguous();
  const int64_t tokens = x.size(0), rank = A.size(1), in = A.size(2), experts = A.size(0);
  const int64_t k = top_k_of(ids.size(0), tokens);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_A = at::empty_like(A);
  dispatch_float(x.scalar_type(), "grouped_lora_shrink_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // grad_x[t, c] = sum_j sum_i A[e, i, c] grad_h[p, i]: a token-major expand over A^T.
    check(cuda::launch_token_expand<T>(ptr<T>(A), rank * in, 1, in, ptr<T>(grad_h), nullptr,
                                       ids.data_ptr<int64_t>(), tokens, k, in, rank, experts, ptr<T>(grad_x), stream()),
          "grouped_lora_shrink_backward (x)");
    // grad_A[e, i, c] = sum over e's pairs of grad_h[p, i] x[t, c].
    check(cuda::launch_grouped_outer<T>(ptr<T>(grad_h), rank, 1, ptr<T>(x), in, k, nullptr, ids.data_ptr<int64_t>(),
                                        order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), experts,
                                        ids.size(0), ptr<T>(grad_A), stream()),
          "grouped_lora_shrink_backward (A)");
  });
  return {grad_x, grad_A};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_expand_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& h_in, const at::Tensor& B_in, const at::Tensor& gates_in,
    const at::Tensor& ids_in, const at::Tensor& order_in, const at::Tensor& offsets_in) {
  check_expand_backward(grad_y_in, h_in, B_in, gates_in, ids_in, order_in, offsets_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const Pairs pairs_of(ids_in, order_in, offsets_in);
  const at::Tensor &ids = pairs_of.ids, &order = pairs_of.order, &offsets = pairs_of.offsets;
  const at::Tensor grad_y = grad_y_in.contiguous(), h = h_in.contiguous(), B = B_in.contiguous(),
                   gates = gates_in.contiguous();
  const int64_t pairs = h.size(0), out = B.size(1), rank = B.size(2), experts = B.size(0);
  const int64_t k = top_k_of(pairs, grad_y.size(0));
  at::Tensor back = at::empty({pairs, rank}, h.options());
  at::Tensor grad_B = at::empty_like(B);
  dispatch_float(h.scalar_type(), "grouped_lora_expand_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // back[p, i] = sum_o B[e, o, i] grad_y[t, o].
    check(cuda::launch_gathered_dot<T>(ptr<T>(B), out * rank, 1, rank, ptr<T>(grad_y), out, k,
                                       ids.data_ptr<int64_t>(), order.data_ptr<int64_t>(), pairs, rank, out, experts,
                                       ptr<T>(back), stream()),
          "grouped_lora_expand_backward (h)");
    // grad_B[e, o, i] = sum over e's pairs of gates[p] grad_y[t, o] h[p, i].
    check(cuda::launch_grouped_outer<T>(ptr<T>(grad_y), out, k, ptr<T>(h), rank, 1, ptr<T>(gates),
                                        ids.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                        offsets.data_ptr<int64_t>(), experts, pairs, ptr<T>(grad_B), stream()),
          "grouped_lora_expand_backward (B)");
  });
  const at::ScalarType accumulate = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {back * gates.unsqueeze(1), grad_B, (back.to(accumulate) * h.to(accumulate)).sum(1).to(h.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CUDA, m) {
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("grouped_lora_shrink", &grouped_lora_shrink_cuda);
  m.impl("grouped_lora_expand", &grouped_lora_expand_cuda);
  m.impl("grouped_lora_shrink_backward", &grouped_lora_shrink_backward_cuda);
  m.impl("grouped_lora_expand_backward", &grouped_lora_expand_backward_cuda);
}

}  // namespace alphalora::routing
