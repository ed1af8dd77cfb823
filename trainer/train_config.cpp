#include "trainer/train_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace freqkv {

namespace {

// Every known key with its default and a comment. Layout rules (the comment extraction and the
// resolved-config emitter rely on them): two spaces of indentation per level; every key line ends
// with "  # comment"; sections are maps, values are scalars or flow lists; no '#' inside values.
// Numbers are written so that YAML 1.1 readers (PyYAML) also see numbers (2.0e-5, not 2e-5).
constexpr const char* kDefaultConfigYaml =
    R"yaml(# freqkv training configuration: every key, its default and what it means.
# A config file sets any subset of these keys; `--set key.path=value` overrides after the file.
model:  # the model to fine-tune: set exactly one of path and init_config
  path: ""  # Hugging Face LLaMA directory (config.json + safetensors) to import
  init_config: ""  # a config.json to initialise a model randomly from instead (tiny runs)
  init_seed: 1234  # seed of the random initialisation (init_config only)
  init_std: 0.02  # standard deviation of the random initial weights (init_config only)
device: cpu  # where the model runs: cpu | cuda
precision: fp32  # parameter and activation type: fp32 | fp64 on cpu; bf16 on cuda
recompute: false  # activation recomputation: keep each layer's input only, replay the layer in backward
freqkv:  # FreqKV attention (../shared/docs/FREQKV.md)
  enabled: true  # false: plain causal attention over the whole sequence
  cache: 4096  # C: rows attended at most (sink + memory + recent); the pretrained context
  sink: 4  # S: first tokens never compressed
  ratio: 0.5  # r in (0, 1]: share of the compressible span C - S kept by each compression
  compression: auto  # on cuda: gemm (matrix P) | fft (cuFFT DCTs) | auto (fft from N = 1024)
data:  # training data: flat token files as `freqkv tokenize` writes them
  train: []  # training token files (required), e.g. [shard0.bin, shard1.bin]
  token_dtype: uint16  # element type of the token files: uint16 | uint32 | int32
  seq_len: 8192  # tokens predicted per sequence (a sampled window holds seq_len + 1 tokens)
  batch_size: 1  # sequences per micro-batch, over all dp ranks (each runs batch_size / dp)
  grad_accum: 1  # micro-batches accumulated per optimizer step
  seed: 1234  # sampling seed: step s reads windows that depend only on (seed, s)
  eos_token: -1  # id of the EOS token joining documents in the files; -1 = none
  validation:  # held-out loss, on fixed windows
    files: []  # validation token files; when empty, `fraction` of every train shard is held out
    fraction: 0.0  # tail share of each train shard held out for validation, in [0, 1)
    every: 0  # optimizer steps between validations; 0 = never
    batches: 4  # micro-batches of batch_size windows per validation (the same every time)
optimizer:  # AdamW
  lr: 2.0e-5  # peak learning rate
  beta1: 0.9  # first-moment decay, in [0, 1)
  beta2: 0.999  # second-moment decay, in [0, 1)
  eps: 1.0e-8  # added to the root of the second moment
  weight_decay: 0.0  # decoupled weight decay (AdamW)
  grad_clip: 1.0  # clip the global gradient norm to this; 0 = off
schedule:  # learning-rate schedule over optimizer steps, counted from 1
  steps: 1000  # optimizer steps of the run
  warmup_steps: 20  # linear warm-up from lr / warmup_steps to lr; 0 = none
  kind: constant  # after the warm-up: constant | cosine | linear
  min_lr_ratio: 0.0  # cosine/linear decay ends at min_lr_ratio * lr at step `steps`; in [0, 1]
lora:  # low-rank adapters (LongLoRA-style: adapters plus fully trained embeddings and norms)
  enabled: true  # false: every parameter is trained in full
  rank: 8  # adapter rank r
  alpha: 16  # adapter scale: the update is multiplied by alpha / rank
  dropout: 0.0  # dropout on the adapter input; only 0 is supported
  targets: [q_proj, k_proj, v_proj, o_proj]  # adapted layers: [qkvo]_proj, gate/up/down_proj
  trainable: [embed_tokens, norm]  # parameters whose name contains one of these train in full
checkpoint:  # training state saved to resume from
  dir: checkpoints  # checkpoint directory; relative paths are inside logging.run_dir
  every: 100  # optimizer steps between checkpoints; 0 = only at the end
  keep_last: 3  # periodic checkpoints kept (older ones are deleted); 0 = keep all
  resume: ""  # "" = start fresh; latest = the newest checkpoint in dir; or a checkpoint path
logging:  # metrics
  every: 1  # optimizer steps between metric lines
  metrics_file: metrics.jsonl  # one JSON line per logged step; relative paths are inside run_dir
  run_dir: runs/default  # the run's directory
parallel:  # the tp x sp x dp rank grid (docs/ARCHITECTURE.md)
  tp: 1  # tensor parallel ranks: split heads and FFN columns
  sp: 1  # sequence parallel ranks: split the FreqKV chunks of a sequence
  dp: 1  # data parallel ranks: split the sequences of a step
  zero1: true  # ZeRO-1: shard AdamW state and fp32 master weights across the dp ranks
  overlap_grad_reduce: true  # sum each layer's gradients over sp x dp while the backward goes on
)yaml";

const std::vector<std::string> kLoraTargets = {"q_proj",    "k_proj", "v_proj",   "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};

std::string join_path(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string joined;
  for (size_t i = 0; i < items.size(); ++i) joined += (i ? separator : "") + items[i];
  return joined;
}

std::string source_at(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1);
}

// A value as the user wrote it, for messages.
std::string describe(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "(empty)";
  if (node.IsScalar()) return "'" + node.Scalar() + "'";
  YAML::Emitter out;
  out << YAML::Flow << node;
  return out.c_str();
}

std::string quote_yaml(const std::string& text) {
  YAML::Emitter out;
  out << YAML::DoubleQuoted << text;
  return out.c_str();
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1] ? 1 : 0)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::vector<std::string> map_keys(const YAML::Node& section) {
  std::vector<std::string> keys;
  for (const auto& entry : section) keys.push_back(entry.first.Scalar());
  return keys;
}

// The value of key in a map node, without inserting it (yaml-cpp's non-const operator[] would).
YAML::Node find_key(const YAML::Node& section, const std::string& key) {
  for (const auto& entry : section) {
    if (entry.first.Scalar() == key) return entry.second;
  }
  return YAML::Node(YAML::NodeType::Undefined);
}

[[noreturn]] void unknown_key(const YAML::Node& section, const std::string& prefix,
                              const std::string& key, const std::string& where) {
  const std::vector<std::string> valid = map_keys(section);
  std::string message = "unknown config key '" + join_path(prefix, key) + "' (" + where + "); " +
                        (prefix.empty() ? "valid top-level keys: "
                                        : "valid keys of section '" + prefix + "': ") +
                        join(valid, ", ");
  for (const std::string& candidate : valid) {
    if (edit_distance(candidate, key) <= 2) {
      message += "; did you mean '" + join_path(prefix, candidate) + "'?";
      break;
    }
  }
  throw std::invalid_argument(message);
}

// Where each leaf's value came from ("defaults", "file.yaml:12", "--set a.b=c"), for messages.
using Origins = std::map<std::string, std::string>;

void record_origins(const YAML::Node& defaults_node, const std::string& path,
                    const std::string& where, Origins& origins) {
  if (defaults_node.IsMap()) {
    for (const auto& entry : defaults_node) {
      record_origins(entry.second, join_path(path, entry.first.Scalar()), where, origins);
    }
  } else {
    origins[path] = where;
  }
}

// Sets target[key] (a leaf or, recursively, a section of the defaults) from value.
void merge_value(YAML::Node target_section, const std::string& key, const YAML::Node& value,
                 const std::string& path, const std::string& where, const std::string& source,
                 Origins& origins);

// Merges the keys of overrides into section (a map of the defaults' shape), rejecting keys the
// defaults do not have.
void merge_section(YAML::Node section, const YAML::Node& overrides, const std::string& prefix,
                   const std::string& source, Origins& origins) {
  std::set<std::string> seen;
  for (const auto& entry : overrides) {
    const YAML::Node& key_node = entry.first;
    const std::string where = source_at(source, key_node.Mark());
    if (!key_node.IsScalar()) {
      throw std::invalid_argument("config (" + where + "): a key of section '" +
                                  (prefix.empty() ? std::string("(top level)") : prefix) +
                                  "' is not a plain name: " + describe(key_node));
    }
    const std::string key = key_node.Scalar();
    if (!seen.insert(key).second) {
      throw std::invalid_argument("config key '" + join_path(prefix, key) + "' is set twice (" +
                                  where + ")");
    }
    if (!find_key(section, key).IsDefined()) unknown_key(section, prefix, key, where);
    merge_value(section, key, entry.second, join_path(prefix, key), where, source, origins);
  }
}

void merge_value(YAML::Node target_section, const std::string& key, const YAML::Node& value,
                 const std::string& path, const std::string& where, const std::string& source,
                 Origins& origins) {
  YAML::Node target = find_key(target_section, key);
  if (target.IsMap()) {
    // A section: an empty value (every key commented out) changes nothing.
    if (value.IsNull()) return;
    if (!value.IsMap()) {
      throw std::invalid_argument("config key '" + path + "' (" + where +
                                  ") is a section with keys " + join(map_keys(target), ", ") +
                                  "; got the value " + describe(value));
    }
    merge_section(target, value, path, source, origins);
    return;
  }
  if (value.IsMap()) {
    throw std::invalid_argument("config key '" + path + "' (" + where +
                                ") takes a value, not a section of keys; got " + describe(value));
  }
  target_section[key] = YAML::Clone(value);
  origins[path] = where;
}

YAML::Node parse_yaml(const std::string& text, const std::string& source) {
  try {
    return YAML::Load(text);
  } catch (const YAML::ParserException& error) {
    throw std::invalid_argument("config " + source_at(source, error.mark) +
                                ": YAML syntax error: " + error.msg);
  }
}

// Applies "key.path=value".
void apply_override(YAML::Node root, const std::string& override_text, Origins& origins) {
  const std::string where = "--set " + override_text;
  const size_t equals = override_text.find('=');
  if (equals == std::string::npos) {
    throw std::invalid_argument("malformed override '" + override_text +
                                "': expected key.path=value, e.g. optimizer.lr=3e-4");
  }
  const std::string key_path = override_text.substr(0, equals);
  const std::string value_text = override_text.substr(equals + 1);
  std::vector<std::string> keys;
  std::stringstream segments(key_path);
  for (std::string segment; std::getline(segments, segment, '.');) keys.push_back(segment);
  if (key_path.empty() || key_path.back() == '.' ||
      std::any_of(keys.begin(), keys.end(), [](const std::string& k) { return k.empty(); })) {
    throw std::invalid_argument("malformed override '" + override_text +
                                "': the key path must be names joined by dots, e.g. "
                                "optimizer.lr=3e-4");
  }
  // An empty value is the empty string (e.g. checkpoint.resume=), not YAML's null.
  const YAML::Node value = value_text.empty() ? YAML::Node(std::string())
                                              : parse_yaml(value_text, where);

  YAML::Node section = root;  // a handle: rebound with reset(), since operator= would overwrite
  std::string prefix;
  for (size_t i = 0; i + 1 < keys.size(); ++i) {
    const YAML::Node next = find_key(section, keys[i]);
    if (!next.IsDefined()) unknown_key(section, prefix, keys[i], where);
    prefix = join_path(prefix, keys[i]);
    if (!next.IsMap()) {
      throw std::invalid_argument("config key '" + prefix + "' (" + where +
                                  ") is a value, not a section, so '" + key_path +
                                  "' does not exist");
    }
    section.reset(next);
  }
  if (!find_key(section, keys.back()).IsDefined()) {
    unknown_key(section, prefix, keys.back(), where);
  }
  merge_value(section, keys.back(), value, key_path, where, where, origins);
}

// The "# comment" of every key line of the defaults, by key path.
std::map<std::string, std::string> default_comments() {
  std::map<std::string, std::string> comments;
  std::vector<std::string> path;
  std::istringstream lines(kDefaultConfigYaml);
  for (std::string line; std::getline(lines, line);) {
    const size_t indent = line.find_first_not_of(' ');
    if (indent == std::string::npos || line[indent] == '#') continue;
    const size_t colon = line.find(':');
    const size_t hash = line.find("  # ");
    if (indent % 2 != 0 || colon == std::string::npos || hash == std::string::npos) {
      throw std::logic_error("embedded config defaults: malformed line '" + line + "'");
    }
    path.resize(indent / 2);
    path.push_back(line.substr(indent, colon - indent));
    comments[join(path, ".")] = line.substr(hash + 4);
  }
  return comments;
}

// Reads typed leaves out of the merged tree, checking each, and keeps its canonical YAML text
// for the resolved config.
class ConfigReader {
 public:
  ConfigReader(YAML::Node root, Origins origins)
      : root_(std::move(root)), origins_(std::move(origins)) {}

  [[noreturn]] void fail(const std::string& path, const std::string& problem) const {
    const auto origin = origins_.find(path);
    throw std::invalid_argument("config key '" + path + "' = " + describe(node(path)) + " (" +
                                (origin == origins_.end() ? "defaults" : origin->second) +
                                "): " + problem);
  }

  std::string string(const std::string& path) {
    const YAML::Node value = node(path);
    std::string text;
    if (value.IsScalar()) {
      text = value.Scalar();
    } else if (!value.IsNull()) {  // null (`key:` with nothing after it) reads as ""
      fail(path, "expected a string");
    }
    canonical_[path] = quote_yaml(text);
    return text;
  }

  std::string non_empty_string(const std::string& path) {
    std::string text = string(path);
    if (text.empty()) fail(path, "must not be empty");
    return text;
  }

  std::string choice(const std::string& path, const std::vector<std::string>& options) {
    const std::string text = string(path);
    if (std::find(options.begin(), options.end(), text) == options.end()) {
      fail(path, "expected one of " + join(options, " | "));
    }
    canonical_[path] = text;
    return text;
  }

  int64_t integer(const std::string& path, int64_t minimum) {
    const std::string text = scalar(path, "an integer");
    // Decimal digits after an optional sign: "1e3", "0x10" and "1.0" are not integers here.
    const size_t digits_begin = !text.empty() && (text[0] == '+' || text[0] == '-') ? 1 : 0;
    const bool well_formed =
        text.size() > digits_begin &&
        text.find_first_not_of("0123456789", digits_begin) == std::string::npos;
    errno = 0;
    char* end = nullptr;
    const long long value = well_formed ? std::strtoll(text.c_str(), &end, 10) : 0;
    if (!well_formed || errno == ERANGE || *end != '\0') fail(path, "expected an integer");
    if (value < minimum) fail(path, "must be >= " + std::to_string(minimum));
    canonical_[path] = std::to_string(value);
    return value;
  }

  int64_t positive_integer(const std::string& path) { return integer(path, 1); }

  // A finite decimal number (hex floats, inf and nan are refused: they are never meant here).
  double number(const std::string& path) {
    const std::string text = scalar(path, "a number");
    const bool well_formed = text.find_first_not_of("+-.0123456789eE") == std::string::npos &&
                             text.find_first_of("0123456789") != std::string::npos;
    errno = 0;
    char* end = nullptr;
    const double value = well_formed ? std::strtod(text.c_str(), &end) : 0.0;
    if (!well_formed || errno == ERANGE || *end != '\0' || !std::isfinite(value)) {
      fail(path, "expected a number");
    }
    // The text as written reads back as the same double, and keeps its readable form.
    canonical_[path] = text;
    return value;
  }

  double number_in(const std::string& path, double low, bool low_open, double high,
                   bool high_open) {
    const double value = number(path);
    const bool above = low_open ? value > low : value >= low;
    const bool below = high_open ? value < high : value <= high;
    if (!above || !below) {
      std::ostringstream range;
      range << "must be in " << (low_open ? "(" : "[") << low << ", " << high
            << (high_open ? ")" : "]");
      fail(path, range.str());
    }
    return value;
  }

  double positive_number(const std::string& path) {
    const double value = number(path);
    if (!(value > 0.0)) fail(path, "must be positive");
    return value;
  }

  double non_negative_number(const std::string& path) {
    const double value = number(path);
    if (value < 0.0) fail(path, "must be >= 0");
    return value;
  }

  bool boolean(const std::string& path) {
    scalar(path, "true or false");
    bool value = false;
    if (!YAML::convert<bool>::decode(node(path), value)) fail(path, "expected true or false");
    canonical_[path] = value ? "true" : "false";
    return value;
  }

  // A flow or block list of strings; an empty value is the empty list.
  std::vector<std::string> string_list(const std::string& path) {
    const YAML::Node value = node(path);
    std::vector<std::string> items;
    if (!value.IsNull()) {
      if (!value.IsSequence()) {
        fail(path, "expected a list, e.g. [" +
                       (value.IsScalar() ? value.Scalar() : std::string("a, b")) + "]");
      }
      for (const YAML::Node& item : value) {
        if (!item.IsScalar()) fail(path, "expected a list of names; the item " +
                                             describe(item) + " is not a plain value");
        items.push_back(item.Scalar());
      }
    }
    std::vector<std::string> quoted;
    for (const std::string& item : items) quoted.push_back(quote_yaml(item));
    canonical_[path] = "[" + join(quoted, ", ") + "]";
    return items;
  }

  // The merged configuration as YAML in the defaults' order and layout, with their comments.
  // Throws std::logic_error for a key of the defaults this reader never read: the defaults and
  // TrainConfig must list the same keys.
  std::string resolved_yaml() const {
    const std::map<std::string, std::string> comments = default_comments();
    std::string out =
        "# freqkv training configuration, resolved: defaults <- config file <- --set overrides\n";
    emit_section(root_, "", 0, comments, out);
    return out;
  }

 private:
  YAML::Node node(const std::string& path) const {
    YAML::Node current = root_;
    std::stringstream segments(path);
    for (std::string key; std::getline(segments, key, '.');) {
      current.reset(find_key(current, key));  // operator= would overwrite the tree's node
      if (!current.IsDefined()) {
        throw std::logic_error("config reader asks for '" + path +
                               "', which the embedded defaults do not define");
      }
    }
    return current;
  }

  std::string scalar(const std::string& path, const std::string& expected) const {
    const YAML::Node value = node(path);
    if (!value.IsScalar()) fail(path, "expected " + expected);
    return value.Scalar();
  }

  void emit_section(const YAML::Node& section, const std::string& prefix, int depth,
                    const std::map<std::string, std::string>& comments, std::string& out) const {
    for (const auto& entry : section) {
      const std::string key = entry.first.Scalar();
      const std::string path = join_path(prefix, key);
      const auto comment = comments.find(path);
      const std::string comment_text =
          comment == comments.end() ? std::string() : "  # " + comment->second;
      out += std::string(2 * depth, ' ') + key + ":";
      if (entry.second.IsMap()) {
        out += comment_text + "\n";
        emit_section(entry.second, path, depth + 1, comments, out);
        continue;
      }
      const auto text = canonical_.find(path);
      if (text == canonical_.end()) {
        throw std::logic_error("config key '" + path +
                               "' is in the embedded defaults but TrainConfig does not read it");
      }
      out += " " + text->second + comment_text + "\n";
    }
  }

  YAML::Node root_;
  Origins origins_;
  std::map<std::string, std::string> canonical_;
};

TrainConfig read_config(YAML::Node merged, Origins origins) {
  ConfigReader in(std::move(merged), std::move(origins));
  TrainConfig config;

  ModelSection& model = config.model;
  model.path = in.string("model.path");
  model.init_config = in.string("model.init_config");
  model.init_seed = static_cast<uint64_t>(in.integer("model.init_seed", 0));
  model.init_std = in.positive_number("model.init_std");
  if (model.path.empty() == model.init_config.empty()) {
    throw std::invalid_argument(
        std::string("config: set exactly one of model.path (a Hugging Face directory to import) "
                    "and model.init_config (a config.json to initialise randomly); ") +
        (model.path.empty() ? "both are empty"
                            : "both are set: '" + model.path + "' and '" + model.init_config +
                                  "'"));
  }

  const std::string device = in.choice("device", {"cpu", "cuda"});
  config.device = device == "cpu" ? TrainDevice::Cpu : TrainDevice::Cuda;
  const std::string precision = in.choice("precision", {"fp32", "fp64", "bf16"});
  config.precision = precision == "fp32"   ? TrainPrecision::FP32
                     : precision == "fp64" ? TrainPrecision::FP64
                                           : TrainPrecision::BF16;
  if (config.device == TrainDevice::Cpu && config.precision == TrainPrecision::BF16) {
    in.fail("precision", "bf16 runs on device cuda; device cpu takes fp32 or fp64");
  }
  if (config.device == TrainDevice::Cuda && config.precision != TrainPrecision::BF16) {
    in.fail("precision", "device cuda trains in bf16; fp32 and fp64 run on device cpu");
  }

  config.recompute = in.boolean("recompute");

  FreqKVConfig& freqkv = config.freqkv;
  freqkv.enabled = in.boolean("freqkv.enabled");
  freqkv.cache = in.positive_integer("freqkv.cache");
  freqkv.sink = in.integer("freqkv.sink", 0);
  freqkv.ratio = in.number_in("freqkv.ratio", 0.0, true, 1.0, false);
  config.freqkv_compression =
      parse_compression_impl(in.choice("freqkv.compression", {"auto", "gemm", "fft"}));
  if (freqkv.enabled) {
    try {
      freqkv.validate();
    } catch (const std::invalid_argument& error) {
      throw std::invalid_argument(std::string("config keys freqkv.cache/sink/ratio: ") +
                                  error.what());
    }
  }

  DataSection& data = config.data;
  data.train = in.string_list("data.train");
  if (data.train.empty()) {
    in.fail("data.train", "list at least one training token file, e.g. --set data.train=[a.bin]");
  }
  for (const std::string& file : data.train) {
    if (file.empty()) in.fail("data.train", "a file name is empty");
  }
  const std::string token_dtype = in.choice("data.token_dtype", {"uint16", "uint32", "int32"});
  data.token_dtype = parse_token_dtype(token_dtype);
  data.seq_len = in.positive_integer("data.seq_len");
  data.batch_size = in.positive_integer("data.batch_size");
  data.grad_accum = in.positive_integer("data.grad_accum");
  data.seed = static_cast<uint64_t>(in.integer("data.seed", 0));
  data.eos_token = in.integer("data.eos_token", -1);
  ValidationSection& validation = data.validation;
  validation.files = in.string_list("data.validation.files");
  for (const std::string& file : validation.files) {
    if (file.empty()) in.fail("data.validation.files", "a file name is empty");
  }
  validation.fraction = in.number_in("data.validation.fraction", 0.0, false, 1.0, true);
  validation.every = in.integer("data.validation.every", 0);
  validation.batches = in.positive_integer("data.validation.batches");
  if (!validation.files.empty() && validation.fraction > 0.0) {
    in.fail("data.validation.fraction",
            "hold out a fraction of the train shards or use data.validation.files, not both");
  }
  if (validation.every > 0 && validation.files.empty() && validation.fraction == 0.0) {
    in.fail("data.validation.every",
            "validation needs data.validation.files or a data.validation.fraction > 0");
  }

  OptimizerSection& optimizer = config.optimizer;
  optimizer.lr = in.positive_number("optimizer.lr");
  optimizer.beta1 = in.number_in("optimizer.beta1", 0.0, false, 1.0, true);
  optimizer.beta2 = in.number_in("optimizer.beta2", 0.0, false, 1.0, true);
  optimizer.eps = in.positive_number("optimizer.eps");
  optimizer.weight_decay = in.non_negative_number("optimizer.weight_decay");
  optimizer.grad_clip = in.non_negative_number("optimizer.grad_clip");

  ScheduleSection& schedule = config.schedule;
  schedule.steps = in.positive_integer("schedule.steps");
  schedule.warmup_steps = in.integer("schedule.warmup_steps", 0);
  const std::string kind = in.choice("schedule.kind", {"constant", "cosine", "linear"});
  schedule.kind = kind == "constant" ? LrScheduleKind::Constant
                  : kind == "cosine" ? LrScheduleKind::Cosine
                                     : LrScheduleKind::Linear;
  schedule.min_lr_ratio = in.number_in("schedule.min_lr_ratio", 0.0, false, 1.0, false);
  if (schedule.warmup_steps > schedule.steps) {
    in.fail("schedule.warmup_steps",
            "exceeds schedule.steps = " + std::to_string(schedule.steps));
  }

  LoraSection& lora = config.lora;
  lora.enabled = in.boolean("lora.enabled");
  lora.rank = in.positive_integer("lora.rank");
  lora.alpha = in.positive_number("lora.alpha");
  lora.dropout = in.number("lora.dropout");
  if (lora.dropout != 0.0) {
    in.fail("lora.dropout", "LoRA dropout is not supported; only 0 is");
  }
  lora.targets = in.string_list("lora.targets");
  std::set<std::string> seen_targets;
  for (const std::string& target : lora.targets) {
    if (std::find(kLoraTargets.begin(), kLoraTargets.end(), target) == kLoraTargets.end()) {
      in.fail("lora.targets", "unknown target '" + target + "'; valid: " + join(kLoraTargets, " "));
    }
    if (!seen_targets.insert(target).second) {
      in.fail("lora.targets", "target '" + target + "' is listed twice");
    }
  }
  if (lora.enabled && lora.targets.empty()) {
    in.fail("lora.targets", "LoRA is enabled but no layer gets an adapter");
  }
  lora.trainable = in.string_list("lora.trainable");
  for (const std::string& pattern : lora.trainable) {
    // An empty substring would match (and fully train) every parameter.
    if (pattern.empty()) in.fail("lora.trainable", "an empty name would match every parameter");
  }

  CheckpointSection& checkpoint = config.checkpoint;
  checkpoint.dir = in.non_empty_string("checkpoint.dir");
  checkpoint.every = in.integer("checkpoint.every", 0);
  checkpoint.keep_last = in.integer("checkpoint.keep_last", 0);
  checkpoint.resume = in.string("checkpoint.resume");

  LoggingSection& logging = config.logging;
  logging.every = in.positive_integer("logging.every");
  logging.metrics_file = in.non_empty_string("logging.metrics_file");
  logging.run_dir = in.non_empty_string("logging.run_dir");

  ParallelSection& parallel = config.parallel;
  parallel.tp = in.positive_integer("parallel.tp");
  parallel.sp = in.positive_integer("parallel.sp");
  parallel.dp = in.positive_integer("parallel.dp");
  parallel.zero1 = in.boolean("parallel.zero1");
  parallel.overlap_grad_reduce = in.boolean("parallel.overlap_grad_reduce");

  config.resolved_yaml = in.resolved_yaml();
  return config;
}

TrainConfig load_merged(const YAML::Node& user_document, const std::string& source,
                        const std::vector<std::string>& overrides) {
  const YAML::Node defaults = YAML::Load(kDefaultConfigYaml);
  YAML::Node merged = YAML::Clone(defaults);
  Origins origins;
  record_origins(defaults, "", "defaults", origins);
  if (user_document.IsDefined() && !user_document.IsNull()) {
    if (!user_document.IsMap()) {
      throw std::invalid_argument("config " + source +
                                  ": expected a mapping of sections (model:, data:, ...), got " +
                                  describe(user_document));
    }
    merge_section(merged, user_document, "", source, origins);
  }
  for (const std::string& override_text : overrides) {
    apply_override(merged, override_text, origins);
  }
  return read_config(merged, std::move(origins));
}

}  // namespace

const char* train_device_name(TrainDevice device) {
  return device == TrainDevice::Cpu ? "cpu" : "cuda";
}

const char* train_precision_name(TrainPrecision precision) {
  switch (precision) {
    case TrainPrecision::FP32: return "fp32";
    case TrainPrecision::FP64: return "fp64";
    case TrainPrecision::BF16: return "bf16";
  }
  return "unknown";
}

const char* lr_schedule_kind_name(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::Constant: return "constant";
    case LrScheduleKind::Cosine: return "cosine";
    case LrScheduleKind::Linear: return "linear";
  }
  return "unknown";
}

bool operator==(const TrainConfig& a, const TrainConfig& b) {
  const auto model = [](const ModelSection& m) {
    return std::tie(m.path, m.init_config, m.init_seed, m.init_std);
  };
  const auto freqkv = [](const FreqKVConfig& f) {
    return std::tie(f.enabled, f.cache, f.sink, f.ratio);
  };
  const auto validation = [](const ValidationSection& v) {
    return std::tie(v.files, v.fraction, v.every, v.batches);
  };
  const auto data = [](const DataSection& d) {
    return std::tie(d.train, d.token_dtype, d.seq_len, d.batch_size, d.grad_accum, d.seed,
                    d.eos_token);
  };
  const auto optimizer = [](const OptimizerSection& o) {
    return std::tie(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip);
  };
  const auto schedule = [](const ScheduleSection& s) {
    return std::tie(s.steps, s.warmup_steps, s.kind, s.min_lr_ratio);
  };
  const auto lora = [](const LoraSection& l) {
    return std::tie(l.enabled, l.rank, l.alpha, l.dropout, l.targets, l.trainable);
  };
  const auto checkpoint = [](const CheckpointSection& c) {
    return std::tie(c.dir, c.every, c.keep_last, c.resume);
  };
  const auto logging = [](const LoggingSection& l) {
    return std::tie(l.every, l.metrics_file, l.run_dir);
  };
  const auto parallel = [](const ParallelSection& p) {
    return std::tie(p.tp, p.sp, p.dp, p.zero1, p.overlap_grad_reduce);
  };
  return model(a.model) == model(b.model) && a.device == b.device &&
         a.precision == b.precision && a.recompute == b.recompute &&
         freqkv(a.freqkv) == freqkv(b.freqkv) && a.freqkv_compression == b.freqkv_compression &&
         data(a.data) == data(b.data) &&
         validation(a.data.validation) == validation(b.data.validation) &&
         optimizer(a.optimizer) == optimizer(b.optimizer) &&
         schedule(a.schedule) == schedule(b.schedule) && lora(a.lora) == lora(b.lora) &&
         checkpoint(a.checkpoint) == checkpoint(b.checkpoint) &&
         logging(a.logging) == logging(b.logging) && parallel(a.parallel) == parallel(b.parallel);
}

std::string default_config_yaml() { return kDefaultConfigYaml; }

TrainConfig load_train_config(const std::string& yaml_path,
                              const std::vector<std::string>& overrides) {
  if (yaml_path.empty()) return load_merged(YAML::Node(), "", overrides);
  std::ifstream in(yaml_path, std::ios::binary);
  if (!in) {
    throw std::runtime_error("cannot read config file '" + yaml_path + "': " +
                             std::strerror(errno));
  }
  std::ostringstream text;
  text << in.rdbuf();
  return load_train_config_from_string(text.str(), overrides, yaml_path);
}

TrainConfig load_train_config_from_string(const std::string& yaml_text,
                                          const std::vector<std::string>& overrides,
                                          const std::string& source_name) {
  return load_merged(parse_yaml(yaml_text, source_name), source_name, overrides);
}

double learning_rate(const TrainConfig& config, int64_t step) {
  if (step < 1) {
    throw std::invalid_argument("learning_rate: steps are counted from 1, got " +
                                std::to_string(step));
  }
  const double peak = config.optimizer.lr;
  const ScheduleSection& schedule = config.schedule;
  if (step <= schedule.warmup_steps) {
    return peak * static_cast<double>(step) / static_cast<double>(schedule.warmup_steps);
  }
  if (schedule.kind == LrScheduleKind::Constant) return peak;
  const double floor_lr = schedule.min_lr_ratio * peak;
  const int64_t decay_steps = schedule.steps - schedule.warmup_steps;
  // Progress through the decay: 0 right after the warm-up, 1 at step `steps` and after it.
  const double progress =
      decay_steps <= 0 ? 1.0
                       : std::min(1.0, static_cast<double>(step - schedule.warmup_steps) /
                                           static_cast<double>(decay_steps));
  if (schedule.kind == LrScheduleKind::Cosine) {
    const double pi = std::acos(-1.0);
    return floor_lr + (peak - floor_lr) * 0.5 * (1.0 + std::cos(pi * progress));
  }
  return peak - (peak - floor_lr) * progress;
}

}  // namespace freqkv
