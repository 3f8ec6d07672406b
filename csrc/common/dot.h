// A dot product the compiler can vectorise: eight independent partial sums instead of one
// sequential chain (strict floating-point order forbids reordering a single accumulator).
#pragma once

#include <cstdint>

namespace alphalora {

template <typename Acc, typename A, typename B>
inline Acc dot(const A* a, const B* b, int64_t n) {
  constexpr int kLanes = 8;
  Acc partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      partial[lane] += static_cast<Acc>(a[i + lane]) * static_cast<Acc>(b[i + lane]);
    }
  }
  Acc total = 0;
  for (int lane = 0; lane < kLanes; ++lane) total += partial[lane];
  for (; i < n; ++i) total += static_cast<Acc>(a[i]) * static_cast<Acc>(b[i]);
  return total;
}

}  // namespace alphalora
