// The SDA llama_sampler and the guard sampler (vtable implementations in the style of llama.cpp's
// src/llama-sampler.cpp) and the C entry points of sda.h.
#include "fusion.hpp"
#include "nucleus.hpp"
#include "sda.h"

#include "llama.h"

#include <chrono>
#include <cstring>
#include <cmath>
#include <limits>
#include <algorithm>
#include <new>
#include <vector>
#include <random>

namespace {

// What both samplers keep about non-finite logits. A sampler cannot report an error through the chain,
// so it records the first fault here and leaves the chain a single candidate with id LLAMA_TOKEN_NULL:
// the caller sees -1 from llama_sampler_sample and asks sda_sampler_get_fault for the details.
struct fault_guard {
    int32_t step = 0;        // apply calls since init or reset (1-based once applied)
    int32_t fault = SDA_OK;  // first fault seen
    int32_t fault_step = 0;
    // Test-only injection (sda_sampler_inject_fault): step 0 = never, so unused it is one comparison.
    int32_t inject_step = 0;
    int32_t inject_row = SDA_ROW_WITH;
    float inject_value = 0.0f;

    // A new generation: the step count and the fault start again; a test-only injection stays armed.
    void reset() {
        step = 0;
        fault = SDA_OK;
        fault_step = 0;
    }
};

// A vtable from a value-initialised struct, so the experimental backend hooks stay NULL whatever their number
// in the llama.h we are compiled against.
llama_sampler_i make_iface(const char * (*name)(const llama_sampler *),
                           void (*apply)(llama_sampler *, llama_token_data_array *), void (*reset)(llama_sampler *),
                           llama_sampler * (*clone)(const llama_sampler *), void (*free)(llama_sampler *)) {
    llama_sampler_i i{};
    i.name = name;
    i.apply = apply;
    i.reset = reset;
    i.clone = clone;
    i.free = free;
    return i;
}

void refuse(llama_token_data_array * cur_p, fault_guard & g, int32_t fault) {
    if (g.fault == SDA_OK) {
        g.fault = fault;
        g.fault_step = g.step;
    }
    // Whatever follows in the chain (logit bias, temp, top-p, dist) handles one finite candidate.
    cur_p->data[0] = llama_token_data{LLAMA_TOKEN_NULL, 0.0f, 1.0f};
    cur_p->size = 1;
    cur_p->sorted = true;
    cur_p->selected = -1;
}

// The with-row check of the guard sampler (and of the SDA sampler when it has no without-row): one
// vectorised pass over cur_p's logits, about 6 us for 49,152 candidates.
void guard_row(llama_token_data_array * cur_p, fault_guard & g) {
    if (cur_p->size == 0) return;
    if (g.inject_step == g.step && g.inject_row == SDA_ROW_WITH) cur_p->data[0].logit = g.inject_value;
    const llama_token_data * data = cur_p->data;
    const auto logit = [data](size_t i) { return data[i].logit; };
    if (sda::has_nan_or_pos_inf(cur_p->size, logit)) refuse(cur_p, g, sda::classify_row(cur_p->size, logit));
}

struct sda_sampler_state {
    sda_params params;
    size_t n_vocab;
    llama_context * with_ctx;     // where the chain's own row is, when the caller said (sda_sampler_set_rows)
    int32_t with_idx;
    llama_context * source_ctx;   // the without-instruction row
    int32_t source_idx;
    std::vector<float> with_logits;     // cur_p's logits gathered, when the row cannot be read in place
    std::vector<float> without_logits;  // the other stream's logits in cur_p's order, when that is not id order
    sda::fusion_workspace workspace;
    sda_stats stats;
    fault_guard guard;
    // Steering beside the paper's (sda_sampler_set_steering) and the echo guard's state: the instruction's
    // token sequences (-1 between them) and, per position j, the length of the longest suffix of the answer
    // that matches the instruction just before j (llama.cpp's DRY sampler keeps repeats the same way).
    sda_steering steering{};
    std::vector<int32_t> echo_tokens;
    std::vector<int32_t> echo_run_at;  // per position, the run length at which it is guarded (0: never)
    std::vector<int32_t> echo_match;
    std::vector<int32_t> guarded;
    std::vector<int32_t> capped;     // the instruction's ids never amplified beyond prompting
    std::vector<int32_t> forbidden;  // and those held to min(l_with, l_without)
};

sda_sampler_state * state_of(const llama_sampler * smpl) {
    return static_cast<sda_sampler_state *>(smpl->ctx);
}

const char * sda_sampler_name(const llama_sampler * /*smpl*/) {
    return "sda";
}

// Writes the fused logits into the candidates' logits (llama_token_data is {id, logit, p}). With `row` set,
// the fusion read the with-row from llama_get_logits_ith instead of cur_p: the same loop that writes a block
// checks that it held that row in id order (the cache lines are being touched anyway), and a mismatch puts
// the block back and stops the fusion.
class candidates_sink final : public sda::fused_sink {
public:
    candidates_sink(llama_token_data * data, const float * row) : data_(data), row_(row) {}

    bool write(size_t start, const float * values, size_t count) override {
        llama_token_data * d = data_ + start;
        if (row_ == nullptr) {
            for (size_t j = 0; j < count; ++j) d[j].logit = values[j];
            return true;
        }
        // Bit patterns, compared as integers: the loop vectorises, and a NaN where the row has none differs.
        const bits32 * row_bits = reinterpret_cast<const bits32 *>(row_ + start);
        float saved[sda::kFusionBlock];
        int32_t differs = 0;
        for (size_t j = 0; j < count; ++j) {
            const bits32 * logit_bits = reinterpret_cast<const bits32 *>(&d[j].logit);
            differs |= (d[j].id ^ static_cast<int32_t>(start + j)) | (*logit_bits ^ row_bits[j]);
            saved[j] = d[j].logit;
            d[j].logit = values[j];
        }
        if (differs != 0) {
            for (size_t j = 0; j < count; ++j) d[j].logit = saved[j];
            return false;
        }
        written_ = start + count;
        return true;
    }

    // Puts back the logits of the blocks written before a mismatch (they were the row's).
    void undo() {
        for (size_t j = 0; j < written_; ++j) data_[j].logit = row_[j];
    }

private:
#if defined(__GNUC__) || defined(__clang__)
    typedef int32_t __attribute__((may_alias)) bits32;
#else
    typedef int32_t bits32;
#endif
    llama_token_data * data_;
    const float * row_;
    size_t written_ = 0;
};

// The fusion from the rows as llama_get_logits_ith has them, when cur_p is exactly the with-row in id order
// (this sampler first in a chain sampled with llama_sampler_sample on that row): no gather, no copy.
// false when cur_p turned out to be something else (cur_p is then as it came) or a row is faulty (let the
// careful path name the fault).
bool fuse_in_place(sda_sampler_state & st, const sda_params & params, llama_token_data_array * cur_p,
                   const float * without_row, sda::fusion_result & r) {
    if (st.with_ctx == nullptr || cur_p->size != st.n_vocab || cur_p->size == 0 || cur_p->sorted ||
        st.guard.inject_step == st.guard.step) {
        return false;
    }
    const float * with_row = llama_get_logits_ith(st.with_ctx, st.with_idx);
    if (with_row == nullptr) return false;
    candidates_sink sink(cur_p->data, with_row);
    r = sda::fuse_scaled(with_row, without_row, cur_p->size, params, st.workspace, sink, &st.steering);
    if (r.status == SDA_OK) return true;
    sink.undo();
    return false;
}

// The fusion from cur_p's own logits, gathered: samplers before this one may have reordered, truncated or
// changed it. The other row is read in place while cur_p is in id order, else gathered by id. Also the path
// of a test-only injection, which needs copies to write into.
sda::fusion_result fuse_from_candidates(sda_sampler_state & st, const sda_params & params,
                                        llama_token_data_array * cur_p, const float * without_row, bool & in_id_order) {
    const size_t n = cur_p->size;
    if (st.with_logits.size() < n) {
        st.with_logits.resize(n);
        st.without_logits.resize(n);
    }
    in_id_order = true;
    for (size_t j = 0; j < n; ++j) {
        st.with_logits[j] = cur_p->data[j].logit;
        in_id_order &= cur_p->data[j].id == static_cast<llama_token>(j);
    }
    const float * z_without = without_row;
    const bool inject = st.guard.inject_step == st.guard.step && n > 0;
    if (!in_id_order || (inject && st.guard.inject_row == SDA_ROW_WITHOUT)) {
        for (size_t j = 0; j < n; ++j) st.without_logits[j] = without_row[cur_p->data[j].id];
        z_without = st.without_logits.data();
    }
    if (inject) {
        (st.guard.inject_row == SDA_ROW_WITH ? st.with_logits : st.without_logits)[0] = st.guard.inject_value;
    }
    candidates_sink sink(cur_p->data, nullptr);
    return sda::fuse_scaled(st.with_logits.data(), z_without, n, params, st.workspace, sink, &st.steering);
}

// The instruction's guards after the fusion (sda::apply_guards): the capped and forbidden ids, and each token
// that would make the answer's last tokens a run of the instruction as long as its position's run_at.
// `with_by_place`: the with-row as the fusion read it, by place in cur_p; `without_row`: by id. `in_id_order`:
// cur_p holds the whole vocabulary by id (the usual case), else a token's place is searched.
void apply_instruction_guards(sda_sampler_state & st, llama_token_data_array * cur_p, const float * with_by_place,
                              const float * without_row, const sda::fusion_result & r, bool in_id_order) {
    st.guarded.clear();
    if (st.steering.echo_run > 0) {
        for (size_t j = 0; j < st.echo_tokens.size(); ++j) {
            const int32_t at = st.echo_run_at[j];
            if (st.echo_tokens[j] >= 0 && at > 0 && st.echo_match[j] + 1 >= at) st.guarded.push_back(st.echo_tokens[j]);
        }
    }
    if (st.guarded.empty() && st.capped.empty() && st.forbidden.empty()) return;
    const sda_guards g{st.guarded.data(), static_cast<int32_t>(st.guarded.size()),
                       st.capped.data(), static_cast<int32_t>(st.capped.size()),
                       st.forbidden.data(), static_cast<int32_t>(st.forbidden.size())};
    const size_t n_vocab = st.n_vocab;
    const auto place = [cur_p, in_id_order, n_vocab](int32_t id) -> size_t {
        if (id < 0 || static_cast<size_t>(id) >= n_vocab) return static_cast<size_t>(-1);
        if (in_id_order) return static_cast<size_t>(id);
        for (size_t j = 0; j < cur_p->size; ++j) {
            if (cur_p->data[j].id == id) return j;
        }
        return static_cast<size_t>(-1);
    };
    sda::apply_guards(r, st.steering.guard_to, g, with_by_place, without_row, place,
                      [cur_p](size_t pos) -> float & { return cur_p->data[pos].logit; });
}

void sda_sampler_accept(llama_sampler * smpl, llama_token token) {
    sda_sampler_state & st = *state_of(smpl);
    if (st.echo_tokens.empty()) return;
    if (token < 0) {  // LLAMA_TOKEN_NULL after a refused step: no run, and never a separator's match
        std::fill(st.echo_match.begin(), st.echo_match.end(), 0);
        return;
    }
    // match[j] <- match[j - 1] + 1 where the instruction has `token` at j - 1, else 0 (right to left, in place).
    for (size_t j = st.echo_tokens.size() - 1; j > 0; --j) {
        st.echo_match[j] = st.echo_tokens[j - 1] == token ? st.echo_match[j - 1] + 1 : 0;
    }
    st.echo_match[0] = 0;
}

void sda_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p) {
    sda_sampler_state & st = *state_of(smpl);
    const auto start = std::chrono::steady_clock::now();
    st.guard.step += 1;
    const float * without_row = st.source_ctx ? llama_get_logits_ith(st.source_ctx, st.source_idx) : nullptr;
    if (without_row == nullptr) {
        // No steering signal: the chain samples the with-instruction distribution (still never a
        // non-finite one), and the caller sees the failure in the stats (n_steps does not advance).
        guard_row(cur_p, st.guard);
        return;
    }
    // Before the steering's onset the answer is prompting's: a = 0 (no steering, no guards).
    sda_params params = st.params;
    if (st.guard.step <= st.steering.onset) params.strength = 0.0f;
    sda::fusion_result r{};
    bool in_id_order = true;
    const bool in_place = fuse_in_place(st, params, cur_p, without_row, r);
    if (!in_place) r = fuse_from_candidates(st, params, cur_p, without_row, in_id_order);
    if (r.status != SDA_OK) {
        refuse(cur_p, st.guard, r.status);
        return;
    }
    if (static_cast<double>(params.k) * params.strength > 0.0) {
        // In place, cur_p is the with-row in id order and the row itself is still llama.cpp's, untouched.
        const float * with_by_place = in_place ? llama_get_logits_ith(st.with_ctx, st.with_idx) : st.with_logits.data();
        apply_instruction_guards(st, cur_p, with_by_place, without_row, r, in_id_order && cur_p->size == st.n_vocab);
    }

    const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;
    st.stats.n_steps += 1;
    st.stats.n_in_place += in_place;
    st.stats.sum_js += r.js;
    st.stats.sum_temperature += r.temperature;
    st.stats.fusion_seconds += spent.count();
    st.stats.last_js = r.js;
    st.stats.last_temperature = r.temperature;
}

void sda_sampler_reset(llama_sampler * smpl) {
    sda_sampler_state & st = *state_of(smpl);
    st.stats = sda_stats{};
    st.guard.reset();
    std::fill(st.echo_match.begin(), st.echo_match.end(), 0);
}

llama_sampler * sda_sampler_clone(const llama_sampler * smpl) {
    const sda_sampler_state & st = *state_of(smpl);
    llama_sampler * copy = sda_sampler_init(&st.params, static_cast<int32_t>(st.n_vocab), st.source_ctx, st.source_idx);
    if (copy != nullptr) {
        sda_sampler_state & c = *state_of(copy);
        c.with_ctx = st.with_ctx;
        c.with_idx = st.with_idx;
        c.steering = st.steering;
        c.echo_tokens = st.echo_tokens;
        c.echo_run_at = st.echo_run_at;
        c.echo_match = st.echo_match;
        c.guard.step = st.guard.step;  // the onset counts the generation's steps: a clone goes on from here
        c.capped = st.capped;
        c.forbidden = st.forbidden;
    }
    return copy;
}

void sda_sampler_free(llama_sampler * smpl) {
    delete state_of(smpl);
}

llama_sampler_i * sda_sampler_iface() {
    static llama_sampler_i iface = [] {
        llama_sampler_i i =
            make_iface(sda_sampler_name, sda_sampler_apply, sda_sampler_reset, sda_sampler_clone, sda_sampler_free);
        i.accept = sda_sampler_accept;
        return i;
    }();
    return &iface;
}

// The guard sampler: its whole state is a fault_guard.
fault_guard * guard_of(const llama_sampler * smpl) {
    return static_cast<fault_guard *>(smpl->ctx);
}

const char * guard_sampler_name(const llama_sampler * /*smpl*/) {
    return "sda-guard";
}

void guard_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p) {
    fault_guard & g = *guard_of(smpl);
    g.step += 1;
    guard_row(cur_p, g);
}

void guard_sampler_reset(llama_sampler * smpl) {
    guard_of(smpl)->reset();
}

llama_sampler * guard_sampler_clone(const llama_sampler * smpl);

void guard_sampler_free(llama_sampler * smpl) {
    delete guard_of(smpl);
}

llama_sampler_i * guard_sampler_iface() {
    static llama_sampler_i iface = make_iface(guard_sampler_name, guard_sampler_apply, guard_sampler_reset,
                                              guard_sampler_clone, guard_sampler_free);
    return &iface;
}

llama_sampler * guard_sampler_clone(const llama_sampler * smpl) {
    auto * g = new (std::nothrow) fault_guard(*guard_of(smpl));
    return g ? llama_sampler_init(guard_sampler_iface(), g) : nullptr;
}

// The nucleus sampler: temperature, top-p and the seeded draw (nucleus.hpp).
struct nucleus_state {
    float top_p;
    float temperature;
    uint32_t seed;
    std::mt19937 rng;
    sda::nucleus_workspace workspace;
};

nucleus_state * nucleus_of(const llama_sampler * smpl) {
    return static_cast<nucleus_state *>(smpl->ctx);
}

const char * nucleus_sampler_name(const llama_sampler * /*smpl*/) {
    return "sda-nucleus";
}

void nucleus_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p) {
    nucleus_state & st = *nucleus_of(smpl);
    if (cur_p->size == 0) return;
    sda::nucleus_select(cur_p, st.top_p, st.temperature, st.workspace);
    sda::nucleus_draw(cur_p, st.rng);
}

void nucleus_sampler_reset(llama_sampler * smpl) {
    nucleus_state & st = *nucleus_of(smpl);
    st.rng.seed(st.seed);
}

llama_sampler * nucleus_sampler_clone(const llama_sampler * smpl);

void nucleus_sampler_free(llama_sampler * smpl) {
    delete nucleus_of(smpl);
}

llama_sampler_i * nucleus_sampler_iface() {
    static llama_sampler_i iface = make_iface(nucleus_sampler_name, nucleus_sampler_apply, nucleus_sampler_reset,
                                              nucleus_sampler_clone, nucleus_sampler_free);
    return &iface;
}

llama_sampler * nucleus_sampler_clone(const llama_sampler * smpl) {
    const nucleus_state & st = *nucleus_of(smpl);
    auto * copy = new (std::nothrow) nucleus_state{st.top_p, st.temperature, st.seed, st.rng, {}};
    return copy ? llama_sampler_init(nucleus_sampler_iface(), copy) : nullptr;
}

// The fault_guard of either kind of sampler this library makes; nullptr for any other sampler.
fault_guard * any_guard(const llama_sampler * smpl) {
    if (smpl == nullptr) return nullptr;
    if (smpl->iface == sda_sampler_iface()) return &state_of(smpl)->guard;
    if (smpl->iface == guard_sampler_iface()) return guard_of(smpl);
    return nullptr;
}

}  // namespace

extern "C" {

llama_sampler * sda_sampler_init(const sda_params * params, int32_t n_vocab, llama_context * source_ctx,
                                 int32_t source_idx) {
    if (!params || !sda::params_valid(*params) || n_vocab < 0) return nullptr;
    auto * st = new (std::nothrow) sda_sampler_state{};
    if (!st) return nullptr;
    st->params = *params;
    st->n_vocab = static_cast<size_t>(n_vocab);
    st->with_ctx = nullptr;
    st->with_idx = -1;
    st->source_ctx = source_ctx;
    st->source_idx = source_idx;
    st->workspace.reserve(st->n_vocab);
    return llama_sampler_init(sda_sampler_iface(), st);
}

void sda_sampler_set_source(llama_sampler * smpl, llama_context * ctx, int32_t idx) {
    state_of(smpl)->source_ctx = ctx;
    state_of(smpl)->source_idx = idx;
}

void sda_sampler_set_rows(llama_sampler * smpl, llama_context * with_ctx, int32_t with_idx,
                          llama_context * without_ctx, int32_t without_idx) {
    sda_sampler_state & st = *state_of(smpl);
    st.with_ctx = with_ctx;
    st.with_idx = with_idx;
    st.source_ctx = without_ctx;
    st.source_idx = without_idx;
}

int32_t sda_sampler_set_steering(llama_sampler * smpl, const sda_steering * steering,
                                 const sda_instruction * instruction) {
    if (smpl == nullptr || smpl->iface != sda_sampler_iface()) return SDA_ERR_INVALID;
    const sda_steering s = steering ? *steering : sda_steering{};
    const sda_instruction in = instruction ? *instruction : sda_instruction{};
    if (!sda::steering_valid(s) || in.n_tokens < 0 || (in.n_tokens > 0 && !in.tokens) || in.n_capped < 0 ||
        (in.n_capped > 0 && !in.capped) || in.n_forbidden < 0 || (in.n_forbidden > 0 && !in.forbidden)) {
        return SDA_ERR_INVALID;
    }
    for (int32_t i = 0; in.run_at && i < in.n_tokens; ++i) {
        if (in.run_at[i] < 0) return SDA_ERR_INVALID;
    }
    sda_sampler_state & st = *state_of(smpl);
    st.steering = s;
    st.echo_tokens.assign(in.tokens, in.tokens + in.n_tokens);
    if (in.run_at) {
        st.echo_run_at.assign(in.run_at, in.run_at + in.n_tokens);
    } else {
        st.echo_run_at.assign(st.echo_tokens.size(), s.echo_run);
    }
    st.echo_match.assign(st.echo_tokens.size(), 0);
    st.guarded.reserve(st.echo_tokens.size());
    st.capped.assign(in.capped, in.capped + in.n_capped);
    st.forbidden.assign(in.forbidden, in.forbidden + in.n_forbidden);
    return SDA_OK;
}

void sda_sampler_get_stats(const llama_sampler * smpl, sda_stats * out) {
    if (smpl && out) *out = state_of(smpl)->stats;
}

llama_sampler * sda_guard_sampler_init(void) {
    auto * g = new (std::nothrow) fault_guard{};
    return g ? llama_sampler_init(guard_sampler_iface(), g) : nullptr;
}

llama_sampler * sda_nucleus_sampler_init(float top_p, float temperature, uint32_t seed) {
    if (!(top_p > 0.0f) || !std::isfinite(top_p) || !(temperature > 0.0f) || !std::isfinite(temperature)) {
        return nullptr;
    }
    auto * st = new (std::nothrow) nucleus_state{top_p, temperature, seed, std::mt19937(seed), {}};
    return st ? llama_sampler_init(nucleus_sampler_iface(), st) : nullptr;
}

int32_t sda_sampler_get_fault(const llama_sampler * smpl, int32_t * out_step) {
    const fault_guard * g = any_guard(smpl);
    if (g == nullptr) return SDA_ERR_INVALID;
    if (out_step) *out_step = g->fault == SDA_OK ? 0 : g->fault_step;
    return g->fault;
}

int32_t sda_sampler_inject_fault(llama_sampler * smpl, int32_t value, int32_t step, int32_t row) {
    fault_guard * g = any_guard(smpl);
    const bool guard_only = smpl != nullptr && smpl->iface == guard_sampler_iface();
    if (g == nullptr || step < 1 || (row != SDA_ROW_WITH && row != SDA_ROW_WITHOUT) ||
        (guard_only && row != SDA_ROW_WITH)) {
        return SDA_ERR_INVALID;
    }
    constexpr float inf = std::numeric_limits<float>::infinity();
    switch (value) {
        case SDA_INJECT_NAN: g->inject_value = std::numeric_limits<float>::quiet_NaN(); break;
        case SDA_INJECT_POS_INF: g->inject_value = inf; break;
        case SDA_INJECT_NEG_INF: g->inject_value = -inf; break;
        default: return SDA_ERR_INVALID;
    }
    g->inject_step = step;
    g->inject_row = row;
    return SDA_OK;
}

}  // extern "C"
