// Three passes over the two rows, in blocks of kFusionBlock tokens, one SIMD pack (vecmath.hpp) at a time:
//   1. per block, while it sits in L1: both maxima, whether a row is -inf somewhere, the top steered logit,
//      then exp(z - block max) of both rows, kept, and their sums, which also show a NaN or +inf (an online
//      softmax by blocks: one read of the rows from memory);
//   2. the JS divergence;
//   3. the fused logits, in double, handed to the sink block by block.
// Passes 1-2 work in float on logits shifted by a maximum: there every term that carries probability mass is
// small, so float is exact enough, and the sums run in float over short runs, then in double lanes
// (vocabularies reach 262,144 entries and the temperature is very sensitive to the JS divergence:
// dT/dJS = T ln2 / 0.01 in paper mode). Pass 3 works in double because steered logits reach |l| ~ 1e5 for
// logits of magnitude 1e4, where float resolution (0.008) would swamp the result.
#include "fusion.hpp"
#include "vecmath.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace sda {
namespace {

constexpr float kLn2 = 0.693147180559945309f;
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
constexpr double kPaperSigma = 0.01;
constexpr float kPaperMinTemperature = 0.2f;
constexpr size_t kBlock = kFusionBlock;  // a multiple of every kWidth

// Calls body(pack_with, pack_without, i) for every pack of the two rows in [begin, end); the last partial pack
// is padded with -inf, which every pass treats as a masked token.
template <typename Body>
inline void for_each_pack(const float * zw, const float * zo, size_t begin, size_t end, Body body) {
    size_t i = begin;
    for (; i + kWidth <= end; i += kWidth) body(load(zw + i), load(zo + i), i);
    if (i < end) body(load_tail(zw + i, end - i, -kInf), load_tail(zo + i, end - i, -kInf), i);
}

int32_t classify(const float * x, size_t n) {
    return classify_row(n, [x](size_t i) { return x[i]; });
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

// What pass 1 found over the whole vocabulary.
struct first_pass {
    int32_t fault;  // SDA_OK or the fault code (then nothing else is meaningful)
    float max_with, max_without;
    // The top steered logit, l = (1 + g) lp - g lq, up to the log-sum-exps: max (1 + g) zw - g zo over tokens
    // with both rows finite, and max zw over tokens masked only without the instruction (l = lp there).
    float top_both, top_with_only;
};

first_pass scan_and_exp(const float * zw, const float * zo, size_t n, float gain, fusion_workspace & ws) {
    float * p = ws.p.data();
    float * q = ws.q.data();
    const vfloat neg_inf = splat(-kInf, vfloat{});
    vfloat top_both = neg_inf, top_with_only = neg_inf;
    first_pass out{SDA_OK, -kInf, -kInf, -kInf, -kInf};
    for (size_t start = 0, b = 0; start < n; start += kBlock, ++b) {
        const size_t end = std::min(n, start + kBlock);
        vfloat mw = neg_inf, mo = neg_inf, lowest = splat(kInf, vfloat{}), block_top = neg_inf;
        const float keep = 1.0f + gain;
        for_each_pack(zw, zo, start, end, [&](vfloat a, vfloat c, size_t) {
            mw = vmax(a, mw);  // a NaN never wins (compares false): it shows in the sums below
            mo = vmax(c, mo);
            lowest = vmin(a, vmin(c, lowest));
            block_top = vmax(a * keep - c * gain, block_top);  // wrong where a row is -inf: redone below
        });
        fusion_block & blk = ws.blocks[b];
        blk.max_with = hmax(mw);
        blk.max_without = hmax(mo);
        blk.masked = !(hmin(lowest) > -kInf);
        if (blk.masked) {  // rare: tokens masked in a row. The block is in L1.
            block_top = neg_inf;
            for_each_pack(zw, zo, start, end, [&](vfloat a, vfloat c, size_t) {
                const vint without_masked = c == -kInf;
                // gain * c is NaN for g = 0 and c = -inf: those lanes take the other maximum.
                block_top = vmax(select(without_masked, neg_inf, a * keep - c * gain), block_top);
                top_with_only = vmax(select(without_masked, a, neg_inf), top_with_only);
            });
        }
        top_both = vmax(block_top, top_both);
        // exp(z - block max) while the block is still in L1; a block with no finite logit has weight 0.
        const float shift_w = blk.max_with > -kInf ? blk.max_with : 0.0f;
        const float shift_o = blk.max_without > -kInf ? blk.max_without : 0.0f;
        lane_sum sum_w, sum_o;
        for_each_pack(zw, zo, start, end, [&](vfloat a, vfloat c, size_t i) {
            const vfloat ea = exp_nonpositive(a - shift_w);
            const vfloat ec = exp_nonpositive(c - shift_o);
            store(p + i, ea);  // the workspace has room for a padded last pack
            store(q + i, ec);
            sum_w.add(ea);
            sum_o.add(ec);
        });
        blk.sum_with = sum_w.total();
        blk.sum_without = sum_o.total();
        // +inf is a block max; a NaN makes a sum NaN (so does +inf: inf - inf). Only a faulty row is scanned
        // again, the with-row first, as documented.
        if (!(blk.max_with < kInf && blk.max_without < kInf && blk.sum_with == blk.sum_with &&
              blk.sum_without == blk.sum_without)) {
            const int32_t with_fault = classify(zw, n);
            out.fault = with_fault != SDA_OK ? with_fault : classify(zo, n) - 2;
            return out;
        }
        out.max_with = std::max(out.max_with, blk.max_with);
        out.max_without = std::max(out.max_without, blk.max_without);
    }
    out.top_both = hmax(top_both);
    out.top_with_only = hmax(top_with_only);
    return out;
}

// Pass 2 over one block: the sum of P (lp - lm) + Q (lq - lm) (see fuse_scaled). Masked: the block holds -inf
// logits, whose d is +-inf or NaN.
template <bool Masked>
double js_block(const float * zw, const float * zo, const float * p, const float * q, size_t start, size_t end,
                float scale_p, float scale_q, float max_with, float max_without, float log_ratio) {
    lane_sum terms;
    for_each_pack(zw, zo, start, end, [&](vfloat a, vfloat c, size_t i) {
        const vfloat prob_p = load(p + i) * scale_p;
        const vfloat prob_q = load(q + i) * scale_q;
        const vfloat d = ((c - max_without) - (a - max_with)) - log_ratio;
        // = (P + Q)(ln2 - soft) - min(P, Q) |d|: the max(d, 0) terms only touch the smaller probability.
        const vfloat lo = vmin(prob_p, prob_q), hi = vmax(prob_p, prob_q);
        const vfloat zero = splat(0.0f, a);
        vfloat cut = lo * vabs(d);
        if (Masked) cut = select(lo > 0.0f, cut, zero);  // 0 * inf
        terms.add(select(hi > 0.0f, (lo + hi) * (kLn2 - log1p_ratio(lo, hi)) - cut, zero));  // 0 / 0
    });
    return terms.total();
}

// Pass 3 on one pack of doubles (V = vdouble) or one double: (l - top) / T. Where neither row is -inf, that is
// alpha zw + beta zo - offset, two fused multiply-adds; a token impossible without the instruction (the
// difference would give it +inf) keeps its with-instruction log-prob, zw / T - offset_with; a token impossible
// with it stays impossible.
struct pass3_constants {
    double alpha, beta, offset, inv_t, offset_with;
};

template <bool Masked, typename V>
inline V fused_value(V zw, V zo, const pass3_constants & c) {
    const V out = zw * c.alpha + (zo * c.beta - c.offset);
    if (!Masked) return out;
    const V unsteered = select(zo == kNegInfD, zw * c.inv_t - c.offset_with, out);
    return select(zw == kNegInfD, splat(kNegInfD, out), unsteered);
}

// Pass 3 over one block, into `out` (its first token at out[0]). Masked: as for js_block.
template <bool Masked>
void fused_block(const float * zw, const float * zo, size_t start, size_t end, const pass3_constants & c,
                 float * out) {
    size_t i = start;
    for (; i + kHalf <= end; i += kHalf) {
        const vdouble v = fused_value<Masked>(widen(load_half(zw + i)), widen(load_half(zo + i)), c);
        store_half(out + (i - start), narrow(v));
    }
    for (; i < end; ++i) out[i - start] = narrow(fused_value<true>(widen(zw[i]), widen(zo[i]), c));  // the tail
}

// Pass 3 with steering bounds (sda_steering's clip and plausibility), in double: l = lp + g clamp(lp - lq, -c, c)
// with lp = zw - lse_with, lq = zo - lse_without, output (l - top) / T. The same masking rules as fused_value,
// and tokens below the plausibility floor (zw < max zw + log alpha) dropped. A separate path, so that the paper's
// stays exactly as it was.
struct bounded_constants {
    double gain, lse_with, lse_without, top, inv_t, clip, floor;  // clip <= 0: none; floor: -inf for none
};

template <typename V>
inline V bounded_value(V zw, V zo, const bounded_constants & c) {
    const V lp = zw - c.lse_with;
    V d = lp - (zo - c.lse_without);
    if (c.clip > 0.0) {
        const V hi = splat(c.clip, d);
        d = select(d > hi, hi, d);
        d = select(d < -hi, -hi, d);
    }
    V out = (lp + d * c.gain - c.top) * c.inv_t;
    out = select(zo == kNegInfD, (lp - c.top) * c.inv_t, out);  // impossible without the instruction: unsteered
    return select((zw < c.floor) | (zw == kNegInfD), splat(kNegInfD, out), out);  // | : vector masks too
}

void bounded_block(const float * zw, const float * zo, size_t start, size_t end, const bounded_constants & c,
                   float * out) {
    size_t i = start;
    for (; i + kHalf <= end; i += kHalf) {
        const vdouble v = bounded_value(widen(load_half(zw + i)), widen(load_half(zo + i)), c);
        store_half(out + (i - start), narrow(v));
    }
    for (; i < end; ++i) out[i - start] = narrow(bounded_value(widen(zw[i]), widen(zo[i]), c));
}

class contiguous_sink final : public fused_sink {
public:
    explicit contiguous_sink(float * out) : out_(out) {}
    bool write(size_t start, const float * values, size_t count) override {
        std::copy(values, values + count, out_ + start);
        return true;
    }

private:
    float * out_;
};

}  // namespace

bool params_valid(const sda_params & params) {
    return std::isfinite(params.strength) && params.strength >= 0.0f && std::isfinite(params.k) &&
           params.k >= 0.0f && std::isfinite(params.t0) && params.t0 > 0.0f &&
           params.temperature_mode >= SDA_TEMPERATURE_PAPER && params.temperature_mode <= SDA_TEMPERATURE_FIXED;
}

bool steering_valid(const sda_steering & s) {
    return std::isfinite(s.clip) && s.clip >= 0.0f && std::isfinite(s.plausibility) && s.plausibility >= 0.0f &&
           s.plausibility < 1.0f && s.echo_run >= 0 && s.onset >= 0 &&
           (s.guard_to == SDA_GUARD_TO_WITHOUT || s.guard_to == SDA_GUARD_TO_PROMPT);
}

fusion_result fuse_scaled(const float * z_with, const float * z_without, size_t n, const sda_params & params,
                          fusion_workspace & ws, fused_sink & sink, const sda_steering * steering) {
    ws.reserve(n);
    const double gain = static_cast<double>(params.k) * params.strength;
    const size_t n_blocks = (n + kBlock - 1) / kBlock;

    // 1. Maxima, faults, sums of exps.
    const first_pass first = scan_and_exp(z_with, z_without, n, static_cast<float>(gain), ws);
    if (first.fault != SDA_OK) return {params.t0, 0.0f, first.fault};
    if (!(first.max_with > -kInf)) {  // nothing can be sampled: leave it to the rest of the chain
        float masked[kBlock];
        std::fill(masked, masked + kBlock, -kInf);
        for (size_t start = 0; start < n; start += kBlock) {
            if (!sink.write(start, masked, std::min(kBlock, n - start))) return {params.t0, 0.0f, kSinkRefused};
        }
        return {params.t0, 0.0f, SDA_OK, 0.0, std::numeric_limits<double>::infinity()};
    }
    // A without-stream with no finite logit is treated as "no steering signal": log Q = -inf everywhere.
    const bool has_without = first.max_without > -kInf;
    const float mw = first.max_with;
    const float mo = has_without ? first.max_without : 0.0f;
    // Each block's weight relative to the row maximum (exp of a difference <= 0: float is enough here).
    double total_w = 0.0, total_o = 0.0;
    for (size_t b = 0; b < n_blocks; ++b) {
        fusion_block & blk = ws.blocks[b];
        blk.scale_with = exp_nonpositive(blk.max_with - mw);
        blk.scale_without = exp_nonpositive(blk.max_without - mo);
        total_w += blk.sum_with * blk.scale_with;
        total_o += blk.sum_without * blk.scale_without;
    }
    const double log_total_w = std::log(total_w);
    const double log_total_o = has_without ? std::log(total_o) : 0.0;
    const double lse_with = mw + log_total_w;  // log-sum-exp of the rows
    const double lse_without = has_without ? mo + log_total_o : std::numeric_limits<double>::infinity();

    // 2. JS divergence. With M = (P + Q) / 2 and d = log Q - log P:
    //   log P - log M = ln2 - max(d, 0) - log1p(exp(-|d|)),  log Q - log M = ln2 - max(-d, 0) - (same),
    // exact cancellation at P == Q and no log of an underflowed M; exp(-|d|) = min(P, Q) / max(P, Q) costs no
    // exp (log1p_ratio). Zero-probability terms are masked (their d may be +-inf or NaN). In float: the
    // probabilities are exact to rounding, and d comes from logits shifted by their maximum.
    const double inv_w = 1.0 / total_w;
    const double inv_o = has_without ? 1.0 / total_o : 0.0;
    const float log_ratio = static_cast<float>(log_total_o - log_total_w);  // d = (so - sw) - log_ratio
    double js_sum = 0.0;
    for (size_t b = 0; b < n_blocks; ++b) {
        const fusion_block & blk = ws.blocks[b];
        const double scale_p = blk.scale_with * inv_w, scale_q = blk.scale_without * inv_o;
        const float sp = static_cast<float>(scale_p), sq = static_cast<float>(scale_q);
        const size_t start = b * kBlock, end = std::min(n, start + kBlock);
        const float * p = ws.p.data();
        const float * q = ws.q.data();
        js_sum += blk.masked ? js_block<true>(z_with, z_without, p, q, start, end, sp, sq, mw, mo, log_ratio)
                             : js_block<false>(z_with, z_without, p, q, start, end, sp, sq, mw, mo, log_ratio);
    }
    const double js = std::max(0.0, 0.5 * js_sum);
    const float temperature = temperature_for(js, params);

    // The top steered logit: only a shift of pass 3's output, whose softmax does not depend on it, so float
    // rounding in pass 1 does no harm.
    double top = first.top_with_only > -kInf ? first.top_with_only - lse_with : kNegInfD;
    if (first.top_both > -kInf) top = std::max(top, first.top_both - (1.0 + gain) * lse_with + gain * lse_without);
    if (!std::isfinite(top)) top = 0.0;  // float overflow of |logits| ~ 1e37: the output stays correct, unshifted

    // 3. Fused logits (l - top) / T with l = lp + g (lp - lq) = (1 + g) zw - g zo - (1 + g) lse_with + g lse_without.
    const double inv_t = 1.0 / temperature;
    // No without-row: l_without is -inf everywhere, and so is a guarded token (as in the numpy reference).
    double shift = top;  // what pass 3 subtracts (set below for the bounded path)
    double guard_offset = 0.0;
    const pass3_constants c{(1.0 + gain) * inv_t, -gain * inv_t,
                            has_without ? ((1.0 + gain) * lse_with - gain * lse_without + top) * inv_t : 0.0,
                            inv_t, (lse_with + top) * inv_t};
    // Bounds change nothing at a = 0 (prompting with the instruction stays exactly that).
    const bool bounded = steering_bounds(steering) && gain > 0.0;
    // The shift: with a clip, max l <= max lp + g c (lp <= 0 at the top token), so outputs stay near 0 where
    // the probability is (float resolution); the paper's top can lie far above the bounded maximum.
    const double bounded_top = bounded && steering->clip > 0.0f
                                   ? std::min(top, (mw - lse_with) + gain * static_cast<double>(steering->clip))
                                   : top;
    const bounded_constants bc{gain, lse_with, lse_without, bounded_top, inv_t,
                               bounded ? static_cast<double>(steering->clip) : 0.0,
                               bounded && steering->plausibility > 0.0f
                                   ? static_cast<double>(mw) + std::log(static_cast<double>(steering->plausibility))
                                   : kNegInfD};
    if (bounded) shift = bounded_top;
    guard_offset = has_without ? (lse_without + shift) * inv_t : std::numeric_limits<double>::infinity();
    const double prompt_offset = (lse_with + shift) * inv_t;
    float block[kBlock];
    for (size_t b = 0; b < n_blocks; ++b) {
        const size_t start = b * kBlock, end = std::min(n, start + kBlock);
        if (bounded) {
            bounded_block(z_with, z_without, start, end, bc, block);
        } else if (ws.blocks[b].masked) {
            fused_block<true>(z_with, z_without, start, end, c, block);
        } else {
            fused_block<false>(z_with, z_without, start, end, c, block);
        }
        if (!sink.write(start, block, end - start)) {
            return {temperature, static_cast<float>(js), kSinkRefused, inv_t, guard_offset, prompt_offset};
        }
    }
    return {temperature, static_cast<float>(js), SDA_OK, inv_t, guard_offset, prompt_offset};
}

fusion_result fuse_scaled(const float * z_with, const float * z_without, size_t n, const sda_params & params,
                          fusion_workspace & ws, float * out, const sda_steering * steering) {
    contiguous_sink sink(out);
    return fuse_scaled(z_with, z_without, n, params, ws, sink, steering);
}

// The largest entry, NaNs ignored (-inf when there is none).
static float row_max(const float * x, size_t n) {
    vfloat m_lanes = splat(-kInf, vfloat{});
    for_each_pack(x, x, 0, n, [&](vfloat a, vfloat, size_t) { m_lanes = vmax(a, m_lanes); });
    return hmax(m_lanes);
}

// log(sum(exp(x - m))) + m for a finite m >= every entry: NaN when x holds a NaN.
static float log_sum_exp_from(const float * x, size_t n, float m) {
    lane_sum sum;
    for_each_pack(x, x, 0, n, [&](vfloat a, vfloat, size_t) { sum.add(exp_nonpositive(a - m)); });
    return static_cast<float>(m + std::log(sum.total()));
}

float log_sum_exp(const float * x, size_t n) {
    const float m = row_max(x, n);
    if (m == kInf) return m;
    if (m == -kInf) {  // no finite entry: every one -inf, or NaNs among them (the maximum skips NaNs)
        for (size_t i = 0; i < n; ++i) {
            if (x[i] != x[i]) return std::numeric_limits<float>::quiet_NaN();
        }
        return m;
    }
    return log_sum_exp_from(x, n, m);
}

void log_softmax_inplace(float * x, size_t n) {
    const float m = row_max(x, n);
    if (!(m > -kInf) || !(m < kInf)) return;
    const float lse = log_sum_exp_from(x, n, m);
    for (size_t i = 0; i < n; ++i) x[i] -= lse;
}

}  // namespace sda
