// CUDA emulation (tests/cuda_emulation): cub::DeviceRadixSort::SortPairs with cub's signature and
// documented semantics, on the host.
//
//   * Two phases: with d_temp_storage == nullptr only temp_storage_bytes is written (always > 0)
//     and nothing else is touched; a later call with storage smaller than that returns
//     cudaErrorInvalidValue, as cub does.
//   * A stable ascending sort by the key bits [begin_bit, end_bit) after cub's bit-wise
//     transformation: unsigned keys as they are, signed keys with the sign bit inverted (so with
//     the full bit range negative keys come first). The transformation precedes the bit-range
//     truncation, as documented.
//   * The input is not altered. cub requires that no two of the four ranges overlap; the
//     emulation checks that (and that the temporary storage overlaps none of them) and returns
//     cudaErrorInvalidValue instead of sorting garbage, as it does for a bit range outside the key
//     or a negative item count.
//   * The temporary storage is really used (it holds the permutation), so storage that is too
//     small for the size reported, or freed, shows under a sanitizer.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <type_traits>

namespace cub {

namespace emulation_detail {

inline bool ranges_overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

inline cudaError_t reject(const char* why) {
  std::cerr << "cub emulator: cub::DeviceRadixSort::SortPairs: " << why << "\n";
  return cudaErrorInvalidValue;
}

// The storage one call needs: the permutation (one 64-bit index per item) plus cub-like slack,
// so that the size is positive even for zero items.
inline size_t temp_storage_bytes_for(size_t num_items) {
  return 256 + num_items * sizeof(uint64_t);
}

}  // namespace emulation_detail

struct DeviceRadixSort {
  template <typename KeyT, typename ValueT, typename NumItemsT>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes,
                               const KeyT* d_keys_in, KeyT* d_keys_out, const ValueT* d_values_in,
                               ValueT* d_values_out, NumItemsT num_items, int begin_bit = 0,
                               int end_bit = sizeof(KeyT) * 8, cudaStream_t stream = 0) {
    static_assert(std::is_integral<KeyT>::value && !std::is_same<KeyT, bool>::value,
                  "the emulated cub::DeviceRadixSort sorts integer keys only");
    static_assert(std::is_integral<NumItemsT>::value, "num_items must be an integer");
    static_assert(std::is_trivially_copyable<ValueT>::value, "values are copied as bytes");
    namespace detail = emulation_detail;
    using Bits = typename std::make_unsigned<KeyT>::type;
    constexpr int kKeyBits = static_cast<int>(sizeof(KeyT) * 8);

    if constexpr (std::is_signed<NumItemsT>::value) {
      if (num_items < 0) return detail::reject("num_items is negative");
    }
    const auto n = static_cast<size_t>(num_items);
    const size_t required = detail::temp_storage_bytes_for(n);
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = required;
      return cudaSuccess;
    }
    if (temp_storage_bytes < required) {
      return detail::reject("temp_storage_bytes is smaller than the size the sizing call reported");
    }
    if (begin_bit < 0 || end_bit > kKeyBits || begin_bit > end_bit) {
      return detail::reject("the bit range [begin_bit, end_bit) is not within the key's bits");
    }
    if (n == 0) return cudaSuccess;
    if (d_keys_in == nullptr || d_keys_out == nullptr || d_values_in == nullptr ||
        d_values_out == nullptr) {
      return detail::reject("a key or value pointer is null");
    }
    const size_t key_bytes = n * sizeof(KeyT), value_bytes = n * sizeof(ValueT);
    const struct {
      const void* p;
      size_t bytes;
    } ranges[5] = {{d_keys_in, key_bytes},
                   {d_keys_out, key_bytes},
                   {d_values_in, value_bytes},
                   {d_values_out, value_bytes},
                   {d_temp_storage, required}};
    for (int i = 0; i < 5; ++i) {
      for (int j = i + 1; j < 5; ++j) {
        if (detail::ranges_overlap(ranges[i].p, ranges[i].bytes, ranges[j].p, ranges[j].bytes)) {
          return detail::reject(
              "the key, value and temporary storage ranges overlap (cub sorts out of place)");
        }
      }
    }
    if (reinterpret_cast<uintptr_t>(d_temp_storage) % alignof(uint64_t) != 0) {
      return detail::reject("d_temp_storage is not aligned for the sort's indices");
    }

    // Runs in stream order, as the GPU's sort.
    emu::enqueue(stream, [=]() {
      const int width = end_bit - begin_bit;
      const Bits mask =
          width >= kKeyBits ? static_cast<Bits>(~Bits{0}) : static_cast<Bits>((Bits{1} << width) - 1);
      const auto digit = [&](size_t i) -> Bits {
        Bits bits = static_cast<Bits>(d_keys_in[i]);
        if constexpr (std::is_signed<KeyT>::value) {
          bits = static_cast<Bits>(bits ^ static_cast<Bits>(Bits{1} << (kKeyBits - 1)));
        }
        return width == 0 ? Bits{0} : static_cast<Bits>((bits >> begin_bit) & mask);
      };
      uint64_t* order = static_cast<uint64_t*>(d_temp_storage);
      for (size_t i = 0; i < n; ++i) order[i] = i;
      std::stable_sort(order, order + n, [&](uint64_t a, uint64_t b) { return digit(a) < digit(b); });
      for (size_t i = 0; i < n; ++i) {
        d_keys_out[i] = d_keys_in[order[i]];
        std::memcpy(static_cast<void*>(d_values_out + i),
                    static_cast<const void*>(d_values_in + order[i]), sizeof(ValueT));
      }
    });
    return cudaSuccess;
  }
};

}  // namespace cub
