// rewrite_cuda IN.cu OUT.cpp: turns a CUDA source into host C++ for the SIMT emulator (simt.h).
// Two constructs of CUDA C++ are not expressible with macros:
//   kernel<T><<<grid, block, smem, stream>>>(args)
//       -> ::emu::launch(kernel<T>, "kernel<T>", grid, block, smem, stream)(args)
//   extern __shared__ __align__(N) T name[];
//       -> T* name = reinterpret_cast<T*>(::emu::dynamic_shared_memory());
// Line breaks are kept where they were and a #line directive names the original file, so
// compiler messages point into the .cu file.
#include <fstream>
#include <iostream>
#include <iterator>
#include <regex>
#include <sstream>
#include <string>

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string rewrite(const std::string& source, const std::string& path) {
  // A kernel name, with template arguments that hold no angle brackets and parentheses only
  // one deep (decltype(x)::value).
  static const std::regex launch_open(
      R"(([A-Za-z_][\w:]*(?:<(?:[\w\s,:]|\([\w\s]*\))*>)?)(\s*)<<<)");
  static const std::regex launch_close(R"(>>>\s*\()");
  static const std::regex dynamic_shared(
      R"(extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;)");
  std::string out = std::regex_replace(source, launch_open, "::emu::launch($1, \"$1\",$2");
  out = std::regex_replace(out, launch_close, ")(");
  out = std::regex_replace(out, dynamic_shared,
                           "$1* $2 = reinterpret_cast<$1*>(::emu::dynamic_shared_memory());");
  if (out.find("<<<") != std::string::npos || out.find(">>>") != std::string::npos) {
    throw std::runtime_error(path + ": a kernel launch the rewriter does not recognise");
  }
  return "#line 1 \"" + path + "\"\n" + out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: rewrite_cuda IN.cu OUT.cpp\n";
    return 2;
  }
  try {
    const std::string result = rewrite(read_file(argv[1]), argv[1]);
    std::ofstream out(argv[2], std::ios::binary);
    out << result;
    if (!out) throw std::runtime_error(std::string("cannot write ") + argv[2]);
  } catch (const std::exception& e) {
    std::cerr << "rewrite_cuda: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
