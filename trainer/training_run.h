// One fine-tuning run, as `freqkv train` drives it: the model (imported or initialised, LoRA
// attached), the data sampler, AdamW, the learning-rate schedule, validation, checkpoints every
// N steps (and at the end), metrics. Resuming from a checkpoint continues bit for bit: the data
// of a step depends only on (seed, step), the optimiser state and weights are restored exactly.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "data/sampler.h"
#include "trainer/metrics_log.h"
#include "trainer/optimizer.h"
#include "trainer/train_config.h"

namespace freqkv {

struct TrainSummary {
  int64_t first_step = 0;  // the first step this process ran (resume point + 1)
  int64_t last_step = 0;
  double last_loss = 0;
  double last_validation_loss = -1;  // -1: no validation ran
  std::string last_checkpoint;
  std::string run_dir;
};

template <typename T>
class TrainingRun {
 public:
  TrainingRun(const TrainConfig& config, Kernels<T>& kernels);
  // Trains up to schedule.steps, or only up to stop_at (>= 1) when given: a time-limited job
  // (SLURM) stops there with a checkpoint and resumes later with the same schedule.
  TrainSummary run(int64_t stop_at = -1);

  LlamaModel<T>& model() { return *model_; }

 private:
  // Relative paths of the config are inside the run directory.
  std::string in_run_dir(const std::string& path) const;
  double validation_loss(int64_t* tokens);
  void save_checkpoint(int64_t step, TrainSummary& summary);

  TrainConfig config_;
  Kernels<T>& kernels_;
  std::unique_ptr<LlamaModel<T>> model_;
  std::unique_ptr<AdamW<T>> optimizer_;
  std::unique_ptr<TokenSampler> sampler_;
  std::optional<ValidationWindows> validation_;
  std::unique_ptr<MetricsLog> metrics_;
  int64_t start_step_ = 0;  // steps already done (from a checkpoint)
};

}  // namespace freqkv
