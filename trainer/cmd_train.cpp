// freqkv train: a FreqKV fine-tune from a YAML config (see configs/README.md).
#include <cstdio>

#include "comm/mpi_communicator.h"
#include "comm/parallel_grid.h"
#include "kernels/cpu/cpu_kernels.h"
#if defined(FREQKV_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif
#if defined(FREQKV_HAVE_NCCL)
#include "comm/nccl_communicator.h"
#endif
#include "trainer/cli_args.h"
#include "trainer/commands.h"
#include "trainer/training_run.h"

namespace freqkv {

namespace {

template <typename T>
int train_with(const TrainConfig& config, int64_t stop_at, const TrainGroups& groups,
               Kernels<T>& kernels) {
  TrainingRun<T> run(config, kernels, groups);
  const TrainSummary s = run.run(stop_at);
  if (groups.world->rank() != 0) return 0;
  std::printf("freqkv train: done: steps %lld..%lld, last loss %.4f", static_cast<long long>(s.first_step),
              static_cast<long long>(s.last_step), s.last_loss);
  if (s.last_validation_loss >= 0) std::printf(", validation loss %.4f", s.last_validation_loss);
  std::printf("\nfreqkv train: last checkpoint %s\n",
              s.last_checkpoint.empty() ? "(none written)" : s.last_checkpoint.c_str());
  return 0;
}

template <typename T>
int train_with(const TrainConfig& config, int64_t stop_at, ParallelGrid& grid, Kernels<T>& kernels) {
  return train_with(config, stop_at,
                    TrainGroups{&grid.world(), &grid.tp(), &grid.sp(), &grid.dp(), &grid.replicas()},
                    kernels);
}

}  // namespace

int run_train(const std::vector<std::string>& args) {
  ArgParser p("train", "Fine-tunes a LLaMA model with FreqKV attention as CONFIG.yaml says "
                       "(defaults and every key: configs/README.md).");
  p.positionals("CONFIG.yaml", "the training config (recipes in configs/)");
  p.repeated_option("set", "KEY=VALUE", "override one config key, e.g. optimizer.lr=1e-4");
  p.option("resume", "latest|PATH", "resume from the newest checkpoint of the run, or a file");
  p.option("tp", "N", "tensor-parallel ranks (overrides parallel.tp)");
  p.option("sp", "N", "sequence-parallel ranks (overrides parallel.sp)");
  p.option("dp", "N", "data-parallel ranks (overrides parallel.dp)");
  p.option("stop-at", "STEP", "stop after this step (with a checkpoint); resume later with "
                              "--resume latest");
  p.flag("dump-config", "print the resolved config as YAML and exit");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  if (p.positional_values().size() != 1)
    throw UsageError("expected exactly one CONFIG.yaml, got " +
                     std::to_string(p.positional_values().size()));
  std::vector<std::string> overrides = p.get_all("set");
  if (p.given("resume")) overrides.push_back("checkpoint.resume=" + p.get("resume"));
  for (const char* dim : {"tp", "sp", "dp"})
    if (p.given(dim)) overrides.push_back(std::string("parallel.") + dim + "=" + p.get(dim));
  const TrainConfig config = load_train_config(p.positional_values()[0], overrides);
  if (p.flag_set("dump-config")) {
    std::printf("%s", config.resolved_yaml.c_str());
    return 0;
  }
  const int64_t stop_at = p.given("stop-at") ? p.get_int("stop-at") : -1;
  if (p.given("stop-at") && stop_at < 1) throw UsageError("--stop-at must be >= 1");

  MpiSession mpi;
  const GridShape shape{static_cast<int>(config.parallel.tp), static_cast<int>(config.parallel.sp),
                        static_cast<int>(config.parallel.dp)};
  const std::unique_ptr<ParallelGrid> grid = make_grid(shape);
  if (grid->world_rank() == 0) std::printf("%s", grid->table().c_str());
  switch (config.device) {
    case TrainDevice::Cpu:
      if (config.precision == TrainPrecision::FP32) {
        CpuKernels<float> kernels;
        return train_with<float>(config, stop_at, *grid, kernels);
      }
      if (config.precision == TrainPrecision::FP64) {
        CpuKernels<double> kernels;
        return train_with<double>(config, stop_at, *grid, kernels);
      }
      throw std::invalid_argument(std::string("precision ") +
                                  train_precision_name(config.precision) +
                                  " is not available on the CPU: use fp32 or fp64");
    case TrainDevice::Cuda: {
#if defined(FREQKV_HAVE_CUDA)
      if (grid->world().size() == 1) {
        const std::unique_ptr<Kernels<bf16>> kernels = make_cuda_kernels(0);
        set_cuda_compression_impl(*kernels, config.freqkv_compression);
        return train_with<bf16>(config, stop_at, *grid, *kernels);
      }
#if defined(FREQKV_HAVE_NCCL)
      {
        // One GPU per rank (node-local rank modulo the visible devices); the model's tp/sp
        // collectives and the trainer's gradient reduction move device memory over NCCL, ordered
        // against the backend's stream. The world stays the MPI one: checkpoints are written
        // through MPI-IO on it.
        const int device = device_for_this_rank();
        const std::unique_ptr<Kernels<bf16>> kernels = make_cuda_kernels(device);
        set_cuda_compression_impl(*kernels, config.freqkv_compression);
        const std::unique_ptr<ParallelGrid> nccl =
            make_nccl_grid(shape, device, cuda_kernels_stream(*kernels));
        if (grid->world_rank() == 0) {
          int version = 0;
          ncclGetVersion(&version);
          std::printf("freqkv train: collectives over NCCL %d.%d.%d, one GPU per rank (device = "
                      "node-local rank modulo the visible devices)\n",
                      version / 10000, version / 100 % 100, version % 100);
        }
        return train_with<bf16>(config, stop_at,
                                TrainGroups{&grid->world(), &nccl->tp(), &nccl->sp(), &nccl->dp(),
                                           &nccl->replicas()},
                                *kernels);
      }
#else
      throw std::invalid_argument("device: cuda with " + std::to_string(grid->world().size()) +
                                  " ranks needs the NCCL communicator, and this freqkv was built "
                                  "without NCCL (no nccl.h / libnccl at build time): rebuild with "
                                  "NCCL, start one rank, or use device: cpu");
#endif
#else
      throw std::invalid_argument("device: cuda, but this freqkv was built without the CUDA "
                                  "backend (no nvcc at build time): rebuild on a machine with the "
                                  "CUDA toolkit, or use device: cpu");
#endif
    }
  }
  return 1;
}

}  // namespace freqkv
