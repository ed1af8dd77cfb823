// The directory holding a run's checkpoints: dir/step_00000100.h5, one file per saved step,
// written by CheckpointWriter (so an unfinished one is a step_*.h5.tmp that is never listed).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace freqkv {

class CheckpointDir {
 public:
  explicit CheckpointDir(std::string dir);

  const std::string& dir() const { return dir_; }

  // dir/step_NNNNNNNN.h5 (the step zero-padded to 8 digits, more when it needs them).
  std::string path_for_step(int64_t step) const;

  // The committed checkpoints (files named step_<digits>.h5), sorted by step. *.tmp files and
  // files of other names are ignored; a missing directory has none. The files are not opened:
  // latest() and prune() are the ones that validate.
  std::vector<std::pair<int64_t, std::string>> list() const;

  // The path of the newest checkpoint that CheckpointReader::open accepts, "" if none. A newer
  // file that fails validation is skipped with a warning on stderr, so one damaged file never
  // stops a run from resuming from the one before.
  std::string latest() const;

  // Keeps the keep_last (>= 1) newest valid checkpoints and removes the committed ones older than
  // those, plus stale step_*.h5.tmp files of crashed writers. Files newer than the kept ones that
  // fail validation are left for inspection (latest() already skips them). Run it only when no
  // writer of this directory is in flight. With several ranks, writers are collective but this
  // is one process's file operation: run it on one rank after commit() returned (which it does on
  // every rank only once the new file is in place).
  void prune(int keep_last) const;

  // "latest" -> latest() (an error if there is none); anything else is a checkpoint path, which
  // must exist. Errors name the directory or the path.
  std::string resolve(const std::string& resume) const;

 private:
  std::string dir_;
};

}  // namespace freqkv
