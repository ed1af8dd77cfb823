// A progress line for long evaluations on stderr: redrawn in place (carriage return) when stderr
// is a terminal, otherwise a plain line at every 10% and at least every 30 seconds, so that logs
// of batch jobs stay readable.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace freqkv {

class ProgressLine {
 public:
  // total: units of work (e.g. tokens); label starts every line.
  ProgressLine(std::string label, int64_t total, std::FILE* stream = stderr);
  // Reports that `done` units are complete; detail is shown after the counts.
  void update(int64_t done, const std::string& detail = "");
  // Ends the line (terminal) or prints the final one.
  void finish();

 private:
  std::string render(int64_t done, const std::string& detail) const;

  std::string label_;
  int64_t total_;
  std::FILE* stream_;
  bool terminal_;
  std::chrono::steady_clock::time_point start_, last_print_;
  int64_t last_decile_ = -1;
  int64_t done_ = 0;
  std::string detail_;
  bool drawn_ = false;
};

}  // namespace freqkv
