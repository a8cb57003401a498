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

}  // namespace

double nucleus_select(llama_token_data_array * cur_p, float top_p, nucleus_workspace & ws) {
    const size_t n = cur_p->size;
    if (n == 0) return 0.0;
    llama_token_data * data = cur_p->data;
    const size_t padded = (n + kWidth - 1) / kWidth * kWidth;
    const size_t n_blocks = (n + kBlock - 1) / kBlock;
    if (ws.w.size() < padded) ws.w.resize(padded);
    if (ws.block_top.size() < n_blocks) ws.block_top.resize(n_blocks);
    float * w = ws.w.data();
    // 1. Contiguous first (the strided logits of llama_token_data do not vectorise well), -inf padded; the max.
    for (size_t i = 0; i < n; ++i) w[i] = data[i].logit;
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
    // 2. Weights w = exp(x - max) in (0, 1] (1 at the top), their total and the mass at or above the first two
    // floors, in double lanes; each block's top weight.
    const float floor_a = kFloors[0], floor_b = kFloors[1];
    vdouble total = splat(0.0, vdouble{}), mass_a = total, mass_b = total;
    const vhalf zero = splat(0.0f, vhalf{});
    for (size_t b = 0; b < n_blocks; ++b) {
        const size_t start = b * kBlock, end = std::min(padded, start + kBlock);
        vfloat top = splat(0.0f, vfloat{});
        for (size_t i = start; i < end; i += kWidth) {
            const vfloat e = exp_nonpositive(load(w + i) - max);
            store(w + i, e);
            top = vmax(e, top);
        }
        for (size_t i = start; i < end; i += kHalf) {  // the block is in L1
            const vhalf e = load_half(w + i);
            total += widen(e);
            mass_a += widen(select(e >= floor_a, e, zero));
            mass_b += widen(select(e >= floor_b, e, zero));
        }
        ws.block_top[b] = hmax(top);
    }
    const double total_mass = hsum(total);
    const double target = top_p >= 1.0f ? total_mass : static_cast<double>(top_p) * total_mass;
    float floor_w = 0.0f;
    if (top_p < 1.0f) {
        if (hsum(mass_a) >= target) {
            floor_w = floor_a;
        } else if (hsum(mass_b) >= target) {
            floor_w = floor_b;
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
