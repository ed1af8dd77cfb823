// The subcommands of the freqkv binary. Each takes its arguments (after the subcommand name),
// returns the process exit code, and throws UsageError for command-line mistakes.
#pragma once

#include <string>
#include <vector>

namespace freqkv {

int run_eval_loss(const std::vector<std::string>& args);
int run_init_model(const std::vector<std::string>& args);
int run_tokenize(const std::vector<std::string>& args);
int run_train(const std::vector<std::string>& args);
int run_export(const std::vector<std::string>& args);
int run_bench(const std::vector<std::string>& args);
int run_generate(const std::vector<std::string>& args);
int run_eval(const std::vector<std::string>& args);
int run_passkey(const std::vector<std::string>& args);

}  // namespace freqkv
