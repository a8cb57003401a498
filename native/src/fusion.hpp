// Fusion of two next-token distributions (SPEC.md sections 3-4), independent of llama.cpp.
#pragma once

#include "sda.h"

#include <cstddef>
#include <vector>

namespace sda {

struct fusion_result {
    float temperature;
    float js;  // Jensen-Shannon divergence in nats
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

// out[i] = (l_i - max l) / T with l = l_with + k a (l_with - l_without): unnormalised fused logits, what a
// sampler chain wants (softmax(out) is the fused distribution).
fusion_result fuse_scaled(const float * z_with, const float * z_without, size_t n, const sda_params & params,
                          fusion_workspace & ws, float * out);

// x <- log_softmax(x), in place.
void log_softmax_inplace(float * x, size_t n, fusion_workspace & ws);

}  // namespace sda
