// CUDA emulation (tests/cuda_emulation): nvcuda::wmma on the SIMT emulator. Each lane holds
// num_elements elements of a fragment, as on the GPU; WHICH elements is unspecified by CUDA, and
// here it is a fixed pseudo-random permutation per fragment use (matrix_a, matrix_b,
// accumulator), so kernels that assume a layout give wrong results instead of passing by luck.
// Every operation is warp-synchronous: load and store wait for all lanes on entry; mma exchanges
// the lanes' elements (simt.h, warp_exchange) and the last lane to arrive computes the product.
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

namespace detail {

// One lane's part of an mma_sync: its elements of A, B and C; after the exchange, of D.
template <typename Tab, typename Tc, int NA, int NB, int NC>
struct MmaRow {
  Tab a[NA];
  Tab b[NB];
  Tc c[NC];
};

// D = A B + C for the whole warp, once, from every lane's row of the exchange table; D replaces
// the C elements in each lane's row.
template <typename A, typename B, typename C, int M, int N, int K>
void mma_combine(unsigned char* table) {
  using Row = MmaRow<typename A::element_type, typename C::element_type, A::num_elements,
                     B::num_elements, C::num_elements>;
  const auto row = [table](int lane) {
    return reinterpret_cast<Row*>(table + lane * ::emu::kExchangeBytes);
  };
  float a[M][K], b[K][N];
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < A::num_elements; ++e) {
      int r, c;
      A::position(lane, e, r, c);
      a[r][c] = static_cast<float>(row(lane)->a[e]);
    }
    for (int e = 0; e < B::num_elements; ++e) {
      int r, c;
      B::position(lane, e, r, c);
      b[r][c] = static_cast<float>(row(lane)->b[e]);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < C::num_elements; ++e) {
      int r, col;
      C::position(lane, e, r, col);
      float sum = static_cast<float>(row(lane)->c[e]);
      for (int k = 0; k < K; ++k) sum += a[r][k] * b[k][col];
      row(lane)->c[e] = static_cast<typename C::element_type>(sum);
    }
  }
}

}  // namespace detail

// d = a b + c (d may be c).
template <int M, int N, int K, typename Tab, typename La, typename Lb, typename Tc>
void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Tab, La>& a,
              const fragment<matrix_b, M, N, K, Tab, Lb>& b,
              const fragment<accumulator, M, N, K, Tc>& c) {
  using A = fragment<matrix_a, M, N, K, Tab, La>;
  using B = fragment<matrix_b, M, N, K, Tab, Lb>;
  using C = fragment<accumulator, M, N, K, Tc>;
  using Row = detail::MmaRow<Tab, Tc, A::num_elements, B::num_elements, C::num_elements>;
  static_assert(sizeof(Row) <= ::emu::kExchangeBytes, "a lane's operands fit the exchange");
  Row mine;
  for (int e = 0; e < A::num_elements; ++e) mine.a[e] = a.x[e];
  for (int e = 0; e < B::num_elements; ++e) mine.b[e] = b.x[e];
  for (int e = 0; e < C::num_elements; ++e) mine.c[e] = c.x[e];
  const unsigned char* table =
      ::emu::warp_exchange(&mine, sizeof(mine), &detail::mma_combine<A, B, C, M, N, K>);
  const Row* result =
      reinterpret_cast<const Row*>(table + ::emu::current_thread().lane * ::emu::kExchangeBytes);
  for (int e = 0; e < C::num_elements; ++e) d.x[e] = result->c[e];
}

}  // namespace wmma
}  // namespace nvcuda
