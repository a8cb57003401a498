#include "nucleus.hpp"
#include "vecmath.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace sda {

namespace {

constexpr int kBuckets = 128;  // binary exponents of w in (0, 1]: 2^0 .. 2^-126, then denormals

// The bucket of a weight w in (0, 1]: minus its binary exponent, read from the float's bits.
inline int bucket_of(float w) {
    uint32_t bits;
    std::memcpy(&bits, &w, sizeof bits);
    const int biased = static_cast<int>((bits >> 23) & 0xff);  // 127 for [1, 2), 0 for denormals
    const int b = 127 - biased;                                // 0 for w = 1, 126 for the smallest normal
    return b < kBuckets - 1 ? b : kBuckets - 1;
}

}  // namespace

double nucleus_select(llama_token_data_array * cur_p, float top_p, nucleus_workspace & ws) {
    const size_t n = cur_p->size;
    if (n == 0) return 0.0;
    llama_token_data * data = cur_p->data;
    float max = -std::numeric_limits<float>::infinity();
    for (size_t i = 0; i < n; ++i) max = std::max(max, data[i].logit);
    if (!(max > -std::numeric_limits<float>::infinity())) {  // every candidate masked: keep the first
        data[0].p = 1.0f;
        cur_p->size = 1;
        cur_p->sorted = true;
        return 1.0;
    }
    if (ws.w.size() < n) ws.w.resize(n);
    float * w = ws.w.data();
    for (size_t i = 0; i < n; ++i) w[i] = exp_nonpositive(data[i].logit - max);
    double mass[kBuckets] = {};
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) {
        if (w[i] > 0.0f) mass[bucket_of(w[i])] += w[i];
    }
    for (double m : mass) total += m;
    const double target = top_p >= 1.0f ? total : static_cast<double>(top_p) * total;
    int crossing = kBuckets - 1;
    double above = 0.0;
    for (int b = 0; b < kBuckets; ++b) {
        above += mass[b];
        if (above >= target) {
            crossing = b;
            break;
        }
    }
    auto & kept = ws.kept;
    kept.clear();
    for (size_t i = 0; i < n; ++i) {
        if (w[i] > 0.0f && bucket_of(w[i]) <= crossing) kept.push_back(static_cast<uint32_t>(i));
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
