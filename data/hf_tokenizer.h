// A Hugging Face tokenizer.json (BPE models only) as a Tokenizer; see load_tokenizer().
#pragma once

#include <memory>
#include <string>

#include "data/tokenizer.h"

namespace freqkv {

// tokenizer_json_path: the tokenizer.json itself; a tokenizer_config.json in the same directory
// is read for bos_token / eos_token.
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& tokenizer_json_path);

}  // namespace freqkv
