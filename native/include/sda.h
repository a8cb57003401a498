/*
 * sda.h - C ABI of the SDA (Steering-Driven Distribution Alignment) native hook.
 *
 * Two pieces:
 *   - sda_fuse():           the fusion of SPEC.md sections 3-4 on two raw logit rows (no llama.cpp needed);
 *   - sda_sampler_init():   a llama_sampler that applies the same fusion inside a llama.cpp sampler chain.
 *                           Put it first in the chain (it needs the full, unprocessed vocabulary), then
 *                           top-p and dist. It reads the *with-instruction* logits from cur_p and the
 *                           *without-instruction* logits itself, from (source context, output index);
 *                           told where the with-row is too (sda_sampler_set_rows), it reads that row in
 *                           place as well and writes cur_p once.
 *   - sda_guard_sampler_init(): the same non-finite check for plain (one-stream) generation.
 *   - sda_nucleus_sampler_init(): temperature, top-p and a seeded draw in one sampler, last in the chain,
 *                           without sorting the vocabulary (llama.cpp's top-p softmaxes and sorts every
 *                           candidate).
 *
 * Non-finite logits: a NaN or +inf entry in either row (fp16 overflow on GPU builds can produce them) is
 * never fused nor sampled. -inf is legal (a masked token). sda_fuse returns one of the SDA_ERR_NAN_* /
 * SDA_ERR_INF_* codes; a sampler records the fault (sda_sampler_get_fault) and hands the rest of the chain
 * a single candidate whose id is LLAMA_TOKEN_NULL (-1), so that llama_sampler_sample returns -1: a caller
 * tells a fault from a token with one integer comparison.
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

#define SDA_ABI_VERSION 8

struct llama_sampler;
struct llama_context;

enum sda_temperature_mode {
    SDA_TEMPERATURE_PAPER     = 0, /* T = max(T_min, T0 * 0.5^(JS / 0.01)), T_min = min(0.2, T0) */
    SDA_TEMPERATURE_REFERENCE = 1, /* T = T0 * 0.5^(JS / (2 ln 2)), no floor                     */
    SDA_TEMPERATURE_FIXED     = 2, /* T = T0                                                     */
};

/* Return codes of sda_fuse and sda_sampler_get_fault. */
enum sda_status {
    SDA_OK              =  0,
    SDA_ERR_INVALID     = -1, /* invalid arguments                                */
    SDA_ERR_NAN_WITH    = -2, /* a NaN in the with-instruction row                */
    SDA_ERR_INF_WITH    = -3, /* a +inf (and no NaN) in the with-instruction row  */
    SDA_ERR_NAN_WITHOUT = -4, /* the same two in the without-instruction row      */
    SDA_ERR_INF_WITHOUT = -5,
};

/* TEST ONLY (sda_sampler_inject_fault): what to write into one logit. */
enum sda_fault_value {
    SDA_INJECT_NAN     = 1,
    SDA_INJECT_POS_INF = 2,
    SDA_INJECT_NEG_INF = 3,
};

enum sda_row {
    SDA_ROW_WITH    = 0,
    SDA_ROW_WITHOUT = 1,
};

struct sda_params {
    float   strength;          /* amplifier a >= 0 (finite)                     */
    float   k;                 /* steering multiplier, paper: 2                  */
    float   t0;                /* base temperature T0 > 0, paper: 0.6            */
    int32_t temperature_mode;  /* enum sda_temperature_mode                     */
};

/* Steering beside the paper's formula (sda_sampler_set_steering, sda_fuse_steered). All zero: the paper's formula,
 * bit for bit. With g = k a and a > 0:
 *   clip > 0:         l = l_with + g clamp(l_with - l_without, -clip, clip)   (a bounded contrast)
 *   plausibility > 0: tokens with p_with < plausibility * max p_with are dropped (-inf) before the contrast
 *   echo_run > 0:     the echo guard: a token that would make the answer's last echo_run tokens a run of the
 *                     instruction's tokens gets l = l_without (guard_to SDA_GUARD_TO_WITHOUT: as likely as
 *                     without the instruction) or l = min(l, l_with) (SDA_GUARD_TO_PROMPT: no amplification).
 *                     sda_instruction.run_at can set that length per instruction position (0: never guarded).
 *   onset > 0:        (the sampler) the first onset tokens it samples are not steered: a = 0, prompting.
 * Ids an instruction caps get l = min(l, l_with), ids it forbids l = min(l_with, l_without) (sda_guards), in that
 * order with the echo guard between them; a token impossible in the fused distribution stays impossible.
 * The bounded path shifts its output by max l_with + g clip (clip > 0) or by the paper's top steered logit. */
enum sda_guard_to {
    SDA_GUARD_TO_WITHOUT = 0,
    SDA_GUARD_TO_PROMPT  = 1,
};

struct sda_steering {
    float   clip;
    float   plausibility;
    int32_t echo_run;
    int32_t guard_to;  /* enum sda_guard_to */
    int32_t onset;     /* tokens sampled before the steering starts */
};

/* The instruction as the guarded steering reads it (sda_local/engine/instruction.py). */
struct sda_instruction {
    const int32_t * tokens;     /* token sequences, each followed by -1: the instruction as the answer may copy it */
    const int32_t * run_at;     /* NULL, or per entry of tokens the run length at which it is guarded (0: never);
                                   NULL: echo_run for every token                                              */
    int32_t         n_tokens;
    const int32_t * capped;     /* ids never amplified beyond prompting: l = min(l, l_with)                    */
    int32_t         n_capped;
    const int32_t * forbidden;  /* ids held to l = min(l_with, l_without)                                      */
    int32_t         n_forbidden;
};

/* The ids the guards apply to at one step, for sda_fuse_steered (the sampler finds `guarded` itself). */
struct sda_guards {
    const int32_t * guarded;    /* the echo guard's */
    int32_t         n_guarded;
    const int32_t * capped;
    int32_t         n_capped;
    const int32_t * forbidden;
    int32_t         n_forbidden;
};

struct sda_stats {
    int64_t n_steps;           /* fused distributions computed                   */
    double  sum_js;            /* sum of JS divergences (nats)                   */
    double  sum_temperature;   /* sum of temperatures used                       */
    double  fusion_seconds;    /* wall time spent in the fusion                  */
    float   last_js;
    float   last_temperature;
    int64_t n_in_place;        /* of n_steps, those that read both rows in place (sda_sampler_set_rows) */
};

SDA_API int32_t sda_abi_version(void);

/* Floats per SIMD pack of the fusion and the nucleus sampler, fixed at build time: 16 (AVX-512), 8 (AVX/AVX2),
 * 4 (NEON, SSE2) or 1 (the scalar fallback). */
SDA_API int32_t sda_simd_width(void);

/* log(sum(exp(logits))) over n floats, in float, SIMD (one pass for the maximum, one for the sum): +inf when the
 * row holds a +inf, else NaN when it holds a NaN, -inf when every entry is -inf. log_softmax(logits)[t] is
 * logits[t] minus this (the pipeline's observed first answer: each token's log-probability under both rows). */
SDA_API float sda_log_sum_exp(const float * logits, int32_t n);

/* SDA_OK on success, SDA_ERR_INVALID on invalid arguments, SDA_ERR_NAN_* / SDA_ERR_INF_* when a row holds a
 * NaN or +inf (out_log_probs is then unspecified; the with-row, and NaN, are reported first). -inf entries
 * are masked tokens, not faults. out_log_probs receives the normalised fused log-probabilities after
 * temperature: log_softmax(l / T). Buffers must hold n floats. */
SDA_API int32_t sda_fuse(const float * logits_with, const float * logits_without, int32_t n,
                         const struct sda_params * params,
                         float * out_log_probs, float * out_temperature, float * out_js);

/* NULL on invalid parameters. The chain that receives the sampler owns and frees it. */
SDA_API struct llama_sampler * sda_sampler_init(const struct sda_params * params, int32_t n_vocab,
                                                struct llama_context * source_ctx, int32_t source_idx);

/* Where the without-instruction logits of the next step are: llama_get_logits_ith(ctx, idx). */
SDA_API void sda_sampler_set_source(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);

/* Both rows of the next step: the with-instruction row the chain samples (llama_sampler_sample(chain,
 * with_ctx, with_idx)) and the without-instruction row. The fusion then reads both rows in place instead of
 * gathering cur_p's logits; it checks, block by block as it writes, that cur_p is that row in id order, and
 * falls back to reading cur_p when it is not (a sampler before this one changed it). */
SDA_API void sda_sampler_set_rows(struct llama_sampler * smpl, struct llama_context * with_ctx, int32_t with_idx,
                                  struct llama_context * without_ctx, int32_t without_idx);

/* Steering for the sampler's next generation, and the instruction as it reads it (NULL: none; the arrays are
 * copied). The sampler follows the answer through its accept calls (llama_sampler_sample makes them). NULL
 * steering: the paper's formula. SDA_OK, or SDA_ERR_INVALID for bad values (clip or plausibility negative or
 * not finite, plausibility >= 1, echo_run, onset or a run_at entry < 0, a count < 0, an array NULL with a
 * count > 0). */
SDA_API int32_t sda_sampler_set_steering(struct llama_sampler * smpl, const struct sda_steering * steering,
                                         const struct sda_instruction * instruction);

/* sda_fuse with steering and the guards of one step (NULL: none). Same codes and output as sda_fuse; `onset`
 * is the sampler's and plays no part here. */
SDA_API int32_t sda_fuse_steered(const float * logits_with, const float * logits_without, int32_t n,
                                 const struct sda_params * params, const struct sda_steering * steering,
                                 const struct sda_guards * guards,
                                 float * out_log_probs, float * out_temperature, float * out_js);

SDA_API void sda_sampler_get_stats(const struct llama_sampler * smpl, struct sda_stats * out);

/* A sampler for plain generation, first in the chain: it passes a finite row through untouched and
 * handles a non-finite one as the SDA sampler does (see the top of this file). NULL when out of memory. */
SDA_API struct llama_sampler * sda_guard_sampler_init(void);

/* Temperature (logits divided by `temperature`, the same float division as llama.cpp's temp sampler; 1 for
 * none), top-p (nucleus), then a draw seeded with `seed` (std::mt19937, as llama.cpp's dist): the candidates are
 * filed by the binary exponent of exp(logit - max) in one pass, so only those at or above the bucket where
 * the cumulative mass crosses top_p are sorted. It keeps the set llama.cpp's top-p keeps (the smallest
 * prefix by decreasing probability whose mass reaches top_p; ties by token id) and draws from it by
 * probability. top_p >= 1 keeps every candidate of non-zero probability. NULL when out of memory or
 * top_p or temperature <= 0 or not finite. Put it last in a chain; it sets the selected candidate. */
SDA_API struct llama_sampler * sda_nucleus_sampler_init(float top_p, float temperature, uint32_t seed);

/* The first fault a sampler made by sda_sampler_init or sda_guard_sampler_init recorded: SDA_OK (none) or an
 * SDA_ERR_NAN_* / SDA_ERR_INF_* code, with *out_step (may be NULL) the 1-based sampling step it happened
 * at (the number of apply calls since init or reset). SDA_ERR_INVALID for any other sampler. */
SDA_API int32_t sda_sampler_get_fault(const struct llama_sampler * smpl, int32_t * out_step);

/* TEST ONLY: at sampling step `step` (1-based), overwrite one logit of `row` (enum sda_row), that of the first
 * candidate (token 0, for a sampler first in its chain), with `value` (enum sda_fault_value) before the
 * checks, so that tests reach the fault path with a real model. The guard sampler has only the with-row.
 * SDA_OK, or SDA_ERR_INVALID for bad arguments. Never called, it costs one integer comparison per step. */
SDA_API int32_t sda_sampler_inject_fault(struct llama_sampler * smpl, int32_t value, int32_t step, int32_t row);

#ifdef __cplusplus
}
#endif

#endif /* SDA_H */
