#include "trainer/inference/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "trainer/human_units.h"

namespace freqkv {

ProgressLine::ProgressLine(std::string label, int64_t total, std::FILE* stream)
    : label_(std::move(label)),
      total_(std::max<int64_t>(total, 1)),
      stream_(stream),
      terminal_(isatty(fileno(stream)) == 1),
      start_(std::chrono::steady_clock::now()),
      last_print_(start_) {}

std::string ProgressLine::render(int64_t done, const std::string& detail) const {
  const double fraction = std::min(1.0, static_cast<double>(done) / static_cast<double>(total_));
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(fraction * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  char text[160];
  std::snprintf(text, sizeof(text), "%s [%s] %5.1f%% elapsed %s", label_.c_str(), bar.c_str(),
                100.0 * fraction, format_duration(elapsed).c_str());
  std::string line = text;
  if (fraction > 0 && fraction < 1)
    line += " eta " + format_duration(elapsed * (1.0 - fraction) / fraction);
  if (!detail.empty()) line += " | " + detail;
  return line;
}

void ProgressLine::update(int64_t done, const std::string& detail) {
  done_ = done;
  detail_ = detail;
  const auto now = std::chrono::steady_clock::now();
  const double since_print = std::chrono::duration<double>(now - last_print_).count();
  if (terminal_) {
    if (since_print < 0.2 && drawn_) return;  // redraw at most 5 times a second
    // \033[K clears what a longer previous line left on the right.
    std::fprintf(stream_, "\r%s\033[K", render(done, detail).c_str());
    std::fflush(stream_);
    drawn_ = true;
  } else {
    const int64_t decile = done * 10 / total_;
    if (decile == last_decile_ && since_print < 30.0) return;
    last_decile_ = decile;
    std::fprintf(stream_, "%s\n", render(done, detail).c_str());
    std::fflush(stream_);
  }
  last_print_ = now;
}

void ProgressLine::finish() {
  if (terminal_) {
    std::fprintf(stream_, "\r%s\033[K\n", render(done_, detail_).c_str());
  } else if (last_decile_ < 10) {  // the 100% line is not printed yet
    std::fprintf(stream_, "%s\n", render(done_, detail_).c_str());
  }
  std::fflush(stream_);
}

}  // namespace freqkv
