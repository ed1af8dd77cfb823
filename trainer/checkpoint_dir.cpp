#include "trainer/checkpoint_dir.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <system_error>

#include "trainer/checkpoint_file.h"

namespace freqkv {

namespace {

namespace fs = std::filesystem;

constexpr const char* kStepPrefix = "step_";
constexpr const char* kCheckpointSuffix = ".h5";
constexpr const char* kTmpSuffix = ".h5.tmp";

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The step of a file named step_<digits><suffix>; nothing for any other name.
std::optional<int64_t> step_of_file_name(const std::string& name, const std::string& suffix) {
  const std::string prefix = kStepPrefix;
  if (name.size() <= prefix.size() + suffix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
      !ends_with(name, suffix)) {
    return std::nullopt;
  }
  const std::string digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.size() > 18 || !std::all_of(digits.begin(), digits.end(),
                                         [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;  // not ours, or a step beyond int64
  }
  return std::stoll(digits);
}

// The regular files of dir named step_<digits><suffix>, sorted by step (then name).
std::vector<std::pair<int64_t, std::string>> files_with_suffix(const std::string& dir,
                                                               const std::string& suffix) {
  std::vector<std::pair<int64_t, std::string>> files;
  std::error_code error;
  if (!fs::exists(dir, error)) return files;
  fs::directory_iterator entries(dir, error);
  if (error) {
    throw std::runtime_error("cannot list checkpoint directory '" + dir + "': " + error.message());
  }
  for (; entries != fs::directory_iterator(); entries.increment(error)) {
    if (error) break;
    if (!entries->is_regular_file(error)) continue;
    const std::optional<int64_t> step =
        step_of_file_name(entries->path().filename().string(), suffix);
    if (step) files.emplace_back(*step, entries->path().string());
  }
  if (error) {
    throw std::runtime_error("cannot list checkpoint directory '" + dir + "': " + error.message());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// Why CheckpointReader::open rejects path, or "" when it accepts it.
std::string validation_failure(const std::string& path) {
  try {
    CheckpointReader::open(path);
    return "";
  } catch (const std::exception& error) {
    return error.what();
  }
}

void warn_skipping(const std::string& path, const std::string& reason) {
  std::cerr << "freqkv: warning: skipping checkpoint '" << path << "': " << reason << "\n";
}

}  // namespace

CheckpointDir::CheckpointDir(std::string dir) : dir_(std::move(dir)) {
  if (dir_.empty()) throw std::runtime_error("the checkpoint directory must not be empty");
}

std::string CheckpointDir::path_for_step(int64_t step) const {
  if (step < 0) {
    throw std::runtime_error("no checkpoint path for negative step " + std::to_string(step) +
                             " in '" + dir_ + "'");
  }
  char name[64];
  std::snprintf(name, sizeof(name), "%s%08" PRId64 "%s", kStepPrefix, step, kCheckpointSuffix);
  return (fs::path(dir_) / name).string();
}

std::vector<std::pair<int64_t, std::string>> CheckpointDir::list() const {
  return files_with_suffix(dir_, kCheckpointSuffix);
}

std::string CheckpointDir::latest() const {
  const auto checkpoints = list();
  for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
    const std::string failure = validation_failure(it->second);
    if (failure.empty()) return it->second;
    warn_skipping(it->second, failure);
  }
  return "";
}

void CheckpointDir::prune(int keep_last) const {
  if (keep_last < 1) {
    throw std::runtime_error("pruning checkpoint directory '" + dir_ +
                             "': keep_last must be at least 1, got " + std::to_string(keep_last));
  }
  std::vector<std::string> doomed;
  // Newest first: count valid files until keep_last are kept; everything older goes. A file that
  // is not valid does not count, so a damaged newest file never costs the last good one.
  int kept = 0;
  const auto checkpoints = list();
  for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
    if (kept >= keep_last) {
      doomed.push_back(it->second);
      continue;
    }
    const std::string failure = validation_failure(it->second);
    if (failure.empty()) {
      ++kept;
    } else {
      warn_skipping(it->second, failure);
    }
  }
  // Writers rename their tmp file when they commit, so one still here crashed (see header).
  for (const auto& [step, path] : files_with_suffix(dir_, kTmpSuffix)) doomed.push_back(path);

  for (const std::string& path : doomed) {
    std::error_code error;
    fs::remove(path, error);
    if (error) {
      throw std::runtime_error("cannot remove old checkpoint '" + path + "': " + error.message());
    }
  }
}

std::string CheckpointDir::resolve(const std::string& resume) const {
  if (resume == "latest") {
    const std::string path = latest();
    if (path.empty()) {
      throw std::runtime_error("no checkpoint in '" + dir_ + "' to resume from");
    }
    return path;
  }
  std::error_code error;
  if (!fs::exists(resume, error)) {
    throw std::runtime_error("checkpoint '" + resume + "' to resume from does not exist");
  }
  return resume;
}

}  // namespace freqkv
