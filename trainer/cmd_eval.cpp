// freqkv eval: perplexity by window length (and by position within the window) with the FreqKV
// cache, optionally against full attention, by the authors' protocol or a sliding window.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "comm/mpi_communicator.h"
#include "data/token_file.h"
#include "trainer/inference/perplexity.h"
#include "trainer/inference/progress.h"
#include "trainer/commands.h"
#include "trainer/inference_setup.h"

namespace freqkv {

namespace {

struct EvalOptions {
  std::string tokens_path, json_path;
  TokenDType token_dtype = TokenDType::U16;
  std::vector<int64_t> lengths;
  PerplexityProtocol protocol = PerplexityProtocol::kFreqKV;
  int64_t stride = 256, max_windows = 0, buckets = 4;
  bool compare_full = false;
};

std::string format_ppl(double ppl) {
  if (std::isnan(ppl)) return "-";
  char text[32];
  std::snprintf(text, sizeof(text), ppl < 1e5 ? "%.4f" : "%.4g", ppl);
  return text;
}

nlohmann::json result_json(const PerplexityResult& r, int64_t buckets) {
  nlohmann::json bucket_list = nlohmann::json::array();
  for (int64_t b = 0; b < buckets; ++b) {
    const auto [first, last] = bucket_positions(b, r.seq_len, buckets);
    const double ppl = r.bucket_ppl(static_cast<size_t>(b));
    bucket_list.push_back({{"positions", {first, last}},
                           {"tokens", r.bucket_tokens[b]},
                           {"loss", r.bucket_tokens[b] > 0 ? nlohmann::json(std::log(ppl))
                                                           : nlohmann::json(nullptr)},
                           {"ppl", r.bucket_tokens[b] > 0 ? nlohmann::json(ppl)
                                                          : nlohmann::json(nullptr)}});
  }
  return {{"loss", r.mean_window_loss},
          {"ppl", r.ppl()},
          {"windows", r.windows},
          {"tokens", r.tokens},
          {"seconds", r.seconds},
          {"compressions_per_window", r.compressions_per_window},
          {"peak_cache_rows", r.peak_cache_rows},
          {"buckets", bucket_list}};
}

// Under --tp every rank scores every window with its shard of the model (the losses are the
// same on all ranks); only world rank 0 prints and writes the JSON.
template <typename T>
int eval_with(const InferenceSetup& setup, const EvalOptions& o, const TokenFile& tokens,
              const std::vector<PerplexityPlan>& plans, const ParallelGrid& grid,
              Kernels<T>& kernels, Communicator* tp) {
  const bool main_rank = grid.world_rank() == 0;
  const std::unique_ptr<LlamaModel<T>> model =
      load_inference_model(setup, kernels, tp);
  struct Mode {
    std::string name;
    FreqKVConfig attention;
  };
  std::vector<Mode> modes;
  if (setup.freqkv.enabled) modes.push_back({"FreqKV", setup.freqkv});
  if (!setup.freqkv.enabled || o.compare_full) {
    FreqKVConfig full;
    full.enabled = false;
    modes.push_back({"full", full});
  }
  if (main_rank)
    std::fprintf(stderr,
                 "freqkv eval: %s, %lld parameters, backend %s%s; %s%s; protocol %s, stride %lld\n",
                 setup.source().c_str(), static_cast<long long>(model->param_table().total_numel()),
                 kernels.name().c_str(),
                 setup.tp > 1 ? (", tensor parallel over " + std::to_string(setup.tp) + " ranks")
                                    .c_str()
                              : "",
                 describe_attention(setup.freqkv).c_str(),
                 setup.freqkv.enabled && o.compare_full ? ", and full attention" : "",
                 perplexity_protocol_name(o.protocol), static_cast<long long>(o.stride));

  const TokenReader read = [&tokens](int64_t start, int64_t count, int32_t* out) {
    tokens.read(start, count, out);
  };
  int64_t total_work = 0;  // token passes, for the progress line
  for (const PerplexityPlan& plan : plans)
    total_work += static_cast<int64_t>(plan.window_starts.size()) * (plan.seq_len - 1) *
                  static_cast<int64_t>(modes.size());
  ProgressLine progress("freqkv eval", total_work);
  int64_t work_done = 0;
  std::vector<std::vector<PerplexityResult>> results(plans.size());  // [length][mode]
  for (const Mode& mode : modes) {
    FreqKVDecoder<T> decoder(*model, mode.attention, setup.max_chunk_tokens);
    for (size_t i = 0; i < plans.size(); ++i) {
      const PerplexityPlan& plan = plans[i];
      const int64_t windows = static_cast<int64_t>(plan.window_starts.size());
      const int64_t before = work_done;
      results[i].push_back(evaluate_perplexity(
          decoder, read, plan, o.buckets, [&](int64_t done) {
            work_done = before + done * (plan.seq_len - 1);
            if (main_rank)
              progress.update(work_done, "length " + std::to_string(plan.seq_len) + " " + mode.name +
                                           " window " + std::to_string(done) + "/" +
                                           std::to_string(windows));
          }));
    }
  }
  if (!main_rank) return 0;
  progress.finish();

  // The table of perplexity by length.
  const bool sliding = o.protocol == PerplexityProtocol::kSliding;
  std::printf("perplexity, %s protocol: windows of T tokens every %lld tokens, %s; PPL = exp(mean "
              "window loss)\n",
              perplexity_protocol_name(o.protocol), static_cast<long long>(o.stride),
              sliding ? ("each scored on its last " + std::to_string(o.stride) + " predictions")
                            .c_str()
                      : "each scored on all its T-1 predictions");
  std::printf("attention: %s\n\n", describe_attention(setup.freqkv).c_str());
  std::printf("%8s %8s %10s", "length", "windows", "tokens");
  for (const Mode& mode : modes) std::printf(" %12s", ("PPL " + mode.name).c_str());
  if (setup.freqkv.enabled) std::printf(" %13s %10s", "compressions", "peak rows");
  std::printf(" %10s\n", "seconds");
  for (size_t i = 0; i < plans.size(); ++i) {
    const PerplexityResult& first = results[i][0];
    std::printf("%8lld %8lld %10lld", static_cast<long long>(first.seq_len),
                static_cast<long long>(first.windows), static_cast<long long>(first.tokens));
    double seconds = 0;
    for (const PerplexityResult& r : results[i]) {
      std::printf(" %12s", format_ppl(r.ppl()).c_str());
      seconds += r.seconds;
    }
    if (setup.freqkv.enabled)
      std::printf(" %13lld %10lld", static_cast<long long>(first.compressions_per_window),
                  static_cast<long long>(first.peak_cache_rows));
    std::printf(" %10.1f\n", seconds);
  }

  // Perplexity by position: does the far context help?
  std::printf("\nPPL by position in the window (%lld equal buckets of the predicted positions; "
              "bucket b of length T holds positions [ceil(b(T-1)/%lld), ceil((b+1)(T-1)/%lld)))\n\n",
              static_cast<long long>(o.buckets), static_cast<long long>(o.buckets),
              static_cast<long long>(o.buckets));
  std::printf("%8s %8s", "length", "mode");
  for (int64_t b = 0; b < o.buckets; ++b) {
    char label[32];
    std::snprintf(label, sizeof(label), "%.0f-%.0f%%", 100.0 * b / o.buckets,
                  100.0 * (b + 1) / o.buckets);
    std::printf(" %10s", label);
  }
  std::printf("\n");
  for (size_t i = 0; i < plans.size(); ++i)
    for (size_t m = 0; m < modes.size(); ++m) {
      const PerplexityResult& r = results[i][m];
      std::printf("%8lld %8s", static_cast<long long>(r.seq_len), modes[m].name.c_str());
      for (int64_t b = 0; b < o.buckets; ++b)
        std::printf(" %10s", format_ppl(r.bucket_ppl(static_cast<size_t>(b))).c_str());
      std::printf("\n");
    }
  if (sliding)
    std::printf("(sliding protocol: only the last %lld positions of each window are scored; "
                "buckets before them show -)\n",
                static_cast<long long>(o.stride));

  if (!o.json_path.empty()) {
    nlohmann::json lengths = nlohmann::json::array();
    for (size_t i = 0; i < plans.size(); ++i) {
      nlohmann::json entry = {{"seq_len", plans[i].seq_len},
                              {"windows_in_file", plans[i].windows_in_file},
                              {"first_scored_position", plans[i].first_scored}};
      for (size_t m = 0; m < modes.size(); ++m)
        entry[m == 0 && setup.freqkv.enabled ? "freqkv" : "full"] =
            result_json(results[i][m], o.buckets);
      lengths.push_back(entry);
    }
    nlohmann::json attention = {{"enabled", setup.freqkv.enabled}};
    if (setup.freqkv.enabled)
      attention.update({{"cache", setup.freqkv.cache},
                        {"sink", setup.freqkv.sink},
                        {"ratio", setup.freqkv.ratio},
                        {"compressed", setup.freqkv.compressed()},
                        {"step", setup.freqkv.step()}});
    const nlohmann::json out = {{"source", setup.source()},
                                {"tokens_file", o.tokens_path},
                                {"backend", kernels.name()},
                                {"protocol", perplexity_protocol_name(o.protocol)},
                                {"stride", o.stride},
                                {"buckets", o.buckets},
                                {"freqkv", attention},
                                {"lengths", lengths}};
    std::ofstream file(o.json_path);
    if (!(file << out.dump(2) << "\n"))
      throw std::runtime_error("cannot write the results to " + o.json_path);
    std::fprintf(stderr, "freqkv eval: results written to %s\n", o.json_path.c_str());
  }
  return 0;
}

}  // namespace

int run_eval(const std::vector<std::string>& args) {
  ArgParser p("eval",
              "Perplexity of a model on a token file for several window lengths, with the FreqKV "
              "cache (and with --compare-full also full attention), overall and by position in "
              "the window. Protocols: freqkv (the authors': windows every --stride tokens, each "
              "scored on all its predictions) or sliding (each window scored on its last --stride "
              "predictions).");
  add_inference_options(p, false);
  p.option("tokens", "FILE", "flat little-endian token file", "", true);
  p.option("token-dtype", "TYPE", "uint16, uint32 or int32", "uint16");
  p.option("lengths", "T1,T2,...", "window lengths in tokens, e.g. 2048,4096,8192", "", true);
  p.option("protocol", "NAME", "freqkv or sliding", "freqkv");
  p.option("stride", "K", "tokens between window starts (sliding: also tokens scored per window)",
           "256");
  p.option("max-windows", "N", "at most N windows per length, spread evenly over the file (0: all)",
           "0");
  p.option("buckets", "B", "report PPL in B equal slices of the window positions", "4");
  p.flag("compare-full", "also evaluate full causal attention (no compression) on the same "
                         "windows");
  p.option("json", "FILE", "also write every result (and the per-bucket numbers) as JSON");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  const InferenceSetup setup = resolve_inference_setup(p);
  EvalOptions o;
  o.tokens_path = p.get("tokens");
  o.json_path = p.get("json");
  o.token_dtype = parse_token_dtype(p.get("token-dtype"));
  o.lengths = p.get_int_list("lengths", 2);
  o.protocol = parse_perplexity_protocol(p.get("protocol"));
  o.stride = p.get_int("stride");
  o.max_windows = p.get_int("max-windows");
  o.buckets = p.get_int("buckets");
  o.compare_full = p.flag_set("compare-full");
  if (o.compare_full && !setup.freqkv.enabled)
    throw UsageError("--compare-full compares FreqKV with full attention: drop --no-freqkv");
  if (o.buckets < 1) throw UsageError("--buckets must be >= 1");

  const TokenFile tokens = TokenFile::open(o.tokens_path, o.token_dtype);
  std::vector<PerplexityPlan> plans;
  for (int64_t length : o.lengths) {
    try {
      plans.push_back(plan_perplexity(o.protocol, tokens.size(), length, o.stride, o.max_windows));
    } catch (const std::invalid_argument& e) {
      throw UsageError(std::string(e.what()) + " (token file " + o.tokens_path + ")");
    }
    if (o.buckets > length - 1)
      throw UsageError("--buckets " + std::to_string(o.buckets) + " exceeds the " +
                       std::to_string(length - 1) + " predictions of a window of length " +
                       std::to_string(length));
  }
  MpiSession mpi;
  const std::unique_ptr<ParallelGrid> grid = make_inference_grid(setup);
  return with_inference_backend(setup, *grid, [&](auto& kernels, Communicator* tp) {
    return eval_with(setup, o, tokens, plans, *grid, kernels, tp);
  });
}

}  // namespace freqkv
