// Fusion of two next-token distributions (SPEC.md sections 3-4), independent of llama.cpp.
#pragma once

#include "sda.h"

#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace sda {

struct fusion_result {
    float temperature;
    float js;        // Jensen-Shannon divergence in nats
    int32_t status;  // SDA_OK, or SDA_ERR_NAN_* / SDA_ERR_INF_* (then out is unspecified)
    // out = l / T - shift for the steered logits; the echo guard's value of a token is
    // z_without * inv_t - guard_offset (l_without on the same scale; +inf offset when there is no without-row),
    // or for SDA_GUARD_TO_PROMPT at most z_with * inv_t - prompt_offset (l_with on the same scale).
    double inv_t = 0.0;
    double guard_offset = 0.0;
    double prompt_offset = 0.0;
};

// The fusion works through the vocabulary in blocks of this many tokens (fusion.cpp).
constexpr size_t kFusionBlock = 1024;

// What the first pass learns about one block of both rows.
struct fusion_block {
    float max_with, max_without;      // -inf when the block holds no finite logit
    float scale_with, scale_without;  // exp(block max - row max): probability = exp(z - block max) * scale / sum
    double sum_with, sum_without;     // sums of exp(z - block max)
    bool masked;                      // some token is -inf in either row
};

// Reusable buffers, so that the per-token path allocates nothing once warmed up.
struct fusion_workspace {
    std::vector<float> p;  // exp(z_with - block max)
    std::vector<float> q;  // exp(z_without - block max)
    std::vector<fusion_block> blocks;
    void reserve(size_t n) {
        const size_t padded = n + 16;  // room for a full last pack of the widest SIMD target
        if (p.size() < padded) {
            p.resize(padded);
            q.resize(padded);
            blocks.resize((n + kFusionBlock - 1) / kFusionBlock);
        }
    }
};

// Receives the fused logits block by block, in order, so that a caller can put them where it wants (strided
// into llama_token_data) and check its own data on the way: blocks of at most kFusionBlock values, in
// order. Returning false stops the fusion.
class fused_sink {
public:
    virtual bool write(size_t start, const float * values, size_t count) = 0;

protected:
    ~fused_sink() = default;
};

// fusion_result.status when a sink returned false (not an sda_status: it never leaves libsda).
constexpr int32_t kSinkRefused = 1;

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
// sampler chain wants (softmax(out) is the fused distribution; max out is 0 up to float rounding of the
// steered logits). A NaN or +inf in either row gives status SDA_ERR_NAN_* / SDA_ERR_INF_* (NaN first, the
// with-row first) before anything is written, found inside a pass the fusion makes anyway.
// `steering` nullptr (or all zero): the paper's formula. Its clip and plausibility apply here; the echo guard is
// the caller's (guard_value on the result).
fusion_result fuse_scaled(const float * z_with, const float * z_without, size_t n, const sda_params & params,
                          fusion_workspace & ws, fused_sink & sink, const sda_steering * steering = nullptr);
fusion_result fuse_scaled(const float * z_with, const float * z_without, size_t n, const sda_params & params,
                          fusion_workspace & ws, float * out, const sda_steering * steering = nullptr);

// Whether a steering changes anything at all (with a > 0).
inline bool steering_bounds(const sda_steering * s) {
    return s != nullptr && (s->clip > 0.0f || s->plausibility > 0.0f);
}
bool steering_valid(const sda_steering & s);

// The echo guard's fused value of a token whose current fused value is `fused` (unchanged when -inf: a token
// impossible stays impossible).
inline float guard_value(const fusion_result & r, int32_t guard_to, float z_with, float z_without, float fused) {
    if (fused == -std::numeric_limits<float>::infinity()) return fused;
    if (guard_to == SDA_GUARD_TO_PROMPT) {
        return std::min(fused, static_cast<float>(static_cast<double>(z_with) * r.inv_t - r.prompt_offset));
    }
    return static_cast<float>(static_cast<double>(z_without) * r.inv_t - r.guard_offset);
}

// A forbidden token's fused value: at most min(l_with, l_without) on the fused scale, so the copy the with-prompt
// makes is never rewarded, while a suppression the steering gave it (below l_with) stays (-inf stays -inf).
inline float forbid_value(const fusion_result & r, float z_with, float z_without, float fused) {
    if (fused == -std::numeric_limits<float>::infinity()) return fused;
    const double with_value = static_cast<double>(z_with) * r.inv_t - r.prompt_offset;
    const double without_value = static_cast<double>(z_without) * r.inv_t - r.guard_offset;
    return std::min(fused, static_cast<float>(std::min(with_value, without_value)));
}

// The guards of one step on the fused logits, in order: capped ids (no more than prompting), the echo guard's
// (guard_to), forbidden ids (min(l_with, l_without)). `place(id)`: the token's place in `fused`, `with` (by place)
// and `without` (by id), or SIZE_MAX when it is not a candidate; `fused(place)`: its fused logit, by reference.
template <typename Place, typename Fused>
void apply_guards(const fusion_result & r, int32_t guard_to, const sda_guards & g, const float * with_by_place,
                  const float * without_by_id, Place place, Fused fused) {
    const auto each = [&](const int32_t * ids, int32_t n, auto value) {
        for (int32_t i = 0; i < n; ++i) {
            const size_t pos = place(ids[i]);
            if (pos == static_cast<size_t>(-1)) continue;
            float & v = fused(pos);
            v = value(with_by_place[pos], without_by_id[ids[i]], v);
        }
    };
    each(g.capped, g.n_capped,
         [&](float zw, float zo, float v) { return guard_value(r, SDA_GUARD_TO_PROMPT, zw, zo, v); });
    each(g.guarded, g.n_guarded, [&](float zw, float zo, float v) { return guard_value(r, guard_to, zw, zo, v); });
    each(g.forbidden, g.n_forbidden, [&](float zw, float zo, float v) { return forbid_value(r, zw, zo, v); });
}

// x <- log_softmax(x), in place.
void log_softmax_inplace(float * x, size_t n);

// log(sum(exp(x))): +inf when x holds a +inf, else NaN when it holds a NaN, -inf when every entry is -inf.
float log_sum_exp(const float * x, size_t n);

}  // namespace sda
