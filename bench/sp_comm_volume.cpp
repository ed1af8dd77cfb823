// Bytes a rank moves per layer under sequence parallelism: FreqKV's memory passing against ring
// attention (which circulates every rank's keys and values).
//
//   mpirun -np 4 build/bench/sp_comm_volume      measured on this machine + the table by formula
//   build/bench/sp_comm_volume                   the table by formula only
//
// FreqKV, per layer and rank (S sink rows, L memory rows, W = 2 Hkv D key+value channels,
// e bytes per element, B sequences):
//   forward   the memory entering the next rank's first chunk: B L W e (send), and the sink rows:
//             B S W e from rank 0 to each other rank (broadcast)
//   backward  the memory gradient back to the previous rank: B L W e, and the sink gradients
//             summed on rank 0: B S W e
// -- independent of the sequence length. Ring attention (Liu et al.) sends each rank's K/V block
// (T/p rows) p-1 times in the forward, and K/V plus their gradients p-1 times in the backward:
// 3 (p-1)/p B T W e, growing with T.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "comm/counting_communicator.h"
#include "comm/mpi_communicator.h"
#include "kernels/cpu/cpu_kernels.h"
#include "model/llama_model.h"

namespace {

using freqkv::FreqKVConfig;

double freqkv_bytes(const FreqKVConfig& f, int64_t p, int64_t width, int64_t elem, int64_t batch) {
  if (p < 2) return 0;
  // The busiest rank: rank 0 broadcasts the sinks to p - 1 ranks (counted at the root) and
  // sends one memory; a middle rank sends a memory and a memory gradient plus its sink gradient.
  const double memory = static_cast<double>(batch * f.compressed() * width * elem);
  const double sinks = static_cast<double>(batch * f.sink * width * elem);
  return std::max(memory + static_cast<double>(p - 1) * sinks, 2 * memory + sinks);
}

double ring_bytes(int64_t T, int64_t p, int64_t width, int64_t elem, int64_t batch) {
  return 3.0 * static_cast<double>(p - 1) / static_cast<double>(p) *
         static_cast<double>(batch * T * width * elem);
}

std::string human(double bytes) {
  char buf[32];
  if (bytes >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", bytes / 1e9);
  else if (bytes >= 1e6) std::snprintf(buf, sizeof buf, "%.2f MB", bytes / 1e6);
  else std::snprintf(buf, sizeof buf, "%.1f KB", bytes / 1e3);
  return buf;
}

void measured(freqkv::Communicator& world) {
  using namespace freqkv;
  ModelConfig c;
  c.vocab_size = 258;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  FreqKVConfig f;
  f.cache = 256;
  f.sink = 4;
  f.ratio = 0.5;
  const int64_t p = world.size(), width = 2 * c.num_key_value_heads * c.head_dim, batch = 2;
  if (world.rank() == 0)
    std::printf("measured on %lld ranks (fp32, hidden %lld, %lld KV heads x %lld, cache %lld, "
                "sink %lld, L %lld, batch %lld), bytes sent per layer by the busiest rank:\n"
                "%8s %14s %14s %10s %14s %8s\n",
                static_cast<long long>(p), static_cast<long long>(c.hidden_size),
                static_cast<long long>(c.num_key_value_heads), static_cast<long long>(c.head_dim),
                static_cast<long long>(f.cache), static_cast<long long>(f.sink),
                static_cast<long long>(f.compressed()), static_cast<long long>(batch), "tokens",
                "FreqKV meas.", "FreqKV formula", "ratio", "ring attention", "ring/FKV");
  for (int64_t T : {1024, 2048, 4096, 8192}) {
    CountingCommunicator counting(world);
    CpuKernels<float> k;
    ModelParallel parallel;
    parallel.sp = &counting;
    LlamaModel<float> model(c, f, k, LoraConfig(), parallel);
    model.init_random(1);
    const SequenceShard sh = model.sequence_shard(T);
    std::vector<int32_t> tokens(static_cast<size_t>(batch * sh.tokens));
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * 7 % 258);
    model.forward(tokens.data(), tokens.data(), batch, T, 1.0);
    model.backward();
    const double per_layer = counting.total_bytes() / static_cast<double>(c.num_hidden_layers);
    const double busiest = world.all_reduce_scalar(per_layer, freqkv::ReduceOp::kMax);
    const double formula = freqkv_bytes(f, p, width, 4, batch);
    const double ring = ring_bytes(T, p, width, 4, batch);
    if (world.rank() == 0)
      std::printf("%8lld %14s %14s %10.3f %14s %8.1f\n", static_cast<long long>(T),
                  human(busiest).c_str(), human(formula).c_str(), busiest / formula,
                  human(ring).c_str(), ring / busiest);
  }
}

void by_formula() {
  struct Shape {
    const char* name;
    int64_t kv_heads, head_dim;
  };
  const Shape shapes[] = {{"TinyLlama-1.1B", 4, 64}, {"LLaMA-2-7B", 32, 128}, {"LLaMA-3-8B", 8, 128}};
  FreqKVConfig f;  // the paper's C = 4096, S = 4, r = 0.5
  std::printf("\nby formula, bf16, FreqKV cache %lld / sink %lld / L %lld, one sequence, bytes per "
              "layer by the busiest rank (forward + backward):\n%-16s %4s %9s %12s %14s %10s\n",
              static_cast<long long>(f.cache), static_cast<long long>(f.sink),
              static_cast<long long>(f.compressed()), "model", "sp", "tokens", "FreqKV",
              "ring attention", "ring/FKV");
  for (const Shape& s : shapes)
    for (int64_t p : {4, 8})
      for (int64_t T : {32768, 131072, 262144}) {
        const int64_t width = 2 * s.kv_heads * s.head_dim;
        const double fk = freqkv_bytes(f, p, width, 2, 1), ring = ring_bytes(T, p, width, 2, 1);
        std::printf("%-16s %4lld %9lld %12s %14s %10.0f\n", s.name, static_cast<long long>(p),
                    static_cast<long long>(T), human(fk).c_str(), human(ring).c_str(), ring / fk);
      }
}

}  // namespace

int main(int argc, char** argv) {
  freqkv::MpiSession mpi(&argc, &argv);
  if (freqkv::MpiSession::world_size() > 1) {
    freqkv::MpiCommunicator world(MPI_COMM_WORLD, "world");
    measured(world);
    if (world.rank() != 0) return 0;
  }
  by_formula();
  return 0;
}
