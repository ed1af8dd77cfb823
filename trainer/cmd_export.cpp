// freqkv export: a training checkpoint -> a Hugging Face directory (LoRA merged), and optionally
// the LoRA adapter alone in PEFT's layout.
#include <cstdio>
#include <filesystem>

#include "kernels/cpu/cpu_kernels.h"
#include "model/hf_checkpoint.h"
#include "trainer/checkpoint_dir.h"
#include "trainer/cli_args.h"
#include "trainer/commands.h"
#include "trainer/model_checkpoint.h"

namespace freqkv {

int run_export(const std::vector<std::string>& args) {
  ArgParser p("export", "Writes a training checkpoint as a Hugging Face LLaMA directory "
                        "(config.json + model.safetensors, LoRA merged into the weights).");
  p.option("checkpoint", "PATH|DIR", "a checkpoint file, or a checkpoint directory (its newest)",
           "", true);
  p.option("out", "DIR", "output Hugging Face directory", "", true);
  p.option("adapter-out", "DIR", "also write the LoRA adapter alone (PEFT layout) here");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  std::string path = p.get("checkpoint");
  if (std::filesystem::is_directory(path)) path = CheckpointDir(path).resolve("latest");
  const CheckpointReader reader = CheckpointReader::open(path);
  CpuKernels<float> kernels;
  FreqKVConfig freqkv;
  freqkv.enabled = false;  // attention settings do not enter the weights
  LlamaModel<float> model(checkpoint_model_config(reader), freqkv, kernels,
                          checkpoint_lora_config(reader));
  load_checkpoint_weights(reader, model);
  save_hf_model(model, p.get("out"));
  std::printf("freqkv export: step %lld of %s -> %s\n",
              static_cast<long long>(reader.int_attribute("step")), path.c_str(),
              p.get("out").c_str());
  if (p.given("adapter-out")) {
    save_peft_adapter(model, p.get("adapter-out"));
    std::printf("freqkv export: LoRA adapter -> %s\n", p.get("adapter-out").c_str());
  }
  return 0;
}

}  // namespace freqkv
