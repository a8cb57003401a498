// Nucleus (top-p) selection and a seeded draw in one pass family, without sorting the vocabulary.
//
// llama.cpp's top-p computes a softmax over every candidate and partially sorts them; over 49,152 to 262,144
// candidates that costs more than the SDA fusion itself. Here: vectorised passes compute w_i =
// exp(x_i - max), the total, and the mass at or above a floor (a fraction of the top weight, 1/256 first);
// the first floor whose mass reaches p * total bounds the nucleus (a token below it would come after all
// those above, whose mass already reaches p * total), so only the candidates above it are gathered and
// sorted.
// The kept set is the one llama.cpp's top-p keeps: the smallest prefix of the candidates by decreasing
// probability whose mass reaches p (ties broken by token id), up to float rounding at the boundary.
#pragma once

#include "llama.h"

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace sda {

struct nucleus_workspace {
    std::vector<float> w;           // exp(x_i - max)
    std::vector<float> block_top;   // the largest w of each block of candidates
    std::vector<uint32_t> kept;     // indices of the candidates at or above the threshold
    std::vector<llama_token_data> front;  // the kept candidates, in order
};

// Keep cur_p's nucleus: cur_p->data becomes the kept candidates by decreasing probability (p filled, summing
// to 1), cur_p->size their number, cur_p->sorted true. top_p >= 1 keeps every candidate of non-zero
// probability. Returns the kept mass as a fraction of the whole (for tests).
// The candidates' logits are divided by `temperature` first, as llama.cpp's temp sampler would (the same
// float division, so the same distribution), without a pass of its own over the candidates.
double nucleus_select(llama_token_data_array * cur_p, float top_p, float temperature, nucleus_workspace & ws);

// Draw one of the kept candidates by probability with rng; sets cur_p->selected.
void nucleus_draw(llama_token_data_array * cur_p, std::mt19937 & rng);

}  // namespace sda
