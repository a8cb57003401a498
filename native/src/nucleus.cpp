#include "nucleus.hpp"
#include "vecmath.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace sda {

namespace {

// Weight floors tried, as fractions of the top weight: the first whose candidates already hold p of the
// mass bounds the nucleus. 0 keeps every candidate of non-zero weight.
constexpr float kFloors[] = {1.0f / 256, 1e-7f, 0.0f};
constexpr size_t kBlock = 512;  // candidates per block: the kept ones are gathered only from blocks that reach the floor

// The sum of the weights >= floor_w in double, over the blocks whose top weight reaches it.
double mass_at_or_above(const float * w, const float * block_top, size_t n_blocks, size_t padded, float floor_w) {
    const vhalf zero = splat(0.0f, vhalf{});
    vdouble mass = splat(0.0, vdouble{});
    for (size_t b = 0; b < n_blocks; ++b) {
        if (!(block_top[b] >= floor_w)) continue;
        for (size_t i = b * kBlock, end = std::min(padded, i + kBlock); i < end; i += kHalf) {
            const vhalf e = load_half(w + i);
            mass += widen(select(e >= floor_w, e, zero));
        }
    }
    return hsum(mass);
}

}  // namespace

double nucleus_select(llama_token_data_array * cur_p, float top_p, float temperature, nucleus_workspace & ws) {
    const size_t n = cur_p->size;
    if (n == 0) return 0.0;
    llama_token_data * data = cur_p->data;
    const size_t padded = (n + kWidth - 1) / kWidth * kWidth;
    const size_t n_blocks = (n + kBlock - 1) / kBlock;
    if (ws.w.size() < padded) ws.w.resize(padded);
    if (ws.block_top.size() < n_blocks) ws.block_top.resize(n_blocks);
    float * w = ws.w.data();
    // 1. Contiguous first (the strided logits of llama_token_data do not vectorise well), -inf padded; the max.
    if (temperature == 1.0f) {
        for (size_t i = 0; i < n; ++i) w[i] = data[i].logit;
    } else {
        for (size_t i = 0; i < n; ++i) w[i] = data[i].logit / temperature;
    }
    std::fill(w + n, w + padded, -kInf);
    vfloat max_lanes = splat(-kInf, vfloat{});
    for (size_t i = 0; i < padded; i += kWidth) max_lanes = vmax(load(w + i), max_lanes);
    const float max = hmax(max_lanes);
    if (!(max > -kInf)) {  // every candidate masked: keep the first
        data[0].p = 1.0f;
        cur_p->size = 1;
        cur_p->sorted = true;
        return 1.0;
    }
    // 2. Weights w = exp(x - max) in (0, 1] (1 at the top) and their total, in double lanes; each block's top
    // weight, so that the mass at or above a floor is summed over the few blocks that reach it.
    vdouble total = splat(0.0, vdouble{});
    for (size_t b = 0; b < n_blocks; ++b) {
        const size_t start = b * kBlock, end = std::min(padded, start + kBlock);
        vfloat top = splat(0.0f, vfloat{});
        for (size_t i = start; i < end; i += kWidth) {
            const vfloat e = exp_nonpositive(load(w + i) - max);
            store(w + i, e);
            top = vmax(e, top);
        }
        for (size_t i = start; i < end; i += kHalf) total += widen(load_half(w + i));  // the block is in L1
        ws.block_top[b] = hmax(top);
    }
    const double total_mass = hsum(total);
    const double target = top_p >= 1.0f ? total_mass : static_cast<double>(top_p) * total_mass;
    float floor_w = 0.0f;
    if (top_p < 1.0f) {
        for (float f : kFloors) {
            if (f == 0.0f || mass_at_or_above(w, ws.block_top.data(), n_blocks, padded, f) >= target) {
                floor_w = f;
                break;
            }
        }
    }
    // Every token of the nucleus weighs at least the floor: one below it would come after all those above,
    // whose mass already reaches the target. Only blocks that reach the floor are scanned.
    auto & kept = ws.kept;
    kept.clear();
    for (size_t b = 0; b < n_blocks; ++b) {
        if (!(ws.block_top[b] >= floor_w && ws.block_top[b] > 0.0f)) continue;
        for (size_t i = b * kBlock, end = std::min(n, i + kBlock); i < end; ++i) {
            if (w[i] >= floor_w && w[i] > 0.0f) kept.push_back(static_cast<uint32_t>(i));
        }
    }
    std::sort(kept.begin(), kept.end(), [w, data](uint32_t a, uint32_t b) {
        return w[a] != w[b] ? w[a] > w[b] : data[a].id < data[b].id;
    });
    size_t m = 0;
    double cum = 0.0;
    while (m < kept.size()) {
        cum += w[kept[m]];
        ++m;
        if (top_p < 1.0f && cum >= target) break;
    }
    // The kept candidates to the front, in order (through a copy: they are scattered over the array).
    auto & front = ws.front;
    front.resize(m);
    for (size_t j = 0; j < m; ++j) {
        front[j] = data[kept[j]];
        front[j].logit /= temperature;
        front[j].p = static_cast<float>(w[kept[j]] / cum);
    }
    std::copy(front.begin(), front.begin() + m, data);
    cur_p->size = m;
    cur_p->sorted = true;
    return cum / total_mass;
}

void nucleus_draw(llama_token_data_array * cur_p, std::mt19937 & rng) {
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    const double r = uniform(rng);
    double cum = 0.0;
    size_t chosen = cur_p->size - 1;  // rounding: the last one takes what is left
    for (size_t j = 0; j < cur_p->size; ++j) {
        cum += cur_p->data[j].p;
        if (r < cum) {
            chosen = j;
            break;
        }
    }
    cur_p->selected = static_cast<int64_t>(chosen);
}

}  // namespace sda
