// freqkv tokenize: UTF-8 text files -> one flat token file, documents joined with EOS.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "data/byte_vocab.h"
#include "data/token_file.h"
#include "trainer/cli_args.h"
#include "trainer/commands.h"

namespace freqkv {

int run_tokenize(const std::vector<std::string>& args) {
  ArgParser p("tokenize",
              "Encodes each text file as one document with the byte-level vocabulary (bytes 0-255, "
              "BOS 256, EOS 257) and writes them, each followed by EOS, to one token file.");
  p.positionals("TEXT_FILE", "input text files, one document each");
  p.option("out", "FILE", "output token file", "", true);
  p.option("dtype", "TYPE", "uint16, uint32 or int32", "uint16");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  if (p.positional_values().empty()) throw UsageError("no input text files given");
  std::vector<int32_t> tokens;
  for (const std::string& path : p.positional_values()) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open text file " + path);
    std::ostringstream text;
    text << in.rdbuf();
    const std::vector<int32_t> doc = ByteVocab::encode(text.str());
    tokens.insert(tokens.end(), doc.begin(), doc.end());
    tokens.push_back(ByteVocab::kEos);
  }
  write_token_file(p.get("out"), tokens, parse_token_dtype(p.get("dtype")));
  std::fprintf(stderr, "freqkv tokenize: %zu documents, %zu tokens written to %s\n",
               p.positional_values().size(), tokens.size(), p.get("out").c_str());
  return 0;
}

}  // namespace freqkv
