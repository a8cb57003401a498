// The SDA llama_sampler (a vtable implementation in the style of llama.cpp's src/llama-sampler.cpp)
// and the C entry points of sda.h.
#include "fusion.hpp"
#include "sda.h"

#include "llama.h"

#include <chrono>
#include <new>

namespace {

struct sda_sampler_state {
    sda_params params;
    llama_context * source_ctx;
    int32_t source_idx;
    std::vector<float> with_logits;     // cur_p's logits gathered contiguously
    std::vector<float> without_logits;  // the other stream's logits, in cur_p's token order
    std::vector<float> fused;
    sda::fusion_workspace workspace;
    sda_stats stats;
};

sda_sampler_state * state_of(const llama_sampler * smpl) {
    return static_cast<sda_sampler_state *>(smpl->ctx);
}

const char * sda_sampler_name(const llama_sampler * /*smpl*/) {
    return "sda";
}

void sda_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p) {
    sda_sampler_state & st = *state_of(smpl);
    const auto start = std::chrono::steady_clock::now();
    const float * without_row = st.source_ctx ? llama_get_logits_ith(st.source_ctx, st.source_idx) : nullptr;
    if (without_row == nullptr) {
        // No steering signal: the chain samples the with-instruction distribution, and the caller
        // sees the failure in the stats (n_steps does not advance).
        return;
    }
    const size_t n = cur_p->size;
    if (st.with_logits.size() < n) {
        st.with_logits.resize(n);
        st.without_logits.resize(n);
        st.fused.resize(n);
    }
    // Index the other stream by token id: samplers before this one may have reordered or truncated cur_p.
    for (size_t j = 0; j < n; ++j) {
        st.with_logits[j] = cur_p->data[j].logit;
        st.without_logits[j] = without_row[cur_p->data[j].id];
    }
    const sda::fusion_result r = sda::fuse_scaled(st.with_logits.data(), st.without_logits.data(), n, st.params,
                                                  st.workspace, st.fused.data());
    for (size_t j = 0; j < n; ++j) cur_p->data[j].logit = st.fused[j];

    const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;
    st.stats.n_steps += 1;
    st.stats.sum_js += r.js;
    st.stats.sum_temperature += r.temperature;
    st.stats.fusion_seconds += spent.count();
    st.stats.last_js = r.js;
    st.stats.last_temperature = r.temperature;
}

void sda_sampler_reset(llama_sampler * smpl) {
    state_of(smpl)->stats = sda_stats{};
}

llama_sampler * sda_sampler_clone(const llama_sampler * smpl) {
    const sda_sampler_state & st = *state_of(smpl);
    return sda_sampler_init(&st.params, static_cast<int32_t>(st.with_logits.size()), st.source_ctx, st.source_idx);
}

void sda_sampler_free(llama_sampler * smpl) {
    delete state_of(smpl);
}

// Built at first use from a value-initialised struct, so the experimental backend hooks stay NULL
// whatever their number in the llama.h we are compiled against.
llama_sampler_i * sda_sampler_iface() {
    static llama_sampler_i iface = [] {
        llama_sampler_i i{};
        i.name = sda_sampler_name;
        i.apply = sda_sampler_apply;
        i.reset = sda_sampler_reset;
        i.clone = sda_sampler_clone;
        i.free = sda_sampler_free;
        return i;
    }();
    return &iface;
}

}  // namespace

extern "C" {

int32_t sda_abi_version(void) {
    return SDA_ABI_VERSION;
}

int32_t sda_fuse(const float * logits_with, const float * logits_without, int32_t n, const sda_params * params,
                 float * out_log_probs, float * out_temperature, float * out_js) {
    if (!logits_with || !logits_without || !params || !out_log_probs || n <= 0 || !sda::params_valid(*params)) {
        return -1;
    }
    thread_local sda::fusion_workspace workspace;
    const size_t count = static_cast<size_t>(n);
    const sda::fusion_result r =
        sda::fuse_scaled(logits_with, logits_without, count, *params, workspace, out_log_probs);
    sda::log_softmax_inplace(out_log_probs, count, workspace);
    if (out_temperature) *out_temperature = r.temperature;
    if (out_js) *out_js = r.js;
    return 0;
}

llama_sampler * sda_sampler_init(const sda_params * params, int32_t n_vocab, llama_context * source_ctx,
                                 int32_t source_idx) {
    if (!params || !sda::params_valid(*params) || n_vocab < 0) return nullptr;
    auto * st = new (std::nothrow) sda_sampler_state{};
    if (!st) return nullptr;
    st->params = *params;
    st->source_ctx = source_ctx;
    st->source_idx = source_idx;
    const size_t n = static_cast<size_t>(n_vocab);
    st->with_logits.resize(n);
    st->without_logits.resize(n);
    st->fused.resize(n);
    st->workspace.reserve(n);
    return llama_sampler_init(sda_sampler_iface(), st);
}

void sda_sampler_set_source(llama_sampler * smpl, llama_context * ctx, int32_t idx) {
    state_of(smpl)->source_ctx = ctx;
    state_of(smpl)->source_idx = idx;
}

void sda_sampler_get_stats(const llama_sampler * smpl, sda_stats * out) {
    if (smpl && out) *out = state_of(smpl)->stats;
}

}  // extern "C"
