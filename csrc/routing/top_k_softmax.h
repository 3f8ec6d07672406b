// One token's top-k experts and their softmax, on the CPU: shared by the dense-masked router gates
// and the serving engine's expert selection, so both choose (and break ties) alike.
#pragma once

#include <cmath>
#include <cstdint>

namespace alphalora::routing {

// The top-k experts of one token by logit, largest first, equal logits by lower expert index;
// writes their softmax into gate[e] (float) and their ids into ids[0..k). `chosen`: k floats of scratch.
template <typename T>
void top_k_softmax(const T* logits, int64_t experts, int64_t top_k, float* gate, int64_t* ids, float* chosen) {
  for (int64_t e = 0; e < experts; ++e) gate[e] = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best = -1;
    float best_value = 0.0f;
    for (int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= ids[i] == e;
      float value = static_cast<float>(logits[e]);
      if (std::isnan(value)) value = -INFINITY;  // never out-ranks a number; keeps k choices well defined
      if (!taken && (best < 0 || value > best_value)) best = e, best_value = value;
    }
    ids[j] = best;
    chosen[j] = best_value;
  }
  float total = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) total += std::exp(chosen[j] - chosen[0]);
  for (int64_t j = 0; j < top_k; ++j) gate[ids[j]] = std::exp(chosen[j] - chosen[0]) / total;
}

}  // namespace alphalora::routing
