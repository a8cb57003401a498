// The C entry points of sda.h that need no llama.cpp: the fusion on two raw rows, and what was built. Kept
// apart from the samplers so that the fusion compiles and runs on its own (tests build it for every SIMD
// target the machine runs).
#include "fusion.hpp"
#include "sda.h"
#include "vecmath.hpp"

#include <limits>
#include <utility>

extern "C" {

int32_t sda_abi_version(void) {
    return SDA_ABI_VERSION;
}

int32_t sda_simd_width(void) {
    return static_cast<int32_t>(sda::kWidth);
}

float sda_log_sum_exp(const float * logits, int32_t n) {
    if (!logits || n <= 0) return std::numeric_limits<float>::quiet_NaN();
    return sda::log_sum_exp(logits, static_cast<size_t>(n));
}

int32_t sda_fuse(const float * logits_with, const float * logits_without, int32_t n, const sda_params * params,
                 float * out_log_probs, float * out_temperature, float * out_js) {
    if (!logits_with || !logits_without || !params || !out_log_probs || n <= 0 || !sda::params_valid(*params)) {
        return SDA_ERR_INVALID;
    }
    thread_local sda::fusion_workspace workspace;
    const size_t count = static_cast<size_t>(n);
    const sda::fusion_result r = sda::fuse_scaled(logits_with, logits_without, count, *params, workspace,
                                                  out_log_probs);
    if (r.status != SDA_OK) return r.status;
    sda::log_softmax_inplace(out_log_probs, count);
    if (out_temperature) *out_temperature = r.temperature;
    if (out_js) *out_js = r.js;
    return 0;
}

int32_t sda_fuse_steered(const float * logits_with, const float * logits_without, int32_t n, const sda_params * params,
                         const sda_steering * steering, const sda_guards * guards,
                         float * out_log_probs, float * out_temperature, float * out_js) {
    if (!logits_with || !logits_without || !params || !out_log_probs || n <= 0 || !sda::params_valid(*params) ||
        (steering && !sda::steering_valid(*steering))) {
        return SDA_ERR_INVALID;
    }
    const sda_guards g = guards ? *guards : sda_guards{};
    for (const auto & [ids, count] : {std::pair{g.guarded, g.n_guarded}, std::pair{g.capped, g.n_capped},
                                      std::pair{g.forbidden, g.n_forbidden}}) {
        if (count < 0 || (count > 0 && !ids)) return SDA_ERR_INVALID;
        for (int32_t i = 0; i < count; ++i) {
            if (ids[i] < 0 || ids[i] >= n) return SDA_ERR_INVALID;
        }
    }
    thread_local sda::fusion_workspace workspace;
    const size_t count = static_cast<size_t>(n);
    const sda::fusion_result r = sda::fuse_scaled(logits_with, logits_without, count, *params, workspace,
                                                  out_log_probs, steering);
    if (r.status != SDA_OK) return r.status;
    if (steering && static_cast<double>(params->k) * params->strength > 0.0) {  // a = 0: prompting
        const sda_guards active{steering->echo_run > 0 ? g.guarded : nullptr, steering->echo_run > 0 ? g.n_guarded : 0,
                                g.capped, g.n_capped, g.forbidden, g.n_forbidden};
        sda::apply_guards(r, steering->guard_to, active, logits_with, logits_without,
                          [](int32_t id) { return static_cast<size_t>(id); },
                          [out_log_probs](size_t pos) -> float & { return out_log_probs[pos]; });
    }
    sda::log_softmax_inplace(out_log_probs, count);
    if (out_temperature) *out_temperature = r.temperature;
    if (out_js) *out_js = r.js;
    return 0;
}

}  // extern "C"
