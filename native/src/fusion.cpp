// The arithmetic is written as plain element-wise loops over contiguous float arrays with branch-free
// selects so that the compiler vectorises every pass; sums are accumulated in double lanes, because
// vocabularies reach 262,144 entries and the temperature is very sensitive to the JS divergence
// (dT/dJS = T ln2 / 0.01 in paper mode).
#include "fusion.hpp"
#include "vecmath.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace sda {
namespace {

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kPaperSigma = 0.01;
constexpr float kPaperMinTemperature = 0.2f;

// log(1 + u) for u in [0, 1] as 2 atanh(u / (2 + u)); |t| <= 1/3 so eight odd terms reach float precision,
// and small u keeps full relative accuracy.
inline float log1p_unit(float u) {
    const float t = u / (2.0f + u);
    const float t2 = t * t;
    float s = 1.0f / 15.0f;
    s = s * t2 + 1.0f / 13.0f;
    s = s * t2 + 1.0f / 11.0f;
    s = s * t2 + 1.0f / 9.0f;
    s = s * t2 + 1.0f / 7.0f;
    s = s * t2 + 1.0f / 5.0f;
    s = s * t2 + 1.0f / 3.0f;
    s = s * t2 + 1.0f;
    return 2.0f * t * s;
}

constexpr size_t kLanes = 8;

double lane_sum(const float * x, size_t n) {
    double acc[kLanes] = {0};
    size_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (size_t j = 0; j < kLanes; ++j) acc[j] += x[i + j];
    }
    double total = 0;
    for (; i < n; ++i) total += x[i];
    for (size_t j = 0; j < kLanes; ++j) total += acc[j];
    return total;
}

// Ignores NaN entries (a NaN compares false); exp_shifted finds them.
float max_of(const float * x, size_t n) {
    float lanes[kLanes];
    std::fill(lanes, lanes + kLanes, kNegInf);
    size_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (size_t j = 0; j < kLanes; ++j) lanes[j] = x[i + j] > lanes[j] ? x[i + j] : lanes[j];
    }
    float m = kNegInf;
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    for (size_t j = 0; j < kLanes; ++j) m = lanes[j] > m ? lanes[j] : m;
    return m;
}

struct shifted_exp_sum {
    float max;      // -inf when every entry is -inf
    double sum;     // sum of exp(x - max)
    int32_t fault;  // SDA_OK, SDA_ERR_NAN_WITH or SDA_ERR_INF_WITH: then max and sum mean nothing
    double log_sum_exp() const { return static_cast<double>(max) + std::log(sum); }
};

int32_t classify(const float * x, size_t n) {
    return classify_row(n, [x](size_t i) { return x[i]; });
}

// Writes exp(x - max) into e (zeros when every entry is -inf). The non-finite check rides on the two passes
// a softmax makes anyway: +inf is the max, and a NaN goes through the exp pass unchanged (exp_nonpositive
// would flush it to 0), so that the sum is NaN.
shifted_exp_sum exp_shifted(const float * x, size_t n, float * e) {
    constexpr float kPosInf = std::numeric_limits<float>::infinity();
    const float m = max_of(x, n);
    if (!(m < kPosInf)) return {m, 0.0, classify(x, n)};
    if (!(m > kNegInf)) {  // no exp pass to see a NaN: rare enough for a scan
        if (classify(x, n) != SDA_OK) return {m, 0.0, SDA_ERR_NAN_WITH};
        std::fill(e, e + n, 0.0f);
        return {m, 0.0, SDA_OK};
    }
    for (size_t i = 0; i < n; ++i) {
        const float d = x[i] - m;
        const float v = exp_nonpositive(d);
        e[i] = d == d ? v : d;
    }
    const double sum = lane_sum(e, n);
    return {m, sum, sum == sum ? SDA_OK : SDA_ERR_NAN_WITH};
}

float temperature_for(double js, const sda_params & params) {
    switch (params.temperature_mode) {
        case SDA_TEMPERATURE_PAPER: {
            // Never above T0, also when the user picks a T0 below the paper's floor.
            const float floor_t = std::min(kPaperMinTemperature, params.t0);
            const double t = params.t0 * std::pow(0.5, js / kPaperSigma);
            return std::max(floor_t, static_cast<float>(t));
        }
        case SDA_TEMPERATURE_REFERENCE:
            return static_cast<float>(params.t0 * std::pow(0.5, js / (2.0 * std::log(2.0))));
        default:
            return params.t0;
    }
}

}  // namespace

bool params_valid(const sda_params & params) {
    return std::isfinite(params.strength) && params.strength >= 0.0f && std::isfinite(params.k) &&
           params.k >= 0.0f && std::isfinite(params.t0) && params.t0 > 0.0f &&
           params.temperature_mode >= SDA_TEMPERATURE_PAPER && params.temperature_mode <= SDA_TEMPERATURE_FIXED;
}

fusion_result fuse_scaled(const float * z_with, const float * z_without, size_t n, const sda_params & params,
                          fusion_workspace & ws, float * out, size_t out_stride) {
    ws.reserve(n);
    float * p = ws.p.data();
    float * q = ws.q.data();
    const shifted_exp_sum with = exp_shifted(z_with, n, p);
    if (with.fault != SDA_OK) return {params.t0, 0.0f, with.fault};
    const shifted_exp_sum without = exp_shifted(z_without, n, q);
    if (without.fault != SDA_OK) return {params.t0, 0.0f, without.fault - 2};
    if (!(with.max > kNegInf)) {  // nothing can be sampled: leave it to the rest of the chain
        for (size_t i = 0; i < n; ++i) out[i * out_stride] = kNegInf;
        return {params.t0, 0.0f, SDA_OK};
    }
    // A without-stream with no finite logit is treated as "no steering signal": log Q = -inf everywhere.
    // The log-probabilities are formed in double: with logits of magnitude 1e4, float rounding of
    // z - logsumexp(z) alone would cost 1e-3 in the steered difference.
    const double shift_with = with.log_sum_exp();
    const double shift_without = without.max > kNegInf ? without.log_sum_exp() : -static_cast<double>(kNegInf);
    const float inv_sum_with = static_cast<float>(1.0 / with.sum);
    const float inv_sum_without = without.max > kNegInf ? static_cast<float>(1.0 / without.sum) : 0.0f;
    const double gain = static_cast<double>(params.k) * params.strength;

    for (size_t i = 0; i < n; ++i) {
        const double lp = z_with[i] - shift_with;        // log P
        const double lq = z_without[i] - shift_without;  // log Q
        const float prob_p = p[i] * inv_sum_with;
        const float prob_q = q[i] * inv_sum_without;

        // With M = (P + Q) / 2 and d = log Q - log P:
        //   log P - log M = ln2 - max(d, 0) - log1p(exp(-|d|)),  log Q - log M = ln2 - max(-d, 0) - (same).
        // Exact cancellation at P == Q, no log of an underflowed M; zero-probability terms are masked.
        const float d = static_cast<float>(lq - lp);
        const float soft = log1p_unit(exp_nonpositive(-std::fabs(d)));
        const float term_p = prob_p > 0.0f ? prob_p * (kLn2 - (d > 0.0f ? d : 0.0f) - soft) : 0.0f;
        const float term_q = prob_q > 0.0f ? prob_q * (kLn2 - (d < 0.0f ? -d : 0.0f) - soft) : 0.0f;
        p[i] = term_p + term_q;
    }

    const double js = std::max(0.0, 0.5 * lane_sum(p, n));
    const float temperature = temperature_for(js, params);

    // A token impossible with the instruction stays impossible; one impossible only without it would get
    // +inf from the difference, so it keeps its with-instruction log-prob instead.
    const auto steered = [&](size_t i) {
        const double lp = z_with[i] - shift_with;
        const double lq = z_without[i] - shift_without;
        constexpr double neg_inf = -std::numeric_limits<double>::infinity();
        double l = lp + gain * (lp - lq);
        l = lq == neg_inf ? lp : l;
        return lp == neg_inf ? neg_inf : l;
    };
    // Shifted by their maximum before the float store: steered values reach |l| ~ 1e5 for logits of
    // magnitude 1e4, where float resolution (0.008) would swamp the result.
    double lanes[kLanes];
    std::fill(lanes, lanes + kLanes, -std::numeric_limits<double>::infinity());
    size_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (size_t j = 0; j < kLanes; ++j) {
            const double l = steered(i + j);
            lanes[j] = l > lanes[j] ? l : lanes[j];
        }
    }
    double top = -std::numeric_limits<double>::infinity();
    for (; i < n; ++i) top = std::max(top, steered(i));
    for (size_t j = 0; j < kLanes; ++j) top = std::max(top, lanes[j]);

    const double inv_t = 1.0 / temperature;
    if (out_stride == 1) {
        for (size_t k = 0; k < n; ++k) out[k] = static_cast<float>((steered(k) - top) * inv_t);
    } else {
        for (size_t k = 0; k < n; ++k) out[k * out_stride] = static_cast<float>((steered(k) - top) * inv_t);
    }
    return {temperature, static_cast<float>(js), SDA_OK};
}

void log_softmax_inplace(float * x, size_t n, fusion_workspace & ws) {
    ws.reserve(n);
    const shifted_exp_sum s = exp_shifted(x, n, ws.p.data());
    if (s.fault != SDA_OK || !(s.max > kNegInf)) return;
    const float lse = static_cast<float>(s.log_sum_exp());
    for (size_t i = 0; i < n; ++i) x[i] -= lse;
}

}  // namespace sda
