// freqkv init-model: a randomly initialised model, written as a Hugging Face directory.
#include <cstdio>

#include "kernels/cpu/cpu_kernels.h"
#include "model/hf_checkpoint.h"
#include "model/hf_config.h"
#include "trainer/cli_args.h"
#include "trainer/commands.h"

namespace freqkv {

int run_init_model(const std::vector<std::string>& args) {
  ArgParser p("init-model", "Writes DIR/config.json and DIR/model.safetensors (F32) with weights "
                            "drawn from N(0, std) and norm weights set to one.");
  p.option("config", "FILE", "Hugging Face config.json describing the architecture", "", true);
  p.option("out", "DIR", "output model directory", "", true);
  p.option("seed", "N", "random seed", "1234");
  p.option("std", "X", "standard deviation of the weights", "0.02");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  const ModelConfig config = read_hf_config(p.get("config"));
  CpuKernels<float> kernels;
  FreqKVConfig no_freqkv;
  no_freqkv.enabled = false;
  LlamaModel<float> model(config, no_freqkv, kernels);
  model.init_random(static_cast<uint64_t>(p.get_int("seed")), p.get_double("std"));
  save_hf_model(model, p.get("out"));
  std::fprintf(stderr, "freqkv init-model: %lld parameters written to %s\n",
               static_cast<long long>(model.param_table().total_numel()), p.get("out").c_str());
  return 0;
}

}  // namespace freqkv
