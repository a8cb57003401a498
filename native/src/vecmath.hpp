// Small branch-free math that compilers vectorise, shared by the fusion and the nucleus sampler.
#pragma once

#include <cstdint>
#include <cstring>

namespace sda {

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); 0 for x < -87.3 and for -inf. Inline and
// branch-free, unlike std::exp, so loops calling it vectorise.
inline float exp_nonpositive(float x) {
    const bool underflow = !(x >= -87.3365447f);  // also true for NaN
    x = underflow ? 0.0f : x;
    const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    float r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    poly = poly * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return underflow ? 0.0f : poly * scale;
}

}  // namespace sda
