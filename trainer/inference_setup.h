// What the inference commands (generate, eval, passkey) share: where the model comes from
// (--model DIR | --checkpoint PATH), its tokenizer, the FreqKV cache settings, the backend, and
// the ranks (--tp N under `mpirun -np N`: the model split by tensor parallelism).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "comm/parallel_grid.h"
#include "data/tokenizer.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/llama_model.h"
#include "trainer/cli_args.h"
#if defined(FREQKV_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif

namespace freqkv {

// Declares --model, --checkpoint, --cache, --sink, --ratio, --no-freqkv, --device, --precision,
// --max-chunk, --tp, and --tokenizer when with_tokenizer.
void add_inference_options(ArgParser& p, bool with_tokenizer);

struct InferenceSetup {
  std::string model_dir;        // --model (a Hugging Face directory), or
  std::string checkpoint_path;  // --checkpoint (a training checkpoint file)
  int64_t checkpoint_step = -1;
  ModelConfig config;
  LoraConfig lora;              // the checkpoint's adapters (applied, not merged)
  FreqKVConfig freqkv;          // validated when enabled
  std::string freqkv_origin;    // where the defaults of the cache settings came from
  std::string device = "cpu";   // cpu | cuda
  std::string precision = "fp32";
  int64_t max_chunk_tokens = 1024;
  int tp = 1;                   // tensor-parallel ranks (the world: mpirun -np tp)

  std::string source() const;  // "model DIR" or "checkpoint PATH (step N)"
};

// Reads the options declared by add_inference_options. The cache settings not given default to
// the checkpoint's training config (freqkv.cache/sink/ratio), else to the model's
// max_position_embeddings, sink 4 and ratio 0.5. Throws UsageError for contradictory options.
InferenceSetup resolve_inference_setup(const ArgParser& p);

// The grid of an inference command: tp = --tp, and the world must be exactly tp ranks (the
// commands split the model, not the work). Collective over the world; needs an active
// MpiSession when started by mpirun. Throws UsageError naming --tp and mpirun -np when they
// differ.
std::unique_ptr<ParallelGrid> make_inference_grid(const InferenceSetup& setup);
// The grid's tp group when it has more than one rank, else nullptr (a single-rank model).
Communicator* inference_tp_group(const ParallelGrid& grid);

// The model with its weights loaded (a checkpoint's LoRA factors included, applied by the model),
// split over `tp` when given (every rank of it calls this together), without a gradient arena
// (LlamaModel::release_grads: inference never trains). Throws UsageError naming --tp when the
// model's heads, FFN columns or vocabulary do not divide by it.
template <typename T>
std::unique_ptr<LlamaModel<T>> load_inference_model(const InferenceSetup& setup,
                                                    Kernels<T>& kernels, Communicator* tp = nullptr);

// --tokenizer, else the model directory when it holds tokenizer.json; nullptr when neither.
std::unique_ptr<Tokenizer> load_inference_tokenizer(const ArgParser& p,
                                                    const InferenceSetup& setup);

// "FreqKV cache 4096, sink 4, ratio 0.5 (memory L = 2046, 2046 new tokens per compression)" or
// "full causal attention (FreqKV off)".
std::string describe_attention(const FreqKVConfig& freqkv);

#if defined(FREQKV_HAVE_CUDA)
// --device cuda: the CUDA backend on this rank's GPU and, under --tp N (N > 1), the tp group over
// NCCL ordered against the backend's stream (one GPU per rank: node-local rank modulo the visible
// devices, as `freqkv train` does). Collective over the world when tp > 1. Throws UsageError for
// --tp > 1 when freqkv was built without NCCL.
struct CudaInferenceBackend {
  std::unique_ptr<Kernels<bf16>> kernels;
  std::unique_ptr<ParallelGrid> nccl;  // tp > 1 only
  Communicator* tp() const { return nccl && nccl->tp().size() > 1 ? &nccl->tp() : nullptr; }
};
CudaInferenceBackend make_cuda_inference_backend(const InferenceSetup& setup);
#endif

// Calls run(kernels, tp) with the backend the setup names (CPU fp32/fp64, or CUDA bf16) and the
// tensor-parallel group to split the model over (nullptr: one rank) -- the grid's on the CPU,
// NCCL's on CUDA -- and returns what it returns; run is generic over Kernels<T>& (a template, or
// a lambda taking auto&).
template <typename Run>
int with_inference_backend(const InferenceSetup& setup, const ParallelGrid& grid, Run&& run) {
  if (setup.device == "cpu") {
    if (setup.precision == "fp64") {
      CpuKernels<double> kernels;
      return run(static_cast<Kernels<double>&>(kernels), inference_tp_group(grid));
    }
    CpuKernels<float> kernels;
    return run(static_cast<Kernels<float>&>(kernels), inference_tp_group(grid));
  }
#if defined(FREQKV_HAVE_CUDA)
  const CudaInferenceBackend backend = make_cuda_inference_backend(setup);
  return run(*backend.kernels, backend.tp());
#else
  throw std::invalid_argument("--device cuda, but this freqkv was built without the CUDA backend "
                              "(no nvcc at build time): rebuild with the CUDA toolkit, or use "
                              "--device cpu");
#endif
}

}  // namespace freqkv
