// Argument checks shared by every backend's attention (kernels/kernels.h, attention_forward and
// attention_backward): the same call is refused with the same message on the CPU and the GPU.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/kernels.h"

namespace freqkv {

// Checks the shape, the strides and the blocks: n_kv >= n_q >= 0 and non-negative starts per
// block (with bottom-right alignment every query then sees at least one key), disjoint query
// ranges (each output row is written once) and, when kv_disjoint (the backward overwrites
// dk/dv), disjoint key ranges. Throws std::invalid_argument naming `where` and the block.
void check_attention_arguments(const std::vector<AttnBlock>& blocks, const AttnShape& shape,
                               int64_t ld_q, int64_t ld_out, int64_t ld_kv, bool kv_disjoint,
                               const char* where);

}  // namespace freqkv
