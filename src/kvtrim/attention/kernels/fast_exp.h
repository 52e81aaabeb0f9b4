// exp for the softmax kernels: scores minus their maximum are ≤ 0, and this form vectorises
// (std::exp stays scalar; the float-to-int step needs -fno-trapping-math, which cpu_kernels.py
// passes, for gcc to vectorise it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvtrim {

// exp(x) for x ≤ 0 in plain arithmetic that the compiler vectorises: x = n·ln 2 + r with ln 2 in
// two parts (Cody–Waite), e^r by Cephes' expf polynomial, 2^n set in the exponent bits. Relative
// error below 1e-7; 0 below e^-87.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return e_r * power;
}

}  // namespace kvtrim
