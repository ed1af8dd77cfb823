// freqkv tokenize: UTF-8 text files -> one flat token file, documents joined with an
// end-of-document token, with a Hugging Face tokenizer.json or the byte-level vocabulary.
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "data/token_file.h"
#include "data/tokenizer.h"
#include "trainer/cli_args.h"
#include "trainer/commands.h"

namespace freqkv {

namespace {

// --eos: a token id, or the token as the vocabulary spells it ("</s>", "<|eot_id|>").
int32_t parse_separator(const Tokenizer& tokenizer, const std::string& value) {
  const bool is_number =
      !value.empty() && value.find_first_not_of("0123456789") == std::string::npos;
  if (is_number) {
    // More than 10 digits is beyond int32 anyway; token_text() rejects ids without a token.
    const long long id = value.size() > 10 ? -1 : std::stoll(value);
    bool is_token = id >= 0 && id <= std::numeric_limits<int32_t>::max();
    if (is_token) {
      try {
        tokenizer.token_text(static_cast<int32_t>(id));
      } catch (const std::out_of_range&) {
        is_token = false;
      }
    }
    if (!is_token) {
      throw UsageError("--eos " + value + " is not a token id of the " + tokenizer.description() +
                       " (vocabulary size " + std::to_string(tokenizer.vocab_size()) + ")");
    }
    return static_cast<int32_t>(id);
  }
  const int32_t id = tokenizer.token_id(value);
  if (id < 0) {
    throw UsageError("--eos '" + value + "' is not a token of the " + tokenizer.description());
  }
  return id;
}

}  // namespace

int run_tokenize(const std::vector<std::string>& args) {
  ArgParser p("tokenize",
              "Encodes each text file as one document and writes them, each followed by the "
              "end-of-document token (the tokenizer's EOS unless --eos), to one token file. The "
              "tokenizer is a Hugging Face tokenizer.json (byte-level BPE as in LLaMA-3, or "
              "SentencePiece-style BPE as in LLaMA-2) or the byte-level vocabulary (bytes 0-255, "
              "BOS 256, EOS 257).");
  p.positionals("TEXT_FILE", "input text files, one document each");
  p.option("out", "FILE", "output token file", "", true);
  p.option("dtype", "TYPE", "uint16, uint32 or int32", "uint16");
  p.option("tokenizer", "DIR|FILE|bytes",
           "a directory holding tokenizer.json, a tokenizer.json, or 'bytes'", "bytes");
  p.option("eos", "ID|TOKEN",
           "end-of-document token after each document, as an id or as spelled in the vocabulary "
           "(default: the tokenizer's EOS)");
  p.flag("bos", "also begin each document with the tokenizer's BOS");
  p.parse(args);
  if (p.help_requested()) {
    std::printf("%s", p.usage().c_str());
    return 0;
  }
  if (p.positional_values().empty()) throw UsageError("no input text files given");

  const std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(p.get("tokenizer"));
  const int32_t separator =
      p.given("eos") ? parse_separator(*tokenizer, p.get("eos")) : tokenizer->eos_id();
  if (separator < 0) {
    throw UsageError("the " + tokenizer->description() +
                     " has no EOS token to end documents with; name one with --eos");
  }
  const bool add_bos = p.flag_set("bos");
  if (add_bos && tokenizer->bos_id() < 0) {
    throw UsageError("--bos: the " + tokenizer->description() + " has no BOS token");
  }
  const TokenDType dtype = parse_token_dtype(p.get("dtype"));
  if (dtype == TokenDType::U16 && tokenizer->vocab_size() > 65536) {
    throw UsageError("the " + tokenizer->description() + " has " +
                     std::to_string(tokenizer->vocab_size()) +
                     " token ids, more than uint16 holds; use --dtype uint32");
  }

  std::vector<int32_t> tokens;
  for (const std::string& path : p.positional_values()) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open text file " + path);
    std::ostringstream text;
    text << in.rdbuf();
    const std::vector<int32_t> doc = tokenizer->encode(text.str(), add_bos);
    tokens.insert(tokens.end(), doc.begin(), doc.end());
    tokens.push_back(separator);
  }
  write_token_file(p.get("out"), tokens, dtype);
  std::fprintf(stderr, "freqkv tokenize: %zu documents, %zu tokens written to %s with the %s\n",
               p.positional_values().size(), tokens.size(), p.get("out").c_str(),
               tokenizer->description().c_str());
  return 0;
}

}  // namespace freqkv
