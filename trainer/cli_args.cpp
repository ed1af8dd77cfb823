#include "trainer/cli_args.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>

namespace freqkv {

ArgParser::ArgParser(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void ArgParser::option(const std::string& name, const std::string& value_name,
                       const std::string& help, const std::string& default_value, bool required) {
  options_.push_back({name, value_name, help, default_value, true, required, false});
}

void ArgParser::repeated_option(const std::string& name, const std::string& value_name,
                                const std::string& help) {
  options_.push_back({name, value_name, help + " (repeatable)", "", true, false, true});
}

std::vector<std::string> ArgParser::get_all(const std::string& name) const {
  find(name);
  auto it = repeated_values_.find(name);
  return it == repeated_values_.end() ? std::vector<std::string>{} : it->second;
}

void ArgParser::flag(const std::string& name, const std::string& help) {
  options_.push_back({name, "", help, "", false, false, false});
}

void ArgParser::positionals(const std::string& value_name, const std::string& help) {
  positional_name_ = value_name;
  positional_help_ = help;
}

const ArgParser::Option& ArgParser::find(const std::string& name) const {
  for (const Option& o : options_)
    if (o.name == name) return o;
  throw UsageError("unknown option --" + name + " for 'freqkv " + command_ + "'");
}

void ArgParser::parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return;
    }
    if (arg.rfind("--", 0) != 0 && !positional_name_.empty()) {
      positional_values_.push_back(arg);
      continue;
    }
    if (arg.rfind("--", 0) != 0)
      throw UsageError("unexpected argument '" + arg + "' for 'freqkv " + command_ +
                       "' (options start with --)");
    std::string name = arg.substr(2), value;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    const Option& o = find(name);
    if (!o.takes_value) {
      if (inline_value) throw UsageError("option --" + name + " takes no value");
      values_[name] = "1";
      continue;
    }
    if (!inline_value) {
      if (i + 1 >= args.size()) throw UsageError("option --" + name + " needs a value (" +
                                                 o.value_name + ")");
      value = args[++i];
    }
    values_[name] = value;
    if (o.repeated) repeated_values_[name].push_back(value);
  }
  for (const Option& o : options_)
    if (o.required && !values_.count(o.name))
      throw UsageError("missing required option --" + o.name + " " + o.value_name);
}

bool ArgParser::given(const std::string& name) const {
  find(name);
  return values_.count(name) > 0;
}

bool ArgParser::flag_set(const std::string& name) const { return given(name); }

std::string ArgParser::get(const std::string& name) const {
  const Option& o = find(name);
  auto it = values_.find(name);
  return it != values_.end() ? it->second : o.default_value;
}

int64_t ArgParser::get_int(const std::string& name) const {
  const std::string s = get(name);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno == ERANGE)
    throw UsageError("option --" + name + " expects an integer, got '" + s + "'");
  return v;
}

double ArgParser::get_double(const std::string& name) const {
  const std::string s = get(name);
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || errno == ERANGE)
    throw UsageError("option --" + name + " expects a number, got '" + s + "'");
  return v;
}

std::vector<int64_t> ArgParser::get_int_list(const std::string& name, int64_t min_value) const {
  const std::string text = get(name);
  std::vector<int64_t> values;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = std::min(text.find(',', begin), text.size());
    const std::string item = text.substr(begin, end - begin);
    char* stop = nullptr;
    errno = 0;
    const long long v = std::strtoll(item.c_str(), &stop, 10);
    if (item.empty() || *stop != '\0' || errno == ERANGE || v < min_value)
      throw UsageError("option --" + name + ": '" + item + "' is not an integer >= " +
                       std::to_string(min_value) + " (give a comma-separated list, e.g. " +
                       std::to_string(std::max<int64_t>(min_value, 2048)) + "," +
                       std::to_string(std::max<int64_t>(min_value, 2048) * 2) + ")");
    values.push_back(v);
    begin = end + 1;
  }
  return values;
}

std::string ArgParser::usage() const {
  std::string u = "usage: freqkv " + command_ + " [options]" +
                  (positional_name_.empty() ? "" : " " + positional_name_ + "...") + "\n" +
                  summary_ + "\n\n";
  if (!positional_name_.empty()) u += "  " + positional_name_ + ": " + positional_help_ + "\n\n";
  u += "options:\n";
  for (const Option& o : options_) {
    std::string left = "  --" + o.name + (o.takes_value ? " " + o.value_name : "");
    if (left.size() < 30) left.resize(30, ' ');
    u += left + " " + o.help;
    if (o.required) u += " (required)";
    if (!o.default_value.empty()) u += " [default: " + o.default_value + "]";
    u += "\n";
  }
  return u;
}

}  // namespace freqkv
