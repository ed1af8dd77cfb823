// What a training run reports: one console line per logged step (as Megatron-LM and llm.c print
// them), validation lines, and the same numbers as JSON lines in a metrics file that
// launch/plot_metrics.py turns into PNG plots.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

namespace freqkv {

struct StepMetrics {
  int64_t step = 0, total_steps = 0;
  double loss = 0, lr = 0, grad_norm = 0;
  double tokens_per_second = 0;
  double elapsed_seconds = 0;  // since the start of this process's training
  int64_t tokens = 0;          // tokens trained on in this step
  // Backend memory (Kernels::memory_in_use) after the step and at its peak during the step, the
  // most over the ranks; < 0: not reported.
  int64_t memory_bytes = -1, peak_memory_bytes = -1;
};

class MetricsLog {
 public:
  // Appends to metrics_path (created with its directory); a resumed run continues the file.
  explicit MetricsLog(const std::string& metrics_path);
  void log_step(const StepMetrics& m, int64_t steps_done_here);
  void log_validation(int64_t step, double loss, int64_t tokens);
  // Any other event (checkpoint written, export, resume) as {"event": ..., "detail": ...}.
  void log_event(int64_t step, const std::string& event, const std::string& detail);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace freqkv
