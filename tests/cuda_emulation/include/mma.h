// CUDA emulation (tests/cuda_emulation): nvcuda::wmma on the SIMT emulator. Each lane holds
// num_elements elements of a fragment, as on the GPU; WHICH elements is unspecified by CUDA, and
// here it is a fixed pseudo-random permutation per fragment use (matrix_a, matrix_b,
// accumulator), so kernels that assume a layout give wrong results instead of passing by luck.
// Every operation is warp-synchronous: it waits for all lanes (load, store and mma on entry; mma
// also on exit, because other lanes read this lane's operands through the exchange pointers).
// Products are accumulated in fp32 in k order.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#include "cuda_bf16.h"
#include "simt.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

// Rows and columns of the logical matrix a fragment holds.
template <typename Use, int M, int N, int K>
struct Extent;
template <int M, int N, int K>
struct Extent<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
  static constexpr uint32_t salt = 0x9e3779b9u;
};
template <int M, int N, int K>
struct Extent<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
  static constexpr uint32_t salt = 0x85ebca6bu;
};
template <int M, int N, int K>
struct Extent<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
  static constexpr uint32_t salt = 0xc2b2ae35u;
};

// slot_of[position] and position_of[slot]: position = row * cols + col of the logical matrix,
// slot = lane * num_elements + element.
template <int Size>
struct Permutation {
  std::array<int, Size> slot_of;
  std::array<int, Size> position_of;
  explicit Permutation(uint32_t seed) {
    for (int i = 0; i < Size; ++i) slot_of[i] = i;
    uint32_t state = seed;
    for (int i = Size - 1; i > 0; --i) {  // Fisher-Yates with a xorshift generator
      state ^= state << 13;
      state ^= state >> 17;
      state ^= state << 5;
      const int j = static_cast<int>(state % static_cast<uint32_t>(i + 1));
      std::swap(slot_of[i], slot_of[j]);
    }
    for (int p = 0; p < Size; ++p) position_of[slot_of[p]] = p;
  }
};

template <typename Use, int M, int N, int K>
const Permutation<Extent<Use, M, N, K>::rows * Extent<Use, M, N, K>::cols>& permutation() {
  static const Permutation<Extent<Use, M, N, K>::rows * Extent<Use, M, N, K>::cols> table(
      Extent<Use, M, N, K>::salt ^ static_cast<uint32_t>(M * 131 + N * 17 + K));
  return table;
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  using element_type = T;
  static constexpr int rows = detail::Extent<Use, M, N, K>::rows;
  static constexpr int cols = detail::Extent<Use, M, N, K>::cols;
  static_assert((rows * cols) % 32 == 0, "a fragment spreads evenly over the 32 lanes");
  static constexpr int num_elements = rows * cols / 32;
  T x[num_elements];

  // The (row, column) of this lane's element e.
  static void position(int lane, int e, int& row, int& col) {
    const int p = detail::permutation<Use, M, N, K>().position_of[lane * num_elements + e];
    row = p / cols;
    col = p % cols;
  }
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = static_cast<T>(value);
}

// matrix_a / matrix_b from memory laid out as the fragment's Layout says.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "matrix_a and matrix_b fragments carry their memory layout");
  ::emu::sync_warp();
  const int lane = ::emu::current_thread().lane;
  for (int e = 0; e < f.num_elements; ++e) {
    int r, c;
    f.position(lane, e, r, c);
    f.x[e] = std::is_same<Layout, row_major>::value ? p[static_cast<size_t>(r) * ldm + c]
                                                    : p[static_cast<size_t>(c) * ldm + r];
  }
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                      layout_t layout) {
  ::emu::sync_warp();
  const int lane = ::emu::current_thread().lane;
  for (int e = 0; e < f.num_elements; ++e) {
    int r, c;
    f.position(lane, e, r, c);
    f.x[e] = layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c]
                                     : p[static_cast<size_t>(c) * ldm + r];
  }
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  ::emu::sync_warp();
  const int lane = ::emu::current_thread().lane;
  for (int e = 0; e < f.num_elements; ++e) {
    int r, c;
    f.position(lane, e, r, c);
    (layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c]
                             : p[static_cast<size_t>(c) * ldm + r]) = f.x[e];
  }
}

// d = a b + c (d may be c).
template <int M, int N, int K, typename Tab, typename La, typename Lb, typename Tc>
void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Tab, La>& a,
              const fragment<matrix_b, M, N, K, Tab, Lb>& b,
              const fragment<accumulator, M, N, K, Tc>& c) {
  using A = fragment<matrix_a, M, N, K, Tab, La>;
  using B = fragment<matrix_b, M, N, K, Tab, Lb>;
  const int lane = ::emu::current_thread().lane;
  ::emu::sync_warp();  // the exchange pointers of an earlier operation are no longer read
  ::emu::warp_pointers(lane)[0] = &a;
  ::emu::warp_pointers(lane)[1] = &b;
  ::emu::sync_warp();
  const auto& perm_a = detail::permutation<matrix_a, M, N, K>();
  const auto& perm_b = detail::permutation<matrix_b, M, N, K>();
  Tc result[fragment<accumulator, M, N, K, Tc>::num_elements];
  for (int e = 0; e < d.num_elements; ++e) {
    int r, col;
    d.position(lane, e, r, col);
    float sum = static_cast<float>(c.x[e]);
    for (int k = 0; k < K; ++k) {
      const int slot_a = perm_a.slot_of[r * K + k];
      const int slot_b = perm_b.slot_of[k * N + col];
      const A* owner_a = static_cast<const A*>(::emu::warp_pointers(slot_a / A::num_elements)[0]);
      const B* owner_b = static_cast<const B*>(::emu::warp_pointers(slot_b / B::num_elements)[1]);
      sum += static_cast<float>(owner_a->x[slot_a % A::num_elements]) *
             static_cast<float>(owner_b->x[slot_b % B::num_elements]);
    }
    result[e] = static_cast<Tc>(sum);
  }
  ::emu::sync_warp();  // every lane has read the operands of every other lane
  for (int e = 0; e < d.num_elements; ++e) d.x[e] = result[e];
}

}  // namespace wmma
}  // namespace nvcuda
