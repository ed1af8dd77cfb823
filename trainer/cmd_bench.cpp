// freqkv bench: the speed of one training step (forward + backward) of a model shape at given
// sequence lengths, FreqKV against full causal attention: tokens/s, model TFLOP/s, MFU and peak
// memory, as one table.
//
// FLOPs of a step (model FLOPs: what the step must compute, whatever the kernels do beyond it):
//   - GEMMs: 6 · N_gemm · tokens, N_gemm = every weight that multiplies activations (the layers'
//     q/k/v/o/gate/up/down projections and the LM head; the embedding lookup is a gather and the
//     norms are elementwise): 2 for the forward product, 4 for the two backward products.
//   - attention, per chunk of the FreqKV layout (full attention: one chunk of T queries and T
//     keys): 4 · pairs · head_dim · heads forward (q·k and p·v, a multiply-add each), twice that
//     backward, where pairs = the (query, key) pairs the causal mask lets through; with n_q
//     queries and n_kv keys, bottom-right aligned: n_q · (n_kv − n_q) + n_q · (n_q + 1) / 2.
//     Counting the masked half too (4 · n_q · n_kv · ...) would credit work that a causal kernel
//     skips and inflate full attention most.
//   - FreqKV compressions: per compression of n_src rows into n_dst over the 2 · kv_heads ·
//     head_dim key and value channels, 2 · n_dst · n_src · channels forward and the same for the
//     adjoint backward (the matrix is fixed: no weight gradient).
// Each summed over layers and sequences. RMSNorm, RoPE, SwiGLU and the softmax's exponentials are
// not counted (as in the usual 6N + attention accounting).
//
// Weights are random (a tiled N(0, 0.02) pattern, norms one: the values do not change the work),
// tokens uniform over the vocabulary.
#include <malloc.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#if defined(FREQKV_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif
#include "model/freqkv_schedule.h"
#include "model/hf_config.h"
#include "model/llama_model.h"
#include "trainer/cli_args.h"
#include "trainer/commands.h"
#include "trainer/human_units.h"

namespace freqkv {

namespace {

// ---- model shapes -----------------------------------------------------------------------------

ModelConfig llama_shape(int64_t vocab, int64_t hidden, int64_t intermediate, int64_t layers,
                        int64_t heads, int64_t kv_heads, int64_t max_positions, double rope_theta,
                        double rms_eps) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.max_position_embeddings = max_positions;
  c.rope_theta = rope_theta;
  c.rms_norm_eps = rms_eps;
  return c;
}

const char* const kShapeNames = "tinyllama-1.1b, llama2-7b, llama3-8b, tiny";

// The architectures of the published checkpoints' config.json files (TinyLlama-1.1B,
// Llama-2-7b-hf, Meta-Llama-3-8B) and the repository's tiny model (configs/models/tiny-llama).
ModelConfig builtin_shape(const std::string& name) {
  if (name == "tinyllama-1.1b") return llama_shape(32000, 2048, 5632, 22, 32, 4, 2048, 1e4, 1e-5);
  if (name == "llama2-7b") return llama_shape(32000, 4096, 11008, 32, 32, 32, 4096, 1e4, 1e-5);
  if (name == "llama3-8b") return llama_shape(128256, 4096, 14336, 32, 32, 8, 8192, 5e5, 1e-5);
  if (name == "tiny") return llama_shape(258, 64, 172, 2, 4, 2, 256, 1e4, 1e-5);
  throw UsageError("unknown --shape '" + name + "': choose one of " + kShapeNames +
                   ", or give --config config.json");
}

// ---- FLOPs --------------------------------------------------------------------------------------

int64_t gemm_parameters(const ModelConfig& c) {
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const int64_t per_layer = H * c.num_attention_heads * D        // q
                            + 2 * H * c.num_key_value_heads * D  // k, v
                            + c.num_attention_heads * D * H      // o
                            + 3 * H * I;                         // gate, up, down
  return per_layer * c.num_hidden_layers + c.vocab_size * H;  // + the LM head
}

struct StepFlops {
  double gemm = 0, attention = 0, compression = 0;
  double total() const { return gemm + attention + compression; }
};

StepFlops step_flops(const ModelConfig& c, const FreqKVSchedule& schedule, int64_t batch) {
  StepFlops f;
  const double sequences = static_cast<double>(batch);
  const double layers = static_cast<double>(c.num_hidden_layers);
  f.gemm = 6.0 * static_cast<double>(gemm_parameters(c)) * sequences *
           static_cast<double>(schedule.seq_len);
  double pairs = 0;
  for (const FreqKVChunk& chunk : schedule.chunks) {
    const double n_q = static_cast<double>(chunk.n_tokens);
    const double n_kv = static_cast<double>(chunk.kv_len);
    pairs += n_q * (n_kv - n_q) + n_q * (n_q + 1) / 2;
  }
  const double attention_forward =
      4.0 * pairs * static_cast<double>(c.head_dim * c.num_attention_heads);
  f.attention = 3.0 * attention_forward * layers * sequences;  // forward + 2x backward
  const double channels = 2.0 * static_cast<double>(c.num_key_value_heads * c.head_dim);
  for (const FreqKVCompression& s : schedule.compressions) {
    f.compression += 4.0 * static_cast<double>(s.n_dst) * static_cast<double>(s.n_src) *
                     channels * layers * sequences;
  }
  return f;
}

// ---- memory -------------------------------------------------------------------------------------

// Peak memory of one case. CPU: how far the resident set's high-water mark rose above the
// resident set at the start of the case (the process's own baseline -- libraries, BLAS buffers --
// left out), the mark restarted per case through /proc/self/clear_refs ("5", Linux 4.0+); where
// the kernel refuses that, the process-wide maximum from getrusage (which only grows from case to
// case). For the rise to be the case's own, memory freed by the case before must have left the
// resident set: glibc's malloc gets a fixed mmap threshold (its default raises the threshold to
// each freed block's size, after which buffers of that size come from the heap and stay resident
// when freed) and is trimmed before each case. CUDA: the backend's peak.
class MemoryProbe {
 public:
  virtual ~MemoryProbe() = default;
  virtual void reset() = 0;
  virtual double peak_bytes() = 0;
  virtual std::string label() const = 0;
};

class HostMemoryProbe final : public MemoryProbe {
 public:
  HostMemoryProbe() {
    // Blocks of 1 MiB and more are mapped on their own and unmapped when freed.
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    reset();  // learns whether per-case peaks work, for label()
  }
  void reset() override {
    malloc_trim(0);
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
    clear.flush();
    baseline_kib_ = read_status_kib("VmRSS:");
    per_case_ = static_cast<bool>(clear) && baseline_kib_ >= 0 && read_status_kib("VmHWM:") >= 0;
  }
  double peak_bytes() override {
    if (per_case_) {
      const double kib = read_status_kib("VmHWM:");
      if (kib >= 0) return std::max(0.0, kib - baseline_kib_) * 1024.0;
    }
    per_case_ = false;
    struct rusage usage {};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_maxrss) * 1024.0;  // Linux reports KiB
  }
  std::string label() const override {
    return per_case_ ? "the rise of the peak resident set over the case's start (VmHWM after "
                       "clear_refs, less VmRSS before)"
                     : "max RSS of the process so far (getrusage)";
  }

 private:
  // A "Key:   123 kB" line of /proc/self/status, in KiB; -1 when absent.
  static double read_status_kib(const char* key) {
    std::ifstream status("/proc/self/status");
    std::string line;
    const size_t length = std::strlen(key);
    while (std::getline(status, line)) {
      if (line.compare(0, length, key) == 0) return std::atof(line.c_str() + length);
    }
    return -1;
  }
  bool per_case_ = false;
  double baseline_kib_ = 0;
};

#if defined(FREQKV_HAVE_CUDA)
class DeviceMemoryProbe final : public MemoryProbe {
 public:
  explicit DeviceMemoryProbe(Kernels<bf16>& kernels) : kernels_(kernels) {}
  void reset() override { reset_cuda_peak_memory(kernels_); }
  double peak_bytes() override {
    const CudaMemoryStats stats = cuda_memory_stats(kernels_);
    return static_cast<double>(std::max(stats.pool_peak_bytes, stats.peak_allocated_bytes));
  }
  std::string label() const override {
    return "peak device memory of the backend (its memory pool's high-water mark: weights, "
           "gradients, activations, scratch)";
  }

 private:
  Kernels<bf16>& kernels_;
};
#endif

// ---- one case -----------------------------------------------------------------------------------

struct BenchOptions {
  ModelConfig config;
  std::string shape_name;
  std::vector<int64_t> lengths;
  FreqKVConfig freqkv;
  bool compare_full = false;
  bool recompute = false;  // activation recomputation (LlamaModel::set_recompute)
  int64_t batch = 1, warmup = 1, steps = 3;
  uint64_t seed = 1;
  std::optional<double> peak_tflops;
};

struct CaseResult {
  int64_t length = 0;
  bool freqkv = true;
  int64_t chunks = 0;
  double seconds_per_step = 0, tokens_per_second = 0;
  StepFlops flops;
  double peak_bytes = 0;
  std::string error;  // non-empty: the case failed (e.g. out of memory) and the others go on
};

// Weights: a pattern of random N(0, 0.02) values repeated over the arena (drawing a billion
// normals on the host would take longer than the benchmark), norm weights one.
template <typename T>
void fill_random_weights(LlamaModel<T>& model, Kernels<T>& kernels, uint64_t seed) {
  constexpr int64_t kPattern = int64_t{1} << 20;
  std::vector<float> pattern(static_cast<size_t>(kPattern));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (float& v : pattern) v = normal(rng);
  const int64_t n = model.arena_numel();
  for (int64_t offset = 0; offset < n; offset += kPattern) {
    kernels.upload(model.params() + offset, pattern.data(), std::min(kPattern, n - offset));
  }
  const ParamTable& table = model.param_table();
  for (size_t i = 0; i < table.size(); ++i) {
    if (!table[i].is_norm()) continue;
    const std::vector<float> ones(static_cast<size_t>(table[i].numel()), 1.0f);
    model.set_param(i, ones.data());
  }
}

template <typename T>
CaseResult run_case(const BenchOptions& o, Kernels<T>& kernels, MemoryProbe& memory,
                    int64_t length, bool use_freqkv) {
  CaseResult r;
  r.length = length;
  r.freqkv = use_freqkv;
  FreqKVConfig attention = o.freqkv;
  attention.enabled = use_freqkv;
  const FreqKVSchedule schedule = FreqKVSchedule::build(length, attention);
  r.chunks = static_cast<int64_t>(schedule.chunks.size());
  r.flops = step_flops(o.config, schedule, o.batch);
  try {
    kernels.synchronize();
    memory.reset();
    LlamaModel<T> model(o.config, attention, kernels);
    model.set_recompute(o.recompute);
    fill_random_weights(model, kernels, o.seed);
    std::mt19937_64 rng(o.seed + 1);
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(o.config.vocab_size - 1));
    std::vector<int32_t> inputs(static_cast<size_t>(o.batch * length)), targets(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      inputs[i] = token(rng);
      targets[i] = token(rng);
    }
    const double grad_scale = 1.0 / static_cast<double>(o.batch * length);
    const auto step = [&] {
      model.zero_grads();
      model.forward(inputs.data(), targets.data(), o.batch, length, grad_scale);
      model.backward();
    };
    for (int64_t i = 0; i < o.warmup; ++i) step();
    kernels.synchronize();
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < o.steps; ++i) step();
    kernels.synchronize();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.seconds_per_step = seconds / static_cast<double>(o.steps);
    r.tokens_per_second = static_cast<double>(o.batch * length) / r.seconds_per_step;
    r.peak_bytes = memory.peak_bytes();
  } catch (const std::exception& e) {
    r.error = e.what();
  }
  return r;
}

// ---- the table ----------------------------------------------------------------------------------

std::string format(const char* spec, double value) {
  char text[64];
  std::snprintf(text, sizeof text, spec, value);
  return text;
}

const std::vector<std::string> kHeader = {"length", "attention", "chunks",  "step s", "tokens/s",
                                          "TFLOP/step", "TFLOP/s", "MFU", "peak memory"};

std::vector<std::string> row_cells(const CaseResult& r, const std::optional<double>& peak) {
  std::vector<std::string> cells = {std::to_string(r.length), r.freqkv ? "freqkv" : "full",
                                    std::to_string(r.chunks)};
  if (!r.error.empty()) {
    cells.insert(cells.end(), {"-", "-", format("%.4g", r.flops.total() / 1e12), "-", "-",
                               "failed"});
    return cells;
  }
  const double tflops = r.flops.total() / r.seconds_per_step / 1e12;
  cells.push_back(format(r.seconds_per_step < 1 ? "%.4f" : "%.2f", r.seconds_per_step));
  cells.push_back(format("%.0f", r.tokens_per_second));
  cells.push_back(format("%.4g", r.flops.total() / 1e12));
  cells.push_back(format(tflops < 1 ? "%.4f" : "%.1f", tflops));
  cells.push_back(peak ? format("%.1f%%", 100.0 * tflops / *peak) : "n/a");
  cells.push_back(format_bytes(static_cast<int64_t>(r.peak_bytes)));
  return cells;
}

// Markdown table rows with fixed column widths, so a partial table (a run cut off by a time
// limit) reads as well as a whole one.
void print_row(const std::vector<std::string>& cells) {
  static const std::vector<size_t> widths = {7, 9, 6, 8, 9, 10, 8, 6, 12};
  std::string line = "|";
  for (size_t i = 0; i < cells.size(); ++i) {
    const size_t w = std::max(widths[i], cells[i].size());
    const bool left = i == 1;
    const std::string pad(w - cells[i].size(), ' ');
    line += " " + (left ? cells[i] + pad : pad + cells[i]) + " |";
  }
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

void print_separator() {
  std::vector<std::string> dashes;
  for (size_t w : {7, 9, 6, 8, 9, 10, 8, 6, 12}) dashes.push_back(std::string(w, '-'));
  print_row(dashes);
}

template <typename T>
int run_bench(const BenchOptions& o, Kernels<T>& kernels, MemoryProbe& memory) {
  const ModelConfig& c = o.config;
  const ParamTable table = llama_param_table(c);
  std::printf("freqkv bench: %s: %s parameters (%s in GEMMs), %lld layer%s, hidden %lld, heads "
              "%lld/%lld kv, head_dim %lld, vocab %lld\n",
              o.shape_name.c_str(), format_count(table.total_numel()).c_str(),
              format_count(gemm_parameters(c)).c_str(),
              static_cast<long long>(c.num_hidden_layers), c.num_hidden_layers == 1 ? "" : "s",
              static_cast<long long>(c.hidden_size),
              static_cast<long long>(c.num_attention_heads),
              static_cast<long long>(c.num_key_value_heads), static_cast<long long>(c.head_dim),
              static_cast<long long>(c.vocab_size));
  std::printf("freqkv bench: backend %s, batch %lld, %lld warm-up + %lld timed forward+backward "
              "steps per case; FreqKV cache %lld, sink %lld, ratio %g (kept %lld, step %lld)\n",
              kernels.name().c_str(), static_cast<long long>(o.batch),
              static_cast<long long>(o.warmup), static_cast<long long>(o.steps),
              static_cast<long long>(o.freqkv.cache), static_cast<long long>(o.freqkv.sink),
              o.freqkv.ratio, static_cast<long long>(o.freqkv.compressed()),
              static_cast<long long>(o.freqkv.step()));
  std::printf("freqkv bench: activation recomputation %s; MFU against %s (model FLOPs: a "
              "recomputed forward is not counted); memory: %s\n\n",
              o.recompute ? "on" : "off",
              o.peak_tflops ? format("%.0f TFLOP/s", *o.peak_tflops).c_str()
                            : "no peak (give --peak-tflops)",
              memory.label().c_str());
  // One small step first, so the first case does not pay for what a process sets up once (thread
  // pools, BLAS buffers, the cuBLAS workspace) in its time or its memory.
  BenchOptions warm_up = o;
  warm_up.config.num_hidden_layers = 1;
  warm_up.warmup = 0;
  warm_up.steps = 1;
  const CaseResult warmed = run_case(warm_up, kernels, memory, 64, /*use_freqkv=*/false);
  if (!warmed.error.empty()) {
    std::printf("freqkv bench: the warm-up step failed: %s\n", warmed.error.c_str());
    return 1;
  }

  print_row(kHeader);
  print_separator();

  std::vector<CaseResult> results;
  for (const int64_t length : o.lengths) {
    for (const bool use_freqkv : {true, false}) {
      if (!use_freqkv && !o.compare_full) continue;
      std::fprintf(stderr, "freqkv bench: length %lld, %s attention...\n",
                   static_cast<long long>(length), use_freqkv ? "FreqKV" : "full");
      results.push_back(run_case(o, kernels, memory, length, use_freqkv));
      print_row(row_cells(results.back(), o.peak_tflops));
    }
  }

  std::printf("\n");
  for (const CaseResult& r : results) {
    if (!r.error.empty()) {
      std::printf("length %lld, %s: failed: %s\n", static_cast<long long>(r.length),
                  r.freqkv ? "freqkv" : "full", r.error.c_str());
    }
  }
  for (size_t i = 0; i + 1 < results.size(); ++i) {
    const CaseResult& f = results[i];
    const CaseResult& full = results[i + 1];
    if (!f.freqkv || full.freqkv || f.length != full.length) continue;
    if (!f.error.empty() || !full.error.empty()) continue;
    std::printf("length %lld: FreqKV %.2fx the tokens/s of full attention, %.2fx its peak memory, "
                "%.2fx its FLOPs per step%s\n",
                static_cast<long long>(f.length), f.tokens_per_second / full.tokens_per_second,
                f.peak_bytes / full.peak_bytes, f.flops.total() / full.flops.total(),
                f.chunks == 1 ? " (length <= cache: FreqKV is full attention here)" : "");
  }
  for (const CaseResult& r : results) {
    if (r.freqkv && r.chunks == 1 && !o.compare_full) {
      std::printf("length %lld <= cache %lld: one chunk, FreqKV is full attention there\n",
                  static_cast<long long>(r.length), static_cast<long long>(o.freqkv.cache));
    }
  }
  std::printf("FLOPs per step: GEMMs 6 x %s parameters x tokens; attention over the unmasked "
              "(query, key) pairs of each chunk, 4 x pairs x head_dim x heads forward, x3 with "
              "the backward; compressions 4 x kept x compressed rows x 2 kv_heads x head_dim\n",
              format_count(gemm_parameters(c)).c_str());
  bool any_failed = false;
  for (const CaseResult& r : results) any_failed = any_failed || !r.error.empty();
  return any_failed ? 1 : 0;
}

}  // namespace

int run_bench(const std::vector<std::string>& args) {
  ArgParser p("bench", "Times training steps (forward + backward, random weights and tokens) of a "
                       "model shape at several sequence lengths: tokens/s, model TFLOP/s, MFU, "
                       "peak memory; FreqKV against full causal attention with --compare-full.");
  p.option("shape", "NAME", std::string("a built-in architecture: ") + kShapeNames, "tiny");
  p.option("config", "config.json", "a Hugging Face LLaMA config.json instead of --shape");
  p.option("layers", "N", "keep only the first N layers (to fit a long sequence in memory)");
  p.option("device", "cpu|cuda", "where to run: cpu (fp32) or cuda (bf16)", "cpu");
  p.option("gpu", "N", "CUDA device index", "0");
  p.option("lengths", "T1,T2,...", "sequence lengths, comma-separated", "8192");
  p.option("batch", "B", "sequences per step", "1");
  p.option("cache", "C", "FreqKV cache size", "4096");
  p.option("sink", "S", "FreqKV sink tokens", "4");
  p.option("ratio", "R", "FreqKV retained-frequency ratio", "0.5");
  p.flag("compare-full", "also time full causal attention at every length");
  p.flag("recompute", "activation recomputation per layer (the config's recompute: true)");
  p.option("warmup", "N", "untimed steps before timing", "1");
  p.option("steps", "N", "timed steps", "3");
  p.option("peak-tflops", "X", "the device's peak for MFU (default 989, H100 dense bf16, on cuda; "
                               "none on cpu)");
  p.option("seed", "N", "seed of the random weights and tokens", "1");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }

  BenchOptions o;
  if (p.given("config")) {
    if (p.given("shape")) throw UsageError("give --shape or --config, not both");
    o.config = read_hf_config(p.get("config"));
    o.shape_name = p.get("config");
  } else {
    o.config = builtin_shape(p.get("shape"));
    o.shape_name = p.get("shape");
  }
  if (p.given("layers")) {
    const int64_t layers = p.get_int("layers");
    if (layers < 1 || layers > o.config.num_hidden_layers) {
      throw UsageError("--layers " + std::to_string(layers) + " must be in 1.." +
                       std::to_string(o.config.num_hidden_layers) + " for " + o.shape_name);
    }
    o.config.num_hidden_layers = layers;
    o.shape_name += " (its first " + std::to_string(layers) + (layers == 1 ? " layer)" : " layers)");
  }
  o.config.validate();
  o.lengths = p.get_int_list("lengths", 1);
  o.freqkv.cache = p.get_int("cache");
  o.freqkv.sink = p.get_int("sink");
  o.freqkv.ratio = p.get_double("ratio");
  o.freqkv.validate();
  o.compare_full = p.flag_set("compare-full");
  o.recompute = p.flag_set("recompute");
  o.batch = p.get_int("batch");
  o.warmup = p.get_int("warmup");
  o.steps = p.get_int("steps");
  o.seed = static_cast<uint64_t>(p.get_int("seed"));
  if (o.batch < 1) throw UsageError("--batch must be >= 1");
  if (o.warmup < 0) throw UsageError("--warmup must be >= 0");
  if (o.steps < 1) throw UsageError("--steps must be >= 1");
  const std::string device = p.get("device");
  if (p.given("peak-tflops")) {
    o.peak_tflops = p.get_double("peak-tflops");
    if (!(*o.peak_tflops > 0)) throw UsageError("--peak-tflops must be > 0");
  } else if (device == "cuda") {
    o.peak_tflops = 989.0;
  }

  if (device == "cpu") {
    CpuKernels<float> kernels;
    HostMemoryProbe memory;
    return run_bench(o, kernels, memory);
  }
  if (device == "cuda") {
#if defined(FREQKV_HAVE_CUDA)
    const std::unique_ptr<Kernels<bf16>> kernels =
        make_cuda_kernels(static_cast<int>(p.get_int("gpu")));
    DeviceMemoryProbe memory(*kernels);
    return run_bench(o, *kernels, memory);
#else
    throw std::invalid_argument("--device cuda, but this freqkv was built without the CUDA "
                                "backend (no nvcc at build time)");
#endif
  }
  throw UsageError("--device '" + device + "': expected cpu or cuda");
}

}  // namespace freqkv
