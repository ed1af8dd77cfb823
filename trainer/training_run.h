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

// The groups a run is spread over (declared once as the tp x sp x dp grid, comm/parallel_grid.h).
// nullptr means a group of one: a run without MPI.
struct TrainGroups {
  Communicator* world = nullptr;
  Communicator* tp = nullptr;  // splits heads, FFN columns and the vocabulary
  Communicator* sp = nullptr;  // splits every sequence's FreqKV chunks
  Communicator* dp = nullptr;  // splits the sequences of a step
  // sp × dp: the ranks holding the same tp shard (ParallelGrid::replicas), over which gradients
  // are summed in one reduction. nullptr: summed over sp, then over dp.
  Communicator* replicas = nullptr;
};

template <typename T>
class TrainingRun {
 public:
  TrainingRun(const TrainConfig& config, Kernels<T>& kernels, const TrainGroups& groups = {});
  // Trains up to schedule.steps, or only up to stop_at (>= 1) when given: a time-limited job
  // (SLURM) stops there with a checkpoint and resumes later with the same schedule.
  TrainSummary run(int64_t stop_at = -1);

  LlamaModel<T>& model() { return *model_; }

 private:
  // Relative paths of the config are inside the run directory.
  std::string in_run_dir(const std::string& path) const;
  bool is_main_rank() const { return world_->rank() == 0; }
  // Copies this rank's shard of sequence `window` (seq_len + 1 tokens) into row b of the batch.
  void fill_row(const int32_t* window, int64_t b, std::vector<int32_t>& inputs,
                std::vector<int32_t>& targets) const;
  // Sums a loss over the ranks that share a step (sp shards and dp sequences).
  LossSum reduce_loss(LossSum local);
  double validation_loss(int64_t* tokens);
  void save_checkpoint(int64_t step, TrainSummary& summary);

  TrainConfig config_;
  Kernels<T>& kernels_;
  LocalCommunicator local_;  // stands in for every group not given
  Communicator *world_, *tp_, *sp_, *dp_, *replicas_;
  // This step's gradient reduction: the ranges the model reported (trainable parameters only),
  // started during the backward of the last micro-batch when parallel.overlap_grad_reduce is on.
  void reduce_gradients_started(bool overlapped);
  std::vector<std::pair<int64_t, int64_t>> ready_ranges_;
  SequenceShard shard_;
  std::unique_ptr<LlamaModel<T>> model_;
  std::unique_ptr<AdamW<T>> optimizer_;
  std::unique_ptr<TokenSampler> sampler_;
  std::optional<ValidationWindows> validation_;
  std::unique_ptr<MetricsLog> metrics_;
  int64_t start_step_ = 0;  // steps already done (from a checkpoint)
};

}  // namespace freqkv
