// Row gathers and their adjoints: gather_rows / scatter_add_rows and the token embedding.
//
// The adjoints add many rows into one (a FreqKV sink row collects every chunk's gradient, a
// frequent token thousands of rows). Adding each into bf16 memory with atomics would round after
// every term and lose small terms once the sum is large, in an order that changes run to run.
// Instead the (destination, source row) pairs are sorted by destination on the device (a stable
// radix sort, so sources stay in row order), every destination's rows are summed in fp32 by one
// thread block and added to it once: one rounding, deterministic.
// Known limit: one block per destination row, so a destination with very many sources (a token
// repeated throughout the batch) is summed by a single block.
#include <climits>
#include <cub/device/device_radix_sort.cuh>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_launchers.cuh"

namespace freqkv::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void gather_rows_kernel(__nv_bfloat16* dst, int64_t ld_dst, const __nv_bfloat16* src,
                                   int64_t ld_src, const int64_t* map, int64_t n_rows,
                                   int64_t width) {
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t from = map[r];
    if (from < 0) continue;  // the row is left as it is
    const __nv_bfloat16* in = src + from * ld_src;
    __nv_bfloat16* out = dst + r * ld_dst;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) out[c] = in[c];
  }
}

__global__ void embedding_forward_kernel(__nv_bfloat16* out, const __nv_bfloat16* table,
                                         const int32_t* tokens, int64_t n_tokens, int64_t dim,
                                         DeviceErrorReport* report) {
  for (int64_t n = blockIdx.x; n < n_tokens; n += gridDim.x) {
    const int32_t token = tokens[n];
    if (token < 0) {
      if (threadIdx.x == 0)
        report_invalid_input(report, kNegativeTokenInEmbeddingForward, n, token, 0);
      continue;
    }
    const __nv_bfloat16* in = table + static_cast<int64_t>(token) * dim;
    __nv_bfloat16* row = out + n * dim;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) row[c] = in[c];
  }
}

__global__ void iota_kernel(int32_t* values, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    values[i] = static_cast<int32_t>(i);
  }
}

// keys[] sorted ascending, rows[] the source row of each key. The block at the first position of
// a run of equal keys sums that run's source rows (in order) and adds the sum to the destination.
// Negative keys are skipped; when negative_key_error is set the first one is reported.
template <typename Key>
__global__ void add_sorted_runs_kernel(__nv_bfloat16* dst, int64_t ld_dst, const __nv_bfloat16* src,
                                       int64_t ld_src, const Key* keys, const int32_t* rows,
                                       int64_t n, int64_t width, InvalidInput negative_key_error,
                                       DeviceErrorReport* report) {
  for (int64_t pos = blockIdx.x; pos < n; pos += gridDim.x) {
    const Key key = keys[pos];
    if (pos > 0 && keys[pos - 1] == key) continue;  // not the start of a run
    if (key < 0) {
      if (negative_key_error != kNoInvalidInput && pos == 0 && threadIdx.x == 0) {
        report_invalid_input(report, negative_key_error, rows[0], key, 0);
      }
      continue;
    }
    int64_t end = pos + 1;
    while (end < n && keys[end] == key) ++end;
    __nv_bfloat16* out = dst + static_cast<int64_t>(key) * ld_dst;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      float sum = 0.0f;
      for (int64_t e = pos; e < end; ++e) sum += __bfloat162float(src[rows[e] * ld_src + c]);
      out[c] = __float2bfloat16_rn(__bfloat162float(out[c]) + sum);
    }
  }
}

// dst[keys[r], :] += src[r, :] for keys[r] >= 0, through a sort by key (see the file comment).
template <typename Key>
void add_rows_by_key(const LaunchContext& ctx, __nv_bfloat16* dst, int64_t ld_dst,
                     const __nv_bfloat16* src, int64_t ld_src, const Key* keys, int64_t n_rows,
                     int64_t width, InvalidInput negative_key_error, const char* where) {
  if (n_rows <= 0 || width <= 0) return;
  if (n_rows > INT_MAX) {
    throw std::invalid_argument(std::string(where) + ": " + std::to_string(n_rows) +
                                " rows exceed the sort's int32 row indices");
  }
  const int n = static_cast<int>(n_rows);
  size_t sort_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys, static_cast<Key*>(nullptr),
                                             static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), n, 0,
                                             static_cast<int>(sizeof(Key) * 8), ctx.stream),
             "sizing the radix sort of row indices");
  ScratchBuffer sorted_keys(ctx, sizeof(Key) * n, where);
  ScratchBuffer rows_in(ctx, sizeof(int32_t) * n, where);
  ScratchBuffer rows_sorted(ctx, sizeof(int32_t) * n, where);
  ScratchBuffer sort_storage(ctx, sort_bytes, where);

  iota_kernel<<<grid_size(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(rows_in.as<int32_t>(), n);
  check_launch("iota_kernel");
  check_cuda(cub::DeviceRadixSort::SortPairs(sort_storage.as<void>(), sort_bytes, keys,
                                             sorted_keys.as<Key>(), rows_in.as<int32_t>(),
                                             rows_sorted.as<int32_t>(), n, 0,
                                             static_cast<int>(sizeof(Key) * 8), ctx.stream),
             "radix-sorting row indices by destination");
  add_sorted_runs_kernel<Key><<<row_grid_size(n), kThreads, 0, ctx.stream>>>(
      dst, ld_dst, src, ld_src, sorted_keys.as<Key>(), rows_sorted.as<int32_t>(), n, width,
      negative_key_error, ctx.error_report);
  check_launch("add_sorted_runs_kernel");
}

}  // namespace

void gather_rows(const LaunchContext& ctx, __nv_bfloat16* dst, int64_t ld_dst,
                 const __nv_bfloat16* src, int64_t ld_src, const int64_t* map, int64_t n_rows,
                 int64_t width) {
  if (n_rows <= 0 || width <= 0) return;
  gather_rows_kernel<<<row_grid_size(n_rows), kThreads, 0, ctx.stream>>>(dst, ld_dst, src, ld_src,
                                                                         map, n_rows, width);
  check_launch("gather_rows_kernel");
}

void scatter_add_rows(const LaunchContext& ctx, __nv_bfloat16* dsrc, int64_t ld_src,
                      const __nv_bfloat16* ddst, int64_t ld_dst, const int64_t* map, int64_t n_rows,
                      int64_t width) {
  add_rows_by_key<int64_t>(ctx, dsrc, ld_src, ddst, ld_dst, map, n_rows, width, kNoInvalidInput,
                           "scatter_add_rows");
}

void embedding_forward(const LaunchContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* table,
                       const int32_t* tokens, int64_t n_tokens, int64_t dim) {
  if (n_tokens <= 0 || dim <= 0) return;
  embedding_forward_kernel<<<row_grid_size(n_tokens), kThreads, 0, ctx.stream>>>(
      out, table, tokens, n_tokens, dim, ctx.error_report);
  check_launch("embedding_forward_kernel");
}

void embedding_backward(const LaunchContext& ctx, __nv_bfloat16* dtable, const __nv_bfloat16* dout,
                        const int32_t* tokens, int64_t n_tokens, int64_t dim) {
  add_rows_by_key<int32_t>(ctx, dtable, dim, dout, dim, tokens, n_tokens, dim,
                           kNegativeTokenInEmbeddingBackward, "embedding_backward");
}

}  // namespace freqkv::cuda
