// Fusion of two next-token distributions (SPEC.md sections 3-4), independent of llama.cpp.
#pragma once

#include "sda.h"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace sda {

struct fusion_result {
    float temperature;
    float js;        // Jensen-Shannon divergence in nats
    int32_t status;  // SDA_OK, or SDA_ERR_NAN_* / SDA_ERR_INF_* (then out is unspecified)
};

// Reusable buffers, so that the per-token path allocates nothing once warmed up.
struct fusion_workspace {
    std::vector<float> p;  // exp(z_with - max), later the per-token JS terms
    std::vector<float> q;  // exp(z_without - max)
    void reserve(size_t n) {
        if (p.size() < n) { p.resize(n); q.resize(n); }
    }
};

bool params_valid(const sda_params & params);

// Whether load(0..n-1) holds a NaN or +inf; -inf (a masked token) is legal. !(x < +inf) is true exactly
// for those two, and an integer OR-reduction of it vectorises, also over the strided logits of a
// llama_token_data array (49,152 entries: about 6 us there, 2 us over a contiguous row, on AVX-512).
template <typename Load>
inline bool has_nan_or_pos_inf(size_t n, Load load) {
    constexpr float inf = std::numeric_limits<float>::infinity();
    int32_t bad = 0;
    for (size_t i = 0; i < n; ++i) bad |= !(load(i) < inf);
    return bad != 0;
}

// Which fault a row holds, as the with-row code (SDA_ERR_NAN_WITH before SDA_ERR_INF_WITH; the
// without-row codes are these minus 2), or SDA_OK. A plain scan: only the fault path runs it.
template <typename Load>
inline int32_t classify_row(size_t n, Load load) {
    bool pos_inf = false;
    for (size_t i = 0; i < n; ++i) {
        const float x = load(i);
        if (x != x) return SDA_ERR_NAN_WITH;
        pos_inf = pos_inf || x == std::numeric_limits<float>::infinity();
    }
    return pos_inf ? SDA_ERR_INF_WITH : SDA_OK;
}

// out[i] = (l_i - max l) / T with l = l_with + k a (l_with - l_without): unnormalised fused logits, what a
// sampler chain wants (softmax(out) is the fused distribution). A NaN or +inf in either row gives status
// SDA_ERR_NAN_* / SDA_ERR_INF_* (NaN first, the with-row first), found inside passes the fusion makes anyway.
// ``out_stride``: out[i * out_stride] is written, so a sampler can write straight into llama_token_data.
fusion_result fuse_scaled(const float * z_with, const float * z_without, size_t n, const sda_params & params,
                          fusion_workspace & ws, float * out, size_t out_stride = 1);

// x <- log_softmax(x), in place.
void log_softmax_inplace(float * x, size_t n, fusion_workspace & ws);

}  // namespace sda
