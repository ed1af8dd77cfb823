#include "trainer/inference_setup.h"

#include <cstdio>
#include <filesystem>
#include <sstream>

#include "comm/mpi_communicator.h"
#if defined(FREQKV_HAVE_NCCL)
#include "comm/nccl_communicator.h"
#endif
#include "model/hf_checkpoint.h"
#include "model/hf_config.h"
#include "trainer/checkpoint_dir.h"
#include "trainer/model_checkpoint.h"
#include "trainer/train_config.h"

namespace freqkv {

void add_inference_options(ArgParser& p, bool with_tokenizer) {
  p.option("model", "DIR", "Hugging Face model directory (config.json + safetensors)");
  p.option("checkpoint", "PATH|DIR",
           "a training checkpoint file, or a checkpoint directory (its newest); LoRA adapters are "
           "applied as trained");
  if (with_tokenizer)
    p.option("tokenizer", "DIR|FILE|bytes",
             "a directory holding tokenizer.json, a tokenizer.json, or 'bytes' (the byte-level "
             "vocabulary)",
             "the model directory's tokenizer.json");
  p.option("cache", "C", "FreqKV cache size (rows attended over)",
           "the checkpoint's freqkv.cache, else the model's max_position_embeddings");
  p.option("sink", "S", "FreqKV sink tokens kept uncompressed", "the checkpoint's, else 4");
  p.option("ratio", "R", "FreqKV share of the compressible span kept",
           "the checkpoint's, else 0.5");
  p.flag("no-freqkv", "plain causal attention: the cache grows with the sequence (memory "
                      "unbounded)");
  p.option("device", "D", "cpu or cuda", "cpu");
  p.option("precision", "P", "fp32 or fp64 on the CPU; bf16 on CUDA",
           "fp32 (cpu), bf16 (cuda)");
  p.option("tp", "N", "tensor-parallel ranks: run under mpirun -np N; each rank holds 1/N of the "
                      "heads, FFN columns and vocabulary, and its heads' cache", "1");
  p.option("max-chunk", "N", "tokens per pass when reading a prompt or a window (bounds scratch "
                             "memory; the result does not depend on it)",
           "1024");
}

std::string InferenceSetup::source() const {
  if (!model_dir.empty()) return "model " + model_dir;
  return "checkpoint " + checkpoint_path + " (step " + std::to_string(checkpoint_step) + ")";
}

std::string describe_attention(const FreqKVConfig& f) {
  if (!f.enabled) return "full causal attention (FreqKV off)";
  std::ostringstream s;
  s << "FreqKV cache " << f.cache << ", sink " << f.sink << ", ratio " << f.ratio
    << " (memory L = " << f.compressed() << ", " << f.step() << " new tokens per compression)";
  return s.str();
}

InferenceSetup resolve_inference_setup(const ArgParser& p) {
  InferenceSetup setup;
  if (p.given("model") == p.given("checkpoint"))
    throw UsageError("give exactly one of --model DIR (Hugging Face directory) and --checkpoint "
                     "PATH (training checkpoint)");
  FreqKVConfig trained;  // the checkpoint's settings, when it has them
  bool have_trained = false;
  if (p.given("model")) {
    setup.model_dir = p.get("model");
    const std::string config_path = (std::filesystem::path(setup.model_dir) / "config.json").string();
    if (!std::filesystem::exists(config_path))
      throw std::runtime_error("no config.json in model directory " + setup.model_dir);
    setup.config = read_hf_config(config_path);
  } else {
    setup.checkpoint_path = p.get("checkpoint");
    if (std::filesystem::is_directory(setup.checkpoint_path))
      setup.checkpoint_path = CheckpointDir(setup.checkpoint_path).resolve("latest");
    const CheckpointReader reader = CheckpointReader::open(setup.checkpoint_path);
    setup.config = checkpoint_model_config(reader);
    setup.lora = checkpoint_lora_config(reader);
    setup.checkpoint_step = reader.int_attribute("step");
    try {
      trained = load_train_config_from_string(reader.string_attribute("config_yaml"), {},
                                              setup.checkpoint_path)
                    .freqkv;
      have_trained = true;
    } catch (const std::exception& e) {
      std::fprintf(stderr,
                   "freqkv: note: the training config in %s could not be read (%s); FreqKV "
                   "settings default to the model's context\n",
                   setup.checkpoint_path.c_str(), e.what());
    }
  }

  if (p.flag_set("no-freqkv")) {
    if (p.given("cache") || p.given("sink") || p.given("ratio"))
      throw UsageError("--no-freqkv turns FreqKV off: drop --cache/--sink/--ratio, or drop "
                       "--no-freqkv");
    setup.freqkv.enabled = false;
    setup.freqkv_origin = "--no-freqkv";
  } else {
    setup.freqkv.cache =
        p.given("cache") ? p.get_int("cache")
                         : (have_trained ? trained.cache : setup.config.max_position_embeddings);
    setup.freqkv.sink = p.given("sink") ? p.get_int("sink") : (have_trained ? trained.sink : 4);
    setup.freqkv.ratio =
        p.given("ratio") ? p.get_double("ratio") : (have_trained ? trained.ratio : 0.5);
    setup.freqkv_origin = have_trained ? "options, else the checkpoint's training config"
                                       : "options, else the model's context";
    setup.freqkv.validate();
  }

  setup.device = p.get("device");
  if (setup.device != "cpu" && setup.device != "cuda")
    throw UsageError("--device must be cpu or cuda, got '" + setup.device + "'");
  setup.precision = p.given("precision") ? p.get("precision")
                                         : (setup.device == "cpu" ? "fp32" : "bf16");
  if (setup.device == "cpu" && setup.precision != "fp32" && setup.precision != "fp64")
    throw UsageError("--precision on the CPU must be fp32 or fp64, got '" + setup.precision + "'");
  if (setup.device == "cuda" && setup.precision != "bf16")
    throw UsageError("--precision on CUDA must be bf16 (the CUDA backend's), got '" +
                     setup.precision + "'");
  setup.max_chunk_tokens = p.get_int("max-chunk");
  if (setup.max_chunk_tokens < 1) throw UsageError("--max-chunk must be >= 1");
  const int64_t tp = p.get_int("tp");
  if (tp < 1) throw UsageError("--tp must be >= 1, got " + std::to_string(tp));
  setup.tp = static_cast<int>(tp);
  return setup;
}

std::unique_ptr<ParallelGrid> make_inference_grid(const InferenceSetup& setup) {
  // Only a tp dimension: every rank holds a shard of the one model, none a copy of it.
  const int world = MpiSession::active() ? MpiSession::world_size() : 1;
  if (world != setup.tp)
    throw UsageError("--tp " + std::to_string(setup.tp) + " but " + std::to_string(world) +
                     " rank(s) were started: the inference commands split the model over all "
                     "ranks, so run with mpirun -np equal to --tp");
  return make_grid(GridShape{setup.tp, 1, 1});
}

Communicator* inference_tp_group(const ParallelGrid& grid) {
  return grid.tp().size() > 1 ? &grid.tp() : nullptr;
}

#if defined(FREQKV_HAVE_CUDA)
CudaInferenceBackend make_cuda_inference_backend(const InferenceSetup& setup) {
  CudaInferenceBackend backend;
  if (setup.tp == 1) {
    backend.kernels = make_cuda_kernels(0);
    return backend;
  }
#if defined(FREQKV_HAVE_NCCL)
  const int device = device_for_this_rank();
  backend.kernels = make_cuda_kernels(device);
  backend.nccl = make_nccl_grid(GridShape{setup.tp, 1, 1}, device,
                                cuda_kernels_stream(*backend.kernels));
  return backend;
#else
  throw UsageError("--tp " + std::to_string(setup.tp) + " with --device cuda needs NCCL, and this "
                   "freqkv was built without it (no nccl.h / libnccl at build time): rebuild "
                   "with NCCL, or use --device cpu under mpirun");
#endif
}
#endif

template <typename T>
std::unique_ptr<LlamaModel<T>> load_inference_model(const InferenceSetup& setup,
                                                    Kernels<T>& kernels, Communicator* tp) {
  ModelParallel parallel;
  parallel.tp = tp;
  std::unique_ptr<LlamaModel<T>> model;
  try {
    model = std::make_unique<LlamaModel<T>>(setup.config, setup.freqkv, kernels, setup.lora,
                                            parallel);
  } catch (const std::invalid_argument& e) {
    if (tp == nullptr) throw;
    throw UsageError(std::string(e.what()) + " (--tp " + std::to_string(tp->size()) + ")");
  }
  // Inference never trains: the gradient arena (as large as the weights) is not kept.
  model->release_grads();
  if (!setup.model_dir.empty())
    load_hf_weights(*model, SafetensorsReader::open_model_dir(setup.model_dir));
  else
    load_checkpoint_weights(CheckpointReader::open(setup.checkpoint_path), *model);
  return model;
}

std::unique_ptr<Tokenizer> load_inference_tokenizer(const ArgParser& p,
                                                    const InferenceSetup& setup) {
  if (p.given("tokenizer")) return load_tokenizer(p.get("tokenizer"));
  if (!setup.model_dir.empty() &&
      std::filesystem::exists(std::filesystem::path(setup.model_dir) / "tokenizer.json"))
    return load_tokenizer(setup.model_dir);
  return nullptr;
}

template std::unique_ptr<LlamaModel<float>> load_inference_model(const InferenceSetup&,
                                                                 Kernels<float>&, Communicator*);
template std::unique_ptr<LlamaModel<double>> load_inference_model(const InferenceSetup&,
                                                                  Kernels<double>&, Communicator*);
#if defined(FREQKV_HAVE_CUDA)
template std::unique_ptr<LlamaModel<bf16>> load_inference_model(const InferenceSetup&,
                                                                Kernels<bf16>&, Communicator*);
#endif

}  // namespace freqkv
