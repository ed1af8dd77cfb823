// Command-line options of one subcommand: declared with their help, parsed strictly (an unknown
// option, a missing value or a malformed number is an error that names it).
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace freqkv {

// A mistake on the command line; main prints it with the subcommand's usage.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class ArgParser {
 public:
  ArgParser(std::string command, std::string summary);

  // An option taking a value (--name VALUE or --name=VALUE). default_value empty: no default.
  void option(const std::string& name, const std::string& value_name, const std::string& help,
              const std::string& default_value = "", bool required = false);
  // An option that may be given several times (--set a=1 --set b=2); get_all() returns them.
  void repeated_option(const std::string& name, const std::string& value_name,
                       const std::string& help);
  // A flag without a value.
  void flag(const std::string& name, const std::string& help);
  // Accepts bare arguments (e.g. input files), collected in order; without it they are errors.
  void positionals(const std::string& value_name, const std::string& help);

  // Parses args (without the program and subcommand names). --help sets help_requested().
  void parse(const std::vector<std::string>& args);

  bool help_requested() const { return help_requested_; }
  bool given(const std::string& name) const;  // set on the command line (not by default)
  bool flag_set(const std::string& name) const;
  std::string get(const std::string& name) const;
  std::vector<std::string> get_all(const std::string& name) const;
  int64_t get_int(const std::string& name) const;
  double get_double(const std::string& name) const;
  // A comma-separated list of integers, each >= min_value (e.g. --lengths 2048,4096); an empty
  // list or a malformed item is a UsageError naming the option and the item.
  std::vector<int64_t> get_int_list(const std::string& name, int64_t min_value) const;
  const std::vector<std::string>& positional_values() const { return positional_values_; }
  std::string usage() const;

 private:
  struct Option {
    std::string name, value_name, help, default_value;
    bool takes_value, required, repeated;
  };
  const Option& find(const std::string& name) const;

  std::string command_, summary_;
  std::vector<Option> options_;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> repeated_values_;
  std::string positional_name_, positional_help_;
  std::vector<std::string> positional_values_;
  bool help_requested_ = false;
};

}  // namespace freqkv
