// freqkv eval-loss: the mean next-token loss of a model over windows of a token file, and on
// request its gradient with respect to every parameter (a user's parity check against PyTorch).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "comm/mpi_communicator.h"
#include "comm/parallel_grid.h"
#include "data/token_file.h"
#include "kernels/cpu/cpu_kernels.h"
#if defined(FREQKV_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif
#include "model/hf_checkpoint.h"
#include "model/hf_config.h"
#include "trainer/cli_args.h"
#include "trainer/commands.h"

namespace freqkv {

namespace {

struct EvalLossOptions {
  std::string model_dir, tokens_path, grads_out;
  TokenDType token_dtype = TokenDType::U16;
  int64_t seq_len = 0, batch = 1, stride = 0, max_windows = 0;
  FreqKVConfig freqkv;
};

template <typename T>
int eval_loss(const EvalLossOptions& o, const ModelConfig& config, const TokenFile& tokens,
              ParallelGrid& grid, Kernels<T>& kernels) {
  ModelParallel parallel;
  if (grid.tp().size() > 1) parallel.tp = &grid.tp();
  if (grid.sp().size() > 1) parallel.sp = &grid.sp();
  LlamaModel<T> model(config, o.freqkv, kernels, LoraConfig(), parallel);
  load_hf_weights(model, SafetensorsReader::open_model_dir(o.model_dir));
  const bool main_rank = grid.world_rank() == 0;
  Communicator& dp = grid.dp();

  const int64_t T_len = o.seq_len, window = T_len + 1;
  int64_t windows = (tokens.size() - window) / o.stride + 1;
  if (o.max_windows > 0) windows = std::min(windows, o.max_windows);
  const bool want_grads = !o.grads_out.empty();
  const double grad_scale = want_grads ? 1.0 / static_cast<double>(windows * T_len) : 0.0;

  const FreqKVSchedule schedule = FreqKVSchedule::build(T_len, o.freqkv);
  const SequenceShard shard = model.sequence_shard(T_len);
  if (main_rank) std::fprintf(stderr,
               "freqkv eval-loss: %s, %lld parameters, backend %s; %lld windows of %lld tokens; "
               "attention: %s\n",
               o.model_dir.c_str(), static_cast<long long>(model.param_table().total_numel()),
               kernels.name().c_str(), static_cast<long long>(windows),
               static_cast<long long>(T_len),
               o.freqkv.enabled
                   ? ("FreqKV cache " + std::to_string(o.freqkv.cache) + " sink " +
                      std::to_string(o.freqkv.sink) + " kept " +
                      std::to_string(o.freqkv.compressed()) + " step " +
                      std::to_string(o.freqkv.step()) + ", " +
                      std::to_string(schedule.chunks.size()) + " chunk(s) per window")
                         .c_str()
                   : "full causal (FreqKV off)");

  if (want_grads) model.zero_grads();
  LossSum total;
  std::vector<int32_t> buffer(static_cast<size_t>(window)), inputs, targets;
  std::vector<int64_t> mine;  // data parallel: window w is evaluated by dp rank w % dp
  for (int64_t w = dp.rank(); w < windows; w += dp.size()) mine.push_back(w);
  const int64_t n = shard.tokens;  // sequence parallel: this rank's tokens of each window
  const auto start = std::chrono::steady_clock::now();
  for (size_t w0 = 0; w0 < mine.size(); w0 += static_cast<size_t>(o.batch)) {
    const int64_t batch = std::min<int64_t>(o.batch, static_cast<int64_t>(mine.size() - w0));
    inputs.resize(static_cast<size_t>(batch * n));
    targets.resize(static_cast<size_t>(batch * n));
    for (int64_t b = 0; b < batch; ++b) {
      tokens.read(mine[w0 + b] * o.stride, window, buffer.data());
      std::copy(buffer.begin() + shard.token_begin, buffer.begin() + shard.token_begin + n,
                inputs.begin() + b * n);
      std::copy(buffer.begin() + shard.token_begin + 1, buffer.begin() + shard.token_begin + n + 1,
                targets.begin() + b * n);
    }
    const LossSum s = model.forward(inputs.data(), targets.data(), batch, T_len, grad_scale);
    if (want_grads) model.backward();
    total.sum += s.sum;
    total.count += s.count;
  }
  for (Communicator* group : {&grid.sp(), &dp}) {
    total.sum = group->all_reduce_scalar(total.sum, ReduceOp::kSum);
    total.count = static_cast<int64_t>(
        group->all_reduce_scalar(static_cast<double>(total.count), ReduceOp::kSum));
    if (want_grads && group->size() > 1)
      group->all_reduce_sum(model.grads(), model.arena_numel());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double loss = total.sum / static_cast<double>(total.count);
  // Tensor-parallel shards are gathered by the ranks that hold them (sp and dp ranks hold copies).
  if (want_grads && grid.sp_rank() == 0 && grid.dp_rank() == 0)
    save_hf_gradients(model, o.grads_out, main_rank);
  if (!main_rank) return 0;
  if (want_grads) {
    std::fprintf(stderr, "freqkv eval-loss: gradients of the mean loss written to %s\n",
                 o.grads_out.c_str());
  }
  std::fprintf(stderr, "freqkv eval-loss: %.1f tokens/s\n",
               static_cast<double>(total.count) / std::max(seconds, 1e-9));
  nlohmann::json out = {{"loss", loss}, {"ppl", std::exp(loss)}, {"windows", windows},
                        {"tokens", total.count}};
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace

int run_eval_loss(const std::vector<std::string>& args) {
  ArgParser p("eval-loss",
              "Splits a flat token file into windows of seq-len+1 tokens, predicts the last seq-len "
              "tokens of each and prints one JSON line {\"loss\", \"ppl\", \"windows\", \"tokens\"}.");
  p.option("model", "DIR", "Hugging Face model directory (config.json + safetensors)", "", true);
  p.option("tokens", "FILE", "flat little-endian token file", "", true);
  p.option("token-dtype", "TYPE", "uint16, uint32 or int32", "uint16");
  p.option("seq-len", "T", "tokens predicted per window", "", true);
  p.option("batch", "B", "windows per forward pass", "1");
  p.option("stride", "K", "tokens between window starts", "seq-len + 1 (no overlap)");
  p.option("max-windows", "N", "evaluate at most N windows (0: all)", "0");
  p.option("cache", "C", "FreqKV cache size", "the model's max_position_embeddings");
  p.option("sink", "S", "FreqKV sink tokens kept uncompressed", "4");
  p.option("ratio", "R", "FreqKV share of the compressible span kept", "0.5");
  p.flag("no-freqkv", "plain causal attention over the whole window");
  p.option("device", "D", "cpu or cuda (one GPU, bf16)", "cpu");
  p.option("precision", "P", "fp32 or fp64 (CPU)", "fp32");
  p.option("tp", "N", "tensor-parallel ranks", "1");
  p.option("sp", "N", "sequence-parallel ranks (split each window's FreqKV chunks)", "1");
  p.option("dp", "N", "data-parallel ranks (split the windows)", "1");
  p.option("grads-out", "FILE", "write d(mean loss)/d(parameter) as F32 safetensors (HF names)");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }

  EvalLossOptions o;
  o.model_dir = p.get("model");
  o.tokens_path = p.get("tokens");
  o.grads_out = p.get("grads-out");
  o.token_dtype = parse_token_dtype(p.get("token-dtype"));
  o.seq_len = p.get_int("seq-len");
  o.batch = p.get_int("batch");
  o.stride = p.given("stride") ? p.get_int("stride") : o.seq_len + 1;
  o.max_windows = p.get_int("max-windows");
  if (o.seq_len < 1) throw UsageError("--seq-len must be >= 1");
  if (o.batch < 1) throw UsageError("--batch must be >= 1");
  if (o.stride < 1) throw UsageError("--stride must be >= 1");
  if (o.max_windows < 0) throw UsageError("--max-windows must be >= 0");

  const std::string config_path = (std::filesystem::path(o.model_dir) / "config.json").string();
  if (!std::filesystem::exists(config_path))
    throw std::runtime_error("no config.json in model directory " + o.model_dir);
  const ModelConfig config = read_hf_config(config_path);

  if (p.flag_set("no-freqkv")) {
    if (p.given("cache") || p.given("sink") || p.given("ratio"))
      throw UsageError("--no-freqkv turns FreqKV off: drop --cache/--sink/--ratio, or drop "
                       "--no-freqkv");
    o.freqkv.enabled = false;
  } else {
    o.freqkv.cache = p.given("cache") ? p.get_int("cache") : config.max_position_embeddings;
    o.freqkv.sink = p.get_int("sink");
    o.freqkv.ratio = p.get_double("ratio");
    o.freqkv.validate();
  }

  const TokenFile tokens = TokenFile::open(o.tokens_path, o.token_dtype);
  if (tokens.size() < o.seq_len + 1)
    throw std::runtime_error("token file " + o.tokens_path + " holds " +
                             std::to_string(tokens.size()) + " tokens, fewer than one window of " +
                             "seq-len + 1 = " + std::to_string(o.seq_len + 1) +
                             " (use a smaller --seq-len)");

  const std::string precision = p.get("precision");
  if (precision != "fp32" && precision != "fp64")
    throw UsageError("--precision must be fp32 or fp64, got '" + precision + "'");
  MpiSession mpi;
  const GridShape shape{static_cast<int>(p.get_int("tp")), static_cast<int>(p.get_int("sp")),
                        static_cast<int>(p.get_int("dp"))};
  if (shape.tp < 1 || shape.sp < 1 || shape.dp < 1) throw UsageError("--tp/--sp/--dp must be >= 1");
  const std::unique_ptr<ParallelGrid> grid = make_grid(shape);
  if (grid->world().size() > 1 && grid->world_rank() == 0)
    std::fprintf(stderr, "%s", grid->table().c_str());
  const std::string device = p.get("device");
  if (device == "cuda") {
#if defined(FREQKV_HAVE_CUDA)
    if (grid->world().size() > 1)
      throw UsageError("--device cuda evaluates on one GPU (one rank) in this version");
    const std::unique_ptr<Kernels<bf16>> kernels = make_cuda_kernels(0);
    return eval_loss<bf16>(o, config, tokens, *grid, *kernels);
#else
    throw UsageError("--device cuda, but this freqkv was built without the CUDA backend (no nvcc "
                     "at build time)");
#endif
  }
  if (device != "cpu") throw UsageError("--device must be cpu or cuda, got '" + device + "'");
  if (precision == "fp32") {
    CpuKernels<float> kernels;
    return eval_loss<float>(o, config, tokens, *grid, kernels);
  }
  CpuKernels<double> kernels;
  return eval_loss<double>(o, config, tokens, *grid, kernels);
}

}  // namespace freqkv
