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

// The sum of the weights >= floor_w, in double lanes (a single running sum would not vectorise).
double mass_at_or_above(const float * w, size_t n, float floor_w) {
    constexpr size_t kLanes = 16;
    double lanes[kLanes] = {};
    size_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (size_t j = 0; j < kLanes; ++j) {
            const float v = w[i + j];
            lanes[j] += static_cast<double>(v >= floor_w ? v : 0.0f);
        }
    }
    double sum = 0.0;
    for (; i < n; ++i) sum += static_cast<double>(w[i] >= floor_w ? w[i] : 0.0f);
    for (double v : lanes) sum += v;
    return sum;
}

}  // namespace

double nucleus_select(llama_token_data_array * cur_p, float top_p, nucleus_workspace & ws) {
    const size_t n = cur_p->size;
    if (n == 0) return 0.0;
    llama_token_data * data = cur_p->data;
    if (ws.w.size() < n) ws.w.resize(n);
    float * w = ws.w.data();
    // Contiguous first: the strided logits of llama_token_data do not vectorise well.
    for (size_t i = 0; i < n; ++i) w[i] = data[i].logit;
    float max = -std::numeric_limits<float>::infinity();
    {
        constexpr size_t kLanes = 16;  // independent lanes: a single running max does not vectorise
        float lanes[kLanes];
        std::fill(lanes, lanes + kLanes, max);
        size_t i = 0;
        for (; i + kLanes <= n; i += kLanes)
            for (size_t j = 0; j < kLanes; ++j) lanes[j] = w[i + j] > lanes[j] ? w[i + j] : lanes[j];
        for (; i < n; ++i) max = w[i] > max ? w[i] : max;
        for (float v : lanes) max = v > max ? v : max;
    }
    if (!(max > -std::numeric_limits<float>::infinity())) {  // every candidate masked: keep the first
        data[0].p = 1.0f;
        cur_p->size = 1;
        cur_p->sorted = true;
        return 1.0;
    }
    for (size_t i = 0; i < n; ++i) w[i] = exp_nonpositive(w[i] - max);  // in (0, 1], 1 at the top
    const double total = mass_at_or_above(w, n, 0.0f);
    const double target = top_p >= 1.0f ? total : static_cast<double>(top_p) * total;
    float floor_w = 0.0f;
    if (top_p < 1.0f) {
        for (float f : kFloors) {
            if (f == 0.0f || mass_at_or_above(w, n, f) >= target) {
                floor_w = f;
                break;
            }
        }
    }
    // Every token of the nucleus weighs at least the floor: one below it would come after all those above,
    // whose mass already reaches the target.
    auto & kept = ws.kept;
    kept.clear();
    for (size_t i = 0; i < n; ++i) {
        if (w[i] >= floor_w && w[i] > 0.0f) kept.push_back(static_cast<uint32_t>(i));
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
    return cum / total;
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
