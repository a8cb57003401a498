/*
 * sda.h - C ABI of the SDA (Steering-Driven Distribution Alignment) native hook.
 *
 * Two pieces:
 *   - sda_fuse():           the fusion of SPEC.md sections 3-4 on two raw logit rows (no llama.cpp needed);
 *   - sda_sampler_init():   a llama_sampler that applies the same fusion inside a llama.cpp sampler chain.
 *                           Put it first in the chain (it needs the full, unprocessed vocabulary), then
 *                           top-p and dist. It reads the *with-instruction* logits from cur_p and the
 *                           *without-instruction* logits itself, from (source context, output index).
 */
#ifndef SDA_H
#define SDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define SDA_API __declspec(dllexport)
#else
#    define SDA_API __attribute__((visibility("default")))
#endif

#define SDA_ABI_VERSION 1

struct llama_sampler;
struct llama_context;

enum sda_temperature_mode {
    SDA_TEMPERATURE_PAPER     = 0, /* T = max(T_min, T0 * 0.5^(JS / 0.01)), T_min = min(0.2, T0) */
    SDA_TEMPERATURE_REFERENCE = 1, /* T = T0 * 0.5^(JS / (2 ln 2)), no floor                     */
    SDA_TEMPERATURE_FIXED     = 2, /* T = T0                                                     */
};

struct sda_params {
    float   strength;          /* amplifier a >= 0 (finite)                     */
    float   k;                 /* steering multiplier, paper: 2                  */
    float   t0;                /* base temperature T0 > 0, paper: 0.6            */
    int32_t temperature_mode;  /* enum sda_temperature_mode                     */
};

struct sda_stats {
    int64_t n_steps;           /* fused distributions computed                   */
    double  sum_js;            /* sum of JS divergences (nats)                   */
    double  sum_temperature;   /* sum of temperatures used                       */
    double  fusion_seconds;    /* wall time spent in the fusion                  */
    float   last_js;
    float   last_temperature;
};

SDA_API int32_t sda_abi_version(void);

/* 0 on success, negative on invalid arguments. out_log_probs receives the normalised fused
 * log-probabilities after temperature: log_softmax(l / T). Buffers must hold n floats. */
SDA_API int32_t sda_fuse(const float * logits_with, const float * logits_without, int32_t n,
                         const struct sda_params * params,
                         float * out_log_probs, float * out_temperature, float * out_js);

/* NULL on invalid parameters. The chain that receives the sampler owns and frees it. */
SDA_API struct llama_sampler * sda_sampler_init(const struct sda_params * params, int32_t n_vocab,
                                                struct llama_context * source_ctx, int32_t source_idx);

/* Where the without-instruction logits of the next step are: llama_get_logits_ith(ctx, idx). */
SDA_API void sda_sampler_set_source(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);

SDA_API void sda_sampler_get_stats(const struct llama_sampler * smpl, struct sda_stats * out);

#ifdef __cplusplus
}
#endif

#endif /* SDA_H */
