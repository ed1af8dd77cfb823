// freqkv: one binary, one subcommand per job.
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "trainer/cli_args.h"
#include "trainer/commands.h"

namespace {

struct Subcommand {
  const char* name;
  const char* summary;
  std::function<int(const std::vector<std::string>&)> run;
};

const std::vector<Subcommand>& subcommands() {
  static const std::vector<Subcommand> list = {
      {"train", "fine-tune a model with FreqKV attention from a YAML config", freqkv::run_train},
      {"export", "write a checkpoint as a Hugging Face directory (LoRA merged) or PEFT adapter",
       freqkv::run_export},
      {"eval-loss", "next-token loss (and optionally its gradients) of a model on a token file",
       freqkv::run_eval_loss},
      {"init-model", "write a randomly initialised Hugging Face LLaMA directory from a config.json",
       freqkv::run_init_model},
      {"tokenize", "turn UTF-8 text files into a flat token file (byte-level vocabulary)",
       freqkv::run_tokenize},
      {"bench", "time training steps by sequence length: tokens/s, TFLOP/s, MFU, peak memory",
       freqkv::run_bench},
      {"generate", "continue a prompt with the FreqKV cache (greedy or sampled)",
       freqkv::run_generate},
      {"eval", "perplexity by window length and position, FreqKV vs full attention",
       freqkv::run_eval},
      {"passkey", "passkey retrieval accuracy by prompt length and key depth", freqkv::run_passkey},
  };
  return list;
}

void print_help() {
  std::printf("usage: freqkv <command> [options]   (freqkv <command> --help for its options)\n\n"
              "FreqKV: frequency-domain KV compression for context-window extension of LLaMA "
              "models.\n\ncommands:\n");
  for (const Subcommand& s : subcommands()) std::printf("  %-12s %s\n", s.name, s.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ||
      std::string(argv[1]) == "help") {
    print_help();
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  for (const Subcommand& s : subcommands()) {
    if (command != s.name) continue;
    try {
      return s.run(args);
    } catch (const freqkv::UsageError& e) {
      std::fprintf(stderr, "freqkv %s: %s\n(run 'freqkv %s --help' for the options)\n", s.name,
                   e.what(), s.name);
      return 2;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "freqkv %s: error: %s\n", s.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "freqkv: unknown command '%s'\n\n", command.c_str());
  print_help();
  return 2;
}
