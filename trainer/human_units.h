// Numbers as people read them in console lines and tables: counts (parameters), bytes (memory)
// and durations (elapsed, ETA). One spelling for the trainer, the benchmark and inference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace freqkv {

// "812", "124.0K", "1.10M", "6.74B".
inline std::string format_count(int64_t n) {
  char buf[32];
  if (n >= 1000000000) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1000000) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1000) std::snprintf(buf, sizeof buf, "%.1fK", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
  return buf;
}

// "812 B", "3.5 KiB", "12.0 MiB", "1.25 GiB".
inline std::string format_bytes(int64_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  const double kib = 1024.0, mib = kib * 1024, gib = mib * 1024;
  if (b >= gib) std::snprintf(buf, sizeof buf, "%.2f GiB", b / gib);
  else if (b >= mib) std::snprintf(buf, sizeof buf, "%.1f MiB", b / mib);
  else if (b >= kib) std::snprintf(buf, sizeof buf, "%.1f KiB", b / kib);
  else std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  return buf;
}

// "1:02:03", or "2:03" below an hour.
inline std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::llround(std::max(0.0, seconds)));
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%lld:%02lld", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  return buf;
}

}  // namespace freqkv
