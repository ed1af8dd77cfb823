#include "trainer/training_run.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "comm/mpi_communicator.h"
#include "model/hf_checkpoint.h"
#include "trainer/checkpoint_dir.h"
#include "trainer/human_units.h"
#include "trainer/model_checkpoint.h"
#include "trainer/train_setup.h"

namespace freqkv {

template <typename T>
TrainingRun<T>::TrainingRun(const TrainConfig& config, Kernels<T>& kernels,
                            const TrainGroups& groups)
    : config_(config),
      kernels_(kernels),
      world_(groups.world ? groups.world : &local_),
      tp_(groups.tp ? groups.tp : &local_),
      sp_(groups.sp ? groups.sp : &local_),
      dp_(groups.dp ? groups.dp : &local_),
      replicas_(groups.replicas) {
  if (config_.data.batch_size % dp_->size() != 0)
    throw std::invalid_argument("data.batch_size = " + std::to_string(config_.data.batch_size) +
                                " sequences must divide among dp = " +
                                std::to_string(dp_->size()) + " ranks");
  if (is_main_rank()) {
    std::filesystem::create_directories(config_.logging.run_dir);
    // the resolved config next to the results, as it was at the start of this process
    std::ofstream out(in_run_dir("config.yaml"));
    out << config_.resolved_yaml;
  }

  // Resume point first: a checkpoint fixes the architecture.
  const CheckpointDir checkpoints(in_run_dir(config_.checkpoint.dir));
  std::string resume_path;
  if (!config_.checkpoint.resume.empty()) resume_path = checkpoints.resolve(config_.checkpoint.resume);
  std::optional<CheckpointReader> resume;
  if (!resume_path.empty()) resume.emplace(CheckpointReader::open(resume_path));

  const ModelConfig model_config = resume ? checkpoint_model_config(*resume) : model_config_of(config_);
  ModelParallel parallel;
  if (tp_->size() > 1) parallel.tp = tp_;
  if (sp_->size() > 1) parallel.sp = sp_;
  model_ = std::make_unique<LlamaModel<T>>(model_config, config_.freqkv, kernels_,
                                           lora_config_of(config_), parallel);
  shard_ = model_->sequence_shard(config_.data.seq_len);
  model_->set_recompute(config_.recompute);
  if (resume) {
    load_checkpoint_weights(*resume, *model_);
  } else if (!config_.model.path.empty()) {
    load_hf_weights(*model_, SafetensorsReader::open_model_dir(config_.model.path));
    model_->init_lora(config_.model.init_seed);
  } else {
    model_->init_random(config_.model.init_seed, config_.model.init_std);
  }
  const int64_t trained = apply_trainable(config_, *model_);
  optimizer_ = std::make_unique<AdamW<T>>(
      *model_,
      AdamWOptions{config_.optimizer.beta1, config_.optimizer.beta2, config_.optimizer.eps,
                   config_.optimizer.weight_decay},
      dp_, config_.parallel.zero1);
  if (resume) start_step_ = load_checkpoint_optimizer(*resume, *optimizer_);

  const DataSection& d = config_.data;
  const bool heldout = d.validation.files.empty() && d.validation.fraction > 0;
  sampler_ = std::make_unique<TokenSampler>(TokenSampler::open(
      d.train, d.token_dtype, d.seq_len, heldout ? d.validation.fraction : 0.0, d.seed));
  if (d.validation.every > 0) {
    if (!d.validation.files.empty()) {
      std::vector<TokenFile> files;
      for (const std::string& f : d.validation.files) files.push_back(TokenFile::open(f, d.token_dtype));
      validation_.emplace(TokenSampler::validation(files, d.seq_len));
    } else if (heldout) {
      validation_.emplace(sampler_->validation());
    } else {
      throw std::invalid_argument(
          "data.validation.every is " + std::to_string(d.validation.every) +
          " but there is no validation data: set data.validation.files or data.validation.fraction");
    }
  }
  if (!is_main_rank()) return;  // one rank reports and writes
  metrics_ = std::make_unique<MetricsLog>(in_run_dir(config_.logging.metrics_file));

  const FreqKVConfig& f = config_.freqkv;
  std::printf("freqkv train: model %s, %s parameters (%s trained%s), backend %s\n",
              config_.model.path.empty() ? config_.model.init_config.c_str()
                                         : config_.model.path.c_str(),
              format_count(model_->param_table().total_numel()).c_str(), format_count(trained).c_str(),
              config_.lora.enabled ? ", LoRA" : ", full fine-tuning", kernels_.name().c_str());
  std::printf("freqkv train: %lld steps x %lld sequences x %lld tokens; attention: %s\n",
              static_cast<long long>(config_.schedule.steps),
              static_cast<long long>(d.batch_size * d.grad_accum), static_cast<long long>(d.seq_len),
              f.enabled ? ("FreqKV cache " + std::to_string(f.cache) + " sink " +
                           std::to_string(f.sink) + " kept " + std::to_string(f.compressed()) +
                           " step " + std::to_string(f.step()))
                              .c_str()
                        : "full causal");
  std::printf("freqkv train: run directory %s\n", config_.logging.run_dir.c_str());
  if (resume) metrics_->log_event(start_step_, "resumed", resume_path);
  std::fflush(stdout);
}

template <typename T>
std::string TrainingRun<T>::in_run_dir(const std::string& path) const {
  const std::filesystem::path p(path);
  return p.is_absolute() ? path : (std::filesystem::path(config_.logging.run_dir) / p).string();
}

template <typename T>
void TrainingRun<T>::fill_row(const int32_t* window, int64_t b, std::vector<int32_t>& inputs,
                              std::vector<int32_t>& targets) const {
  const int64_t n = shard_.tokens;
  std::copy(window + shard_.token_begin, window + shard_.token_begin + n, inputs.begin() + b * n);
  std::copy(window + shard_.token_begin + 1, window + shard_.token_begin + n + 1,
            targets.begin() + b * n);
}

template <typename T>
LossSum TrainingRun<T>::reduce_loss(LossSum local) {
  for (Communicator* group : {sp_, dp_}) {
    local.sum = group->all_reduce_scalar(local.sum, ReduceOp::kSum);
    local.count = static_cast<int64_t>(
        group->all_reduce_scalar(static_cast<double>(local.count), ReduceOp::kSum));
  }
  return local;
}

template <typename T>
double TrainingRun<T>::validation_loss(int64_t* tokens) {
  const int64_t B = config_.data.batch_size / dp_->size(), T_len = config_.data.seq_len;
  const int64_t windows = std::min(validation_->size(), config_.data.validation.batches * B * dp_->size());
  std::vector<int32_t> window(static_cast<size_t>(T_len + 1)), inputs, targets;
  std::vector<int64_t> mine;  // data parallel: window w belongs to dp rank w % dp
  for (int64_t w = dp_->rank(); w < windows; w += dp_->size()) mine.push_back(w);
  LossSum local;
  for (size_t w0 = 0; w0 < mine.size(); w0 += B) {
    const int64_t batch = std::min<int64_t>(B, static_cast<int64_t>(mine.size() - w0));
    inputs.resize(static_cast<size_t>(batch * shard_.tokens));
    targets.resize(inputs.size());
    for (int64_t b = 0; b < batch; ++b) {
      validation_->window(mine[w0 + b], window.data());
      fill_row(window.data(), b, inputs, targets);
    }
    const LossSum s = model_->forward(inputs.data(), targets.data(), batch, T_len, 0.0);
    local.sum += s.sum;
    local.count += s.count;
  }
  const LossSum total = reduce_loss(local);
  *tokens = total.count;
  return total.sum / static_cast<double>(total.count);
}

template <typename T>
void TrainingRun<T>::save_checkpoint(int64_t step, TrainSummary& summary) {
  const CheckpointDir dir(in_run_dir(config_.checkpoint.dir));
  const std::string path = dir.path_for_step(step);
  // One file written by all ranks together: each its tensor-parallel shard of the weights (from
  // the sp 0 / dp 0 copy) and of the ZeRO-1 states it owns (from the sp 0 copy).
  CheckpointLayout layout;
  if (auto* mpi = dynamic_cast<MpiCommunicator*>(world_); mpi && world_->size() > 1)
    layout.comm = mpi->comm();
  layout.tp_rank = tp_->rank();
  layout.writes_weights = sp_->rank() == 0 && dp_->rank() == 0;
  layout.writes_states = sp_->rank() == 0;
  save_training_checkpoint(path, *model_, *optimizer_, step, config_.resolved_yaml, layout);
  if (is_main_rank()) {
    if (config_.checkpoint.keep_last > 0) dir.prune(static_cast<int>(config_.checkpoint.keep_last));
    metrics_->log_event(step, "checkpoint", path);
  }
  world_->barrier();
  summary.last_checkpoint = path;
}

template <typename T>
TrainSummary TrainingRun<T>::run(int64_t stop_at) {
  const DataSection& d = config_.data;
  // Data parallel: each dp rank runs batch_size / dp of every micro-batch's sequences.
  const int64_t B = d.batch_size / dp_->size(), T_len = d.seq_len, steps = config_.schedule.steps;
  const int64_t last = stop_at >= 1 ? std::min(stop_at, steps) : steps;
  TrainSummary summary;
  summary.run_dir = config_.logging.run_dir;
  summary.first_step = start_step_ + 1;
  summary.last_step = start_step_;
  if (start_step_ >= steps) {
    if (is_main_rank())
      std::printf("freqkv train: the checkpoint is at step %lld, the schedule ends at %lld: "
                  "nothing to do (raise schedule.steps to train further)\n",
                  static_cast<long long>(start_step_), static_cast<long long>(steps));
    return summary;
  }
  std::vector<int32_t> window(static_cast<size_t>(T_len + 1));
  std::vector<int32_t> inputs(static_cast<size_t>(B * shard_.tokens)), targets(inputs.size());
  const auto start = std::chrono::steady_clock::now();
  auto last_log = start;
  int64_t tokens_since_log = 0;

  for (int64_t step = start_step_ + 1; step <= last; ++step) {
    kernels_.reset_peak_memory();
    model_->zero_grads();
    const double grad_scale = 1.0 / static_cast<double>(d.grad_accum * d.batch_size * T_len);
    LossSum local;
    // The last micro-batch's backward reports each range of final gradients; with overlap on,
    // its reduction starts right there, while the layers below are still in backward.
    const bool overlap = config_.parallel.overlap_grad_reduce && replicas_ != nullptr &&
                         replicas_->size() > 1;
    ready_ranges_.clear();
    for (int64_t micro = 0; micro < d.grad_accum; ++micro) {
      if (micro + 1 == d.grad_accum) {
        model_->set_grad_ready_hook([this, overlap](int64_t offset, int64_t count) {
          ready_ranges_.emplace_back(offset, count);
          if (!overlap) return;
          replicas_->progress();
          replicas_->start_all_reduce_sum(model_->grads() + offset, count);
        });
      }
      for (int64_t b = 0; b < B; ++b) {
        // The sequence's index within the step does not depend on the grid.
        sampler_->sample(step, micro * d.batch_size + dp_->rank() * B + b, window.data());
        fill_row(window.data(), b, inputs, targets);
      }
      const LossSum s = model_->forward(inputs.data(), targets.data(), B, T_len, grad_scale);
      model_->backward();
      local.sum += s.sum;
      local.count += s.count;
    }
    model_->set_grad_ready_hook(nullptr);
    reduce_gradients_started(overlap);
    const LossSum loss = reduce_loss(local);
    const double mean_loss = loss.sum / static_cast<double>(loss.count);
    const double norm = optimizer_->grad_norm();
    if (!std::isfinite(mean_loss) || !std::isfinite(norm))
      throw std::runtime_error("training diverged at step " + std::to_string(step) + " (loss " +
                               std::to_string(mean_loss) + ", gradient norm " +
                               std::to_string(norm) + "); the last checkpoint is intact: lower "
                               "optimizer.lr or raise schedule.warmup_steps and resume");
    // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above max_norm.
    const double clip = config_.optimizer.grad_clip;
    const double scale = clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0;
    const double lr = learning_rate(config_, step);
    optimizer_->step(lr, scale);
    tokens_since_log += loss.count;
    summary.last_step = step;
    summary.last_loss = mean_loss;

    if (step % config_.logging.every == 0 || step == last || step == start_step_ + 1) {
      // The busiest rank's memory (every rank takes part in the two scalar reductions).
      const double memory = world_->all_reduce_scalar(
          static_cast<double>(kernels_.memory_in_use()), ReduceOp::kMax);
      const double peak = world_->all_reduce_scalar(static_cast<double>(kernels_.peak_memory()),
                                                    ReduceOp::kMax);
      if (is_main_rank()) {
        const auto now = std::chrono::steady_clock::now();
        StepMetrics m;
        m.step = step;
        m.total_steps = steps;
        m.loss = mean_loss;
        m.lr = lr;
        m.grad_norm = norm;
        m.tokens = loss.count;
        m.elapsed_seconds = std::chrono::duration<double>(now - start).count();
        m.tokens_per_second = static_cast<double>(tokens_since_log) /
                              std::max(1e-9, std::chrono::duration<double>(now - last_log).count());
        m.memory_bytes = static_cast<int64_t>(memory);
        m.peak_memory_bytes = static_cast<int64_t>(peak);
        metrics_->log_step(m, step - start_step_);
        last_log = now;
        tokens_since_log = 0;
      }
    }
    if (validation_ && (step % d.validation.every == 0 || step == steps)) {
      int64_t tokens = 0;
      summary.last_validation_loss = validation_loss(&tokens);
      if (is_main_rank()) metrics_->log_validation(step, summary.last_validation_loss, tokens);
    }
    if ((config_.checkpoint.every > 0 && step % config_.checkpoint.every == 0) || step == last)
      save_checkpoint(step, summary);
  }
  return summary;
}

template <typename T>
void TrainingRun<T>::reduce_gradients_started(bool overlapped) {
  // Every rank of a step computed part of the gradient (its sequence shards, its sequences):
  // sum the trainable ranges over the sp × dp ranks (frozen parameters have nothing to sum).
  if (overlapped) {
    replicas_->wait_reductions();
    return;
  }
  const std::vector<Communicator*> groups =
      replicas_ ? std::vector<Communicator*>{replicas_} : std::vector<Communicator*>{sp_, dp_};
  for (Communicator* group : groups)
    if (group->size() > 1)
      for (const auto& [offset, count] : ready_ranges_)
        group->all_reduce_sum(model_->grads() + offset, count);
}

template class TrainingRun<float>;
template class TrainingRun<double>;
template class TrainingRun<bf16>;

}  // namespace freqkv
