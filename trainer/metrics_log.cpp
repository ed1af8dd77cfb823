#include "trainer/metrics_log.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "trainer/human_units.h"

namespace freqkv {

MetricsLog::MetricsLog(const std::string& metrics_path) : path_(metrics_path) {
  const std::filesystem::path p(metrics_path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  out_.open(metrics_path, std::ios::app);
  if (!out_) throw std::runtime_error("cannot open metrics file " + metrics_path + " for writing");
}

void MetricsLog::log_step(const StepMetrics& m, int64_t steps_done_here) {
  const double per_step = steps_done_here > 0 ? m.elapsed_seconds / steps_done_here : 0.0;
  const double eta = per_step * static_cast<double>(m.total_steps - m.step);
  std::string memory;
  if (m.peak_memory_bytes >= 0) {
    char buf[64];
    std::snprintf(buf, sizeof buf, " | mem %s peak %s", format_bytes(m.memory_bytes).c_str(),
                  format_bytes(m.peak_memory_bytes).c_str());
    memory = buf;
  }
  std::printf("step %6lld/%lld | loss %.4f | lr %.3e | grad norm %.4f | %.0f tok/s%s | elapsed %s | "
              "eta %s\n",
              static_cast<long long>(m.step), static_cast<long long>(m.total_steps), m.loss, m.lr,
              m.grad_norm, m.tokens_per_second, memory.c_str(),
              format_duration(m.elapsed_seconds).c_str(), format_duration(eta).c_str());
  std::fflush(stdout);
  nlohmann::json line{{"step", m.step},           {"loss", m.loss},
                      {"lr", m.lr},               {"grad_norm", m.grad_norm},
                      {"tokens", m.tokens},       {"tokens_per_second", m.tokens_per_second},
                      {"elapsed", m.elapsed_seconds}};
  if (m.peak_memory_bytes >= 0) {
    line["memory_bytes"] = m.memory_bytes;
    line["peak_memory_bytes"] = m.peak_memory_bytes;
  }
  out_ << line.dump() << "\n";
  out_.flush();
}

void MetricsLog::log_validation(int64_t step, double loss, int64_t tokens) {
  std::printf("step %6lld | validation loss %.4f | ppl %.2f | %lld tokens\n",
              static_cast<long long>(step), loss, std::exp(loss), static_cast<long long>(tokens));
  std::fflush(stdout);
  out_ << nlohmann::json{{"step", step}, {"val_loss", loss}, {"val_tokens", tokens}}.dump() << "\n";
  out_.flush();
}

void MetricsLog::log_event(int64_t step, const std::string& event, const std::string& detail) {
  std::printf("step %6lld | %s: %s\n", static_cast<long long>(step), event.c_str(), detail.c_str());
  std::fflush(stdout);
  out_ << nlohmann::json{{"step", step}, {"event", event}, {"detail", detail}}.dump() << "\n";
  out_.flush();
}

}  // namespace freqkv
