// The training configuration (`freqkv train --config FILE --set key.path=value`), in the style of
// marian's options: an embedded YAML document holds every known key with its default and a comment
// (default_config_yaml(); the single source of truth), the user's YAML file is merged over it, then
// the --set overrides, and the result is validated into TrainConfig. Unknown keys and values of the
// wrong type are errors that name the full key path, the value and where it came from.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/token_file.h"
#include "kernels/compression_impl.h"
#include "model/model_config.h"

namespace freqkv {

enum class TrainDevice { Cpu, Cuda };
enum class TrainPrecision { FP32, FP64, BF16 };
enum class LrScheduleKind { Constant, Cosine, Linear };

// The config spellings ("cpu", "bf16", "cosine", ...).
const char* train_device_name(TrainDevice device);
const char* train_precision_name(TrainPrecision precision);
const char* lr_schedule_kind_name(LrScheduleKind kind);

// Exactly one of path / init_config is non-empty.
struct ModelSection {
  std::string path;         // a Hugging Face LLaMA directory to import
  std::string init_config;  // a config.json to initialise randomly instead
  uint64_t init_seed = 1234;
  double init_std = 0.02;
};

struct ValidationSection {
  std::vector<std::string> files;  // separate token files; when empty, `fraction` is held out
  double fraction = 0.0;           // tail share of every train shard held out, in [0, 1)
  int64_t every = 0;               // steps between evaluations; 0 = never
  int64_t batches = 4;             // micro-batches of data.batch_size windows per evaluation
};

struct DataSection {
  std::vector<std::string> train;  // token files, at least one
  TokenDType token_dtype = TokenDType::U16;
  int64_t seq_len = 8192;    // tokens predicted per sequence (windows hold seq_len + 1 tokens)
  int64_t batch_size = 1;    // sequences per micro-batch
  int64_t grad_accum = 1;    // micro-batches per optimizer step
  uint64_t seed = 1234;      // the data sampler's seed
  int64_t eos_token = -1;    // the EOS id joining documents in the files; -1 = none
  ValidationSection validation;
};

struct OptimizerSection {  // AdamW
  double lr = 2e-5;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double grad_clip = 1.0;  // global gradient-norm clip; 0 = off
};

struct ScheduleSection {
  int64_t steps = 1000;        // optimizer steps in the run
  int64_t warmup_steps = 20;   // linear warm-up from lr/warmup_steps to lr
  LrScheduleKind kind = LrScheduleKind::Constant;
  double min_lr_ratio = 0.0;   // cosine/linear decay ends at min_lr_ratio * lr at `steps`
};

struct LoraSection {
  bool enabled = true;
  int64_t rank = 8;
  double alpha = 16.0;   // the update is scaled by alpha / rank
  double dropout = 0.0;  // only 0 is supported
  std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj"};
  // Substrings of parameter names (HF names) that are trained in full next to the adapters.
  std::vector<std::string> trainable = {"embed_tokens", "norm"};
};

struct CheckpointSection {
  std::string dir = "checkpoints";  // relative paths are inside logging.run_dir
  int64_t every = 100;              // steps between checkpoints; 0 = only at the end
  int64_t keep_last = 3;            // periodic checkpoints kept; 0 = keep all
  std::string resume;               // "", "latest" (newest in dir) or a checkpoint path
};

struct LoggingSection {
  int64_t every = 1;                          // steps between metric lines
  std::string metrics_file = "metrics.jsonl";  // relative paths are inside run_dir
  std::string run_dir = "runs/default";
};

struct ParallelSection {
  int64_t tp = 1;  // tensor parallel ranks
  int64_t sp = 1;  // sequence parallel ranks
  int64_t dp = 1;  // data parallel ranks
  bool zero1 = true;  // shard the optimiser state across the dp ranks (ZeRO stage 1)
  bool overlap_grad_reduce = true;  // reduce gradients during the backward (per layer)
};

struct TrainConfig {
  ModelSection model;
  TrainDevice device = TrainDevice::Cpu;
  TrainPrecision precision = TrainPrecision::FP32;
  bool recompute = false;  // activation recomputation per layer (LlamaModel::set_recompute)
  FreqKVConfig freqkv;
  // How device cuda computes the compressions (the YAML key freqkv.compression; not part of the
  // model: the CPU always multiplies by P).
  CompressionImpl freqkv_compression = CompressionImpl::Auto;
  DataSection data;
  OptimizerSection optimizer;
  ScheduleSection schedule;
  LoraSection lora;
  CheckpointSection checkpoint;
  LoggingSection logging;
  ParallelSection parallel;

  // The fully merged configuration as YAML, every key present, with the defaults' comments.
  // Stored in every checkpoint and printed by --dump-config; loading it back gives an equal
  // TrainConfig (and the same resolved_yaml).
  std::string resolved_yaml;
};

// Field-by-field equality of the typed sections (resolved_yaml is not compared: it is derived).
bool operator==(const TrainConfig& a, const TrainConfig& b);
inline bool operator!=(const TrainConfig& a, const TrainConfig& b) { return !(a == b); }

// The embedded defaults: every known key, its default and a comment.
std::string default_config_yaml();

// Defaults, merged with the YAML file at yaml_path ("" = defaults only), then each override
// "key.path=value" (value parsed as YAML: a scalar, or a list such as [q_proj,v_proj]), then
// validated. Throws std::invalid_argument naming the key path, the value and its source for an
// unknown key, a malformed override or an invalid value; std::runtime_error for an unreadable
// file.
TrainConfig load_train_config(const std::string& yaml_path,
                              const std::vector<std::string>& overrides);

// The same from YAML text (e.g. the resolved_yaml stored in a checkpoint, when resuming);
// source_name names it in errors.
TrainConfig load_train_config_from_string(const std::string& yaml_text,
                                          const std::vector<std::string>& overrides,
                                          const std::string& source_name);

// The learning rate of optimizer step `step` (counted from 1): linear warm-up from
// lr / warmup_steps at step 1 to lr at step warmup_steps, then constant, or a cosine or linear
// decay reaching min_lr_ratio * lr at step schedule.steps (and staying there after it).
// Throws std::invalid_argument for step < 1.
double learning_rate(const TrainConfig& config, int64_t step);

}  // namespace freqkv
