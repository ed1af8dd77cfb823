// The emulated cuBLAS, cuBLASLt and cuFFT (include/cublas_v2.h, include/cublasLt.h,
// include/cufft.h; cub's radix sort is header-only in include/cub/device/device_radix_sort.cuh).
//
// They implement the libraries' documented semantics, not what kernels/cuda happens to need, so
// the CUDA backend's calls are checked independently: arguments are validated as the
// documentation states (a rejected call returns the documented status and prints the reason to
// stderr, naming the call and the values at fault), results are computed by textbook methods of
// known accuracy (the DFT by FFTs in double: radix-2 for powers of two, Bluestein's chirp-z for
// other lengths; GEMM products by BLAS in fp32), and what the real libraries are allowed to do to
// memory (overwrite workspaces, overwrite a complex-to-real transform's input) they do here too,
// so a caller that relies on it not happening fails. Where the emulation is stricter than a GPU
// (it rejects overlapping outputs and inputs that a GPU would silently turn into garbage) the
// comments say so.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cufft.h>
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

// ---- the handles' state (the real headers declare these as opaque, in the global namespace) ----

struct cublasContext {
  cudaStream_t stream = nullptr;
  // Null: the library's own workspace pool (cublasCreate, and again after cublasSetStream).
  void* user_workspace = nullptr;
  size_t user_workspace_bytes = 0;
  bool has_user_workspace = false;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};

struct cublasLtContext {
  int unused = 0;  // cuBLASLt handles carry no state the emulation needs
};

namespace {

// ---- small helpers ------------------------------------------------------------------------------

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even; NaN stays NaN (the quiet bit is set so that truncating the mantissa
// cannot turn it into infinity).
uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

bool ranges_overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a == nullptr || b == nullptr || a_bytes == 0 || b_bytes == 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

// The largest power of two dividing the address, at most 256.
uint32_t address_alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 1;
  while (alignment < 256 && (address & alignment) == 0) alignment *= 2;
  return alignment;
}

bool is_power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

size_t element_bytes(cudaDataType type) {
  switch (type) {
    case CUDA_R_16BF: return 2;
    case CUDA_R_32F: return 4;
    default: return 0;
  }
}

const char* type_name(int type) {
  switch (type) {
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_64F: return "CUDA_R_64F";
    case CUDA_R_16F: return "CUDA_R_16F";
    case CUDA_C_32F: return "CUDA_C_32F";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    default: return "an unrecognised cudaDataType";
  }
}

// A set of elements in memory: base + (i inner_stride + j outer_stride) element bytes for
// i < inner_count, j < outer_count. A column-major matrix (rows, 1, cols, ld), a batch of strided
// transforms (count, stride, batch, dist) or a plain byte range.
struct Elements {
  const void* base = nullptr;
  int64_t inner_count = 0, inner_stride = 1, outer_count = 0, outer_stride = 0;
  size_t element = 1;

  size_t span_bytes() const {
    if (base == nullptr || inner_count <= 0 || outer_count <= 0) return 0;
    return static_cast<size_t>((inner_count - 1) * inner_stride + (outer_count - 1) * outer_stride +
                               1) *
           element;
  }
  // Calls f(first byte, byte count) for each contiguous run of the set.
  template <typename F>
  void for_each_run(F&& f) const {
    const auto start = reinterpret_cast<uintptr_t>(base);
    for (int64_t j = 0; j < outer_count; ++j) {
      if (inner_stride == 1) {
        f(start + static_cast<uintptr_t>(j * outer_stride) * element,
          static_cast<size_t>(inner_count) * element);
        continue;
      }
      for (int64_t i = 0; i < inner_count; ++i) {
        f(start + static_cast<uintptr_t>(i * inner_stride + j * outer_stride) * element, element);
      }
    }
  }
};

Elements matrix_elements(const void* p, int64_t rows, int64_t cols, int64_t ld, size_t element) {
  return {p, rows, 1, cols, ld, element};
}

Elements byte_range(const void* p, size_t bytes) {
  return {p, static_cast<int64_t>(bytes), 1, 1, 0, 1};
}

// Whether two sets share a byte. Exact, not by bounding ranges: the two column halves of one
// row-major buffer (k and v side by side) interleave without overlapping, and a GEMM may read one
// while writing the other.
bool elements_overlap(const Elements& a, const Elements& b) {
  const size_t a_bytes = a.span_bytes(), b_bytes = b.span_bytes();
  if (!ranges_overlap(a.base, a_bytes, b.base, b_bytes)) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a.base), b0 = reinterpret_cast<uintptr_t>(b.base);
  const uintptr_t lo = std::max(a0, b0), hi = std::min(a0 + a_bytes, b0 + b_bytes);
  std::vector<bool> marked(hi - lo, false);
  a.for_each_run([&](uintptr_t first, size_t count) {
    const uintptr_t from = std::max(first, lo), to = std::min(first + count, hi);
    for (uintptr_t byte = from; byte < to; ++byte) marked[byte - lo] = true;
  });
  bool shared = false;
  b.for_each_run([&](uintptr_t first, size_t count) {
    const uintptr_t from = std::max(first, lo), to = std::min(first + count, hi);
    for (uintptr_t byte = from; byte < to && !shared; ++byte) shared = marked[byte - lo];
  });
  return shared;
}

std::string describe_pointer(const void* p) {
  std::ostringstream out;
  out << p;
  return out.str();
}

// A set of live objects of one kind, owned here; lookups of anything else (a destroyed or a
// made-up handle) return nullptr instead of touching freed memory.
template <typename T>
class Registry {
 public:
  T* add(std::unique_ptr<T> object) {
    std::lock_guard<std::mutex> lock(mutex_);
    T* raw = object.get();
    objects_[raw] = std::move(object);
    return raw;
  }
  T* find(const void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = objects_.find(p);
    return it == objects_.end() ? nullptr : it->second.get();
  }
  bool remove(const void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    return objects_.erase(p) == 1;
  }

 private:
  std::mutex mutex_;
  std::map<const void*, std::unique_ptr<T>> objects_;
};

// ---- the GEMM both cuBLAS and cuBLASLt run ------------------------------------------------------

struct Gemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  const void* C = nullptr;
  int64_t ldc = 0;
  void* D = nullptr;
  int64_t ldd = 0;
  cudaDataType ab_type = CUDA_R_16BF;  // A and B
  cudaDataType cd_type = CUDA_R_16BF;  // C and D
  float alpha = 1.0f, beta = 0.0f;
};

float load(const void* base, cudaDataType type, int64_t index) {
  if (type == CUDA_R_16BF) return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  return static_cast<const float*>(base)[index];
}

void store(void* base, cudaDataType type, int64_t index, float value) {
  if (type == CUDA_R_16BF) {
    static_cast<uint16_t*>(base)[index] = float_to_bf16(value);
  } else {
    static_cast<float*>(base)[index] = value;
  }
}

// Column-major D = alpha op(A) op(B) + beta C, arguments already validated. The product
// accumulates in fp32 (BLAS), alpha and beta apply in double, and the result is rounded once to
// float, then to D's type. As reference BLAS: alpha == 0 or k == 0 reads neither A nor B, beta == 0 does not read C.
// Each element of C is read before the same element of D is written, so C == D works.
void run_gemm(const Gemm& g) {
  const bool product = g.alpha != 0.0f && g.k > 0;
  std::vector<float> a_rows, b_cols;  // op(A) row by row, op(B) column by column: unit stride
  if (product) {
    a_rows.resize(static_cast<size_t>(g.m * g.k));
    b_cols.resize(static_cast<size_t>(g.n * g.k));
    for (int64_t i = 0; i < g.m; ++i) {
      for (int64_t l = 0; l < g.k; ++l) {
        a_rows[i * g.k + l] = load(g.A, g.ab_type, g.trans_a ? l + i * g.lda : i + l * g.lda);
      }
    }
    for (int64_t j = 0; j < g.n; ++j) {
      for (int64_t l = 0; l < g.k; ++l) {
        b_cols[j * g.k + l] = load(g.B, g.ab_type, g.trans_b ? j + l * g.ldb : l + j * g.ldb);
      }
    }
  }
  // The product in fp32 by BLAS (cuBLAS's COMPUTE_32F accumulates in fp32 too): the emulated
  // backend's tests run GEMMs of billions of multiply-adds.
  std::vector<float> ab;
  if (product) {
    ab.resize(static_cast<size_t>(g.m * g.n));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(g.m),
                static_cast<int>(g.n), static_cast<int>(g.k), 1.0f, a_rows.data(),
                static_cast<int>(g.k), b_cols.data(), static_cast<int>(g.k), 0.0f, ab.data(),
                static_cast<int>(g.n));
  }
  for (int64_t j = 0; j < g.n; ++j) {
    for (int64_t i = 0; i < g.m; ++i) {
      double result = product ? static_cast<double>(g.alpha) * ab[i * g.n + j] : 0.0;
      if (g.beta != 0.0f) {
        result += static_cast<double>(g.beta) * load(g.C, g.cd_type, i + j * g.ldc);
      }
      store(g.D, g.cd_type, i + j * g.ldd, static_cast<float>(result));
    }
  }
}

// ---- cuBLAS -------------------------------------------------------------------------------------

Registry<cublasContext>& blas_handles() {
  static Registry<cublasContext> registry;
  return registry;
}

// How much of a user workspace a GEMM "uses" (overwrites): enough to expose a workspace that
// overlaps live data, cheap enough to do on every call.
constexpr size_t kGemmExWorkspaceUse = size_t{64} << 10;

cublasStatus_t blas_fail(cublasStatus_t status, const char* call, const std::string& why) {
  std::cerr << "cuBLAS emulator: " << call << " returns " << cublasGetStatusName(status) << ": "
            << why << "\n";
  return status;
}

const char* op_name(int op) {
  switch (op) {
    case CUBLAS_OP_N: return "CUBLAS_OP_N";
    case CUBLAS_OP_T: return "CUBLAS_OP_T";
    case CUBLAS_OP_C: return "CUBLAS_OP_C";
    default: return "an unrecognised cublasOperation_t";
  }
}

// For real data CUBLAS_OP_C is the transpose.
bool valid_op(int op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

bool known_compute_type(int type) {
  switch (type) {
    case CUBLAS_COMPUTE_16F:
    case CUBLAS_COMPUTE_16F_PEDANTIC:
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
    case CUBLAS_COMPUTE_32F_FAST_16F:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
    case CUBLAS_COMPUTE_32F_FAST_TF32:
    case CUBLAS_COMPUTE_32F_EMULATED_16BFX9:
    case CUBLAS_COMPUTE_64F:
    case CUBLAS_COMPUTE_64F_PEDANTIC:
    case CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT:
    case CUBLAS_COMPUTE_32I:
    case CUBLAS_COMPUTE_32I_PEDANTIC: return true;
    default: return false;
  }
}

bool emulated_compute_type(int type) {
  return type == CUBLAS_COMPUTE_32F || type == CUBLAS_COMPUTE_32F_PEDANTIC;
}

// The (A/B, C/D) type pairs the emulated GEMMs run with compute type 32F, all of which cuBLAS
// supports with that compute type.
bool emulated_types(int ab_type, int cd_type) {
  return (ab_type == CUDA_R_16BF && (cd_type == CUDA_R_16BF || cd_type == CUDA_R_32F)) ||
         (ab_type == CUDA_R_32F && cd_type == CUDA_R_32F);
}

bool known_gemm_algo(int algo) {
  return algo == CUBLAS_GEMM_DEFAULT || (algo >= CUBLAS_GEMM_ALGO0 && algo <= CUBLAS_GEMM_ALGO23) ||
         (algo >= CUBLAS_GEMM_DEFAULT_TENSOR_OP && algo <= CUBLAS_GEMM_ALGO15_TENSOR_OP) ||
         algo == CUBLAS_GEMM_AUTOTUNE;
}

std::string ld_rule(const char* ld, int64_t value, const char* op, const char* dim,
                    int64_t dim_value) {
  return std::string(ld) + " = " + std::to_string(value) + " < max(1, " + dim + " = " +
         std::to_string(dim_value) + ") (" + op + ")";
}

// ---- cuBLASLt -----------------------------------------------------------------------------------

struct LtMatmulDesc {
  int32_t compute_type;
  int32_t scale_type;
  int32_t pointer_mode = CUBLASLT_POINTER_MODE_HOST;
  int32_t trans_a = CUBLAS_OP_N;
  int32_t trans_b = CUBLAS_OP_N;
  int32_t trans_c = CUBLAS_OP_N;
  int32_t fill_mode = CUBLAS_FILL_MODE_FULL;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
};

struct LtLayout {
  uint32_t type;
  int32_t order = CUBLASLT_ORDER_COL;
  uint64_t rows;
  uint64_t cols;
  int64_t ld;
  int32_t batch_count = 1;
  int64_t batch_offset = 0;
  int64_t plane_offset = 0;
  uint32_t batch_mode = CUBLASLT_BATCH_MODE_STRIDED;
};

struct LtPreference {
  uint32_t search_mode = CUBLASLT_SEARCH_BEST_FIT;
  uint64_t max_workspace_bytes = 0;
  uint32_t reduction_scheme_mask = CUBLASLT_REDUCTION_SCHEME_MASK;
  uint32_t min_alignment[4] = {256, 256, 256, 256};  // A, B, C, D
  float max_waves_count = 0.0f;
  uint64_t impl_mask = ~uint64_t{0};
};

Registry<cublasLtContext>& lt_handles() {
  static Registry<cublasLtContext> registry;
  return registry;
}
Registry<LtMatmulDesc>& lt_descs() {
  static Registry<LtMatmulDesc> registry;
  return registry;
}
Registry<LtLayout>& lt_layouts() {
  static Registry<LtLayout> registry;
  return registry;
}
Registry<LtPreference>& lt_preferences() {
  static Registry<LtPreference> registry;
  return registry;
}

// The workspace an emulated algorithm asks for (split-K style scratch), capped by what the
// preference allows; the matmul overwrites it.
constexpr uint64_t kLtWorkspaceUse = uint64_t{1} << 20;
constexpr uint64_t kAlgoMagic = 0x656d754c74416c67ull;  // "emuLtAlg"

// cublasLtMatmulAlgo_t::data: [0] magic, [1] alignment of A | B << 32, [2] C | D << 32,
// [3] workspace bytes, [4] the problem's fingerprint.
struct AlgoInfo {
  uint32_t alignment[4];
  uint64_t workspace_bytes;
  uint64_t fingerprint;
};

cublasLtMatmulAlgo_t encode_algo(const AlgoInfo& info) {
  cublasLtMatmulAlgo_t algo{};
  algo.data[0] = kAlgoMagic;
  algo.data[1] = info.alignment[0] | (static_cast<uint64_t>(info.alignment[1]) << 32);
  algo.data[2] = info.alignment[2] | (static_cast<uint64_t>(info.alignment[3]) << 32);
  algo.data[3] = info.workspace_bytes;
  algo.data[4] = info.fingerprint;
  return algo;
}

bool decode_algo(const cublasLtMatmulAlgo_t& algo, AlgoInfo* info) {
  if (algo.data[0] != kAlgoMagic) return false;
  info->alignment[0] = static_cast<uint32_t>(algo.data[1]);
  info->alignment[1] = static_cast<uint32_t>(algo.data[1] >> 32);
  info->alignment[2] = static_cast<uint32_t>(algo.data[2]);
  info->alignment[3] = static_cast<uint32_t>(algo.data[2] >> 32);
  info->workspace_bytes = algo.data[3];
  info->fingerprint = algo.data[4];
  return true;
}

cublasStatus_t lt_fail(cublasStatus_t status, const char* call, const std::string& why) {
  std::cerr << "cuBLASLt emulator: " << call << " returns " << cublasLtGetStatusName(status) << ": "
            << why << "\n";
  return status;
}

// Reads and writes one attribute as the real Set/GetAttribute do: the size must be exactly the
// attribute's.
template <typename Field>
cublasStatus_t set_attribute(Field& field, const void* buf, size_t size, const char* call,
                             const char* attribute) {
  if (buf == nullptr)
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call, std::string(attribute) + ": buf is null");
  if (size != sizeof(Field)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   std::string(attribute) + ": sizeInBytes = " + std::to_string(size) +
                       ", the attribute holds " + std::to_string(sizeof(Field)) + " bytes");
  }
  std::memcpy(&field, buf, sizeof(Field));
  return CUBLAS_STATUS_SUCCESS;
}

template <typename Field>
cublasStatus_t get_attribute(const Field& field, void* buf, size_t size, size_t* written,
                             const char* call, const char* attribute) {
  if (size == 0) {
    if (written == nullptr) {
      return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     std::string(attribute) + ": sizeInBytes = 0 and sizeWritten is null");
    }
    *written = sizeof(Field);
    return CUBLAS_STATUS_SUCCESS;
  }
  if (buf == nullptr || size != sizeof(Field)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   std::string(attribute) + ": sizeInBytes = " + std::to_string(size) + " (buf " +
                       (buf == nullptr ? "null" : "set") + "), the attribute holds " +
                       std::to_string(sizeof(Field)) + " bytes");
  }
  std::memcpy(buf, &field, sizeof(Field));
  if (written != nullptr) *written = sizeof(Field);
  return CUBLAS_STATUS_SUCCESS;
}

// A problem as the descriptors state it.
struct LtProblem {
  Gemm gemm;  // sizes, transposes, leading dimensions and types; no pointers yet
  uint64_t fingerprint = 0;
};

enum class Verdict { kOk, kConflict, kUnsupported };

struct LtCheck {
  Verdict verdict = Verdict::kOk;
  std::string why;
};

LtCheck conflict(std::string why) { return {Verdict::kConflict, std::move(why)}; }
LtCheck unsupported(std::string why) { return {Verdict::kUnsupported, std::move(why)}; }

std::string layout_text(const char* name, const LtLayout& l) {
  return std::string(name) + " is " + std::to_string(l.rows) + " x " + std::to_string(l.cols) +
         " (ld " + std::to_string(l.ld) + ", " + type_name(static_cast<int>(l.type)) + ")";
}

uint64_t fnv1a(uint64_t hash, int64_t value) {
  for (int byte = 0; byte < 8; ++byte) {
    hash ^= static_cast<uint64_t>(value >> (8 * byte)) & 0xffu;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

// Everything the heuristic and the matmul require of the descriptors. A conflict (shapes that do
// not fit together, leading dimensions too small) is an invalid problem; anything outside what
// the emulation implements is unsupported.
LtCheck check_lt_problem(const LtMatmulDesc& desc, const LtLayout& a, const LtLayout& b,
                         const LtLayout& c, const LtLayout& d, LtProblem* problem) {
  if (!emulated_compute_type(desc.compute_type)) {
    return unsupported("compute type " + std::to_string(desc.compute_type) +
                       " (emulated: CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC)");
  }
  if (desc.scale_type != CUDA_R_32F) {
    return unsupported(std::string("scale type ") + type_name(desc.scale_type) +
                       " (compute type 32F scales in CUDA_R_32F)");
  }
  if (desc.pointer_mode != CUBLASLT_POINTER_MODE_HOST &&
      desc.pointer_mode != CUBLASLT_POINTER_MODE_DEVICE) {
    return unsupported("pointer mode " + std::to_string(desc.pointer_mode) +
                       " (emulated: single alpha and beta values)");
  }
  if (desc.trans_c != CUBLAS_OP_N) return unsupported("TRANSC must be CUBLAS_OP_N");
  if (desc.fill_mode != CUBLAS_FILL_MODE_FULL) return unsupported("fill mode other than FULL");
  if (desc.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    return unsupported("epilogue " + std::to_string(desc.epilogue) + " (emulated: DEFAULT)");
  }
  const struct {
    const char* name;
    const LtLayout* layout;
  } layouts[4] = {{"A", &a}, {"B", &b}, {"C", &c}, {"D", &d}};
  for (const auto& entry : layouts) {
    const LtLayout& l = *entry.layout;
    if (l.order != CUBLASLT_ORDER_COL) {
      return unsupported(std::string(entry.name) + ": order " + std::to_string(l.order) +
                         " (emulated: CUBLASLT_ORDER_COL)");
    }
    if (l.batch_count != 1 || l.plane_offset != 0) {
      return unsupported(std::string(entry.name) +
                         ": batched or planar-complex layouts are not emulated");
    }
    if (l.rows == 0 || l.cols == 0 || l.rows > INT32_MAX || l.cols > INT32_MAX) {
      return unsupported(layout_text(entry.name, l) +
                         ": the emulation runs 1 .. INT32_MAX rows and columns");
    }
    if (l.ld < static_cast<int64_t>(l.rows)) {
      return conflict(layout_text(entry.name, l) + ": ld is less than the rows");
    }
  }
  if (a.type != b.type || c.type != d.type ||
      !emulated_types(static_cast<int>(a.type), static_cast<int>(c.type))) {
    return unsupported(std::string("types A ") + type_name(static_cast<int>(a.type)) + ", B " +
                       type_name(static_cast<int>(b.type)) + ", C " +
                       type_name(static_cast<int>(c.type)) + ", D " +
                       type_name(static_cast<int>(d.type)) +
                       " (emulated: A = B = CUDA_R_16BF with C = D = CUDA_R_16BF or CUDA_R_32F, or "
                       "all CUDA_R_32F)");
  }
  if (!valid_op(desc.trans_a) || !valid_op(desc.trans_b)) {
    return conflict("TRANSA or TRANSB is not a cublasOperation_t");
  }
  const bool ta = desc.trans_a != CUBLAS_OP_N, tb = desc.trans_b != CUBLAS_OP_N;
  const auto m = static_cast<int64_t>(d.rows), n = static_cast<int64_t>(d.cols);
  const auto k = static_cast<int64_t>(ta ? a.rows : a.cols);
  const std::string shapes = std::string("TRANSA = ") + op_name(desc.trans_a) +
                             ", TRANSB = " + op_name(desc.trans_b) + "; " + layout_text("A", a) +
                             ", " + layout_text("B", b) + ", " + layout_text("C", c) + ", " +
                             layout_text("D", d);
  if (c.rows != d.rows || c.cols != d.cols) return conflict("C and D differ in shape: " + shapes);
  if (static_cast<int64_t>(ta ? a.cols : a.rows) != m) {
    return conflict("op(A) has other than D's " + std::to_string(m) + " rows: " + shapes);
  }
  if (static_cast<int64_t>(tb ? b.cols : b.rows) != k ||
      static_cast<int64_t>(tb ? b.rows : b.cols) != n) {
    return conflict("op(B) is not k x n = " + std::to_string(k) + " x " + std::to_string(n) + ": " +
                    shapes);
  }
  Gemm& g = problem->gemm;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m;
  g.n = n;
  g.k = k;
  g.lda = a.ld;
  g.ldb = b.ld;
  g.ldc = c.ld;
  g.ldd = d.ld;
  g.ab_type = static_cast<cudaDataType>(a.type);
  g.cd_type = static_cast<cudaDataType>(c.type);
  uint64_t hash = 0xcbf29ce484222325ull;
  for (const int64_t v :
       {int64_t{ta}, int64_t{tb}, m, n, k, a.ld, b.ld, c.ld, d.ld, static_cast<int64_t>(a.type),
        static_cast<int64_t>(c.type), static_cast<int64_t>(desc.compute_type)}) {
    hash = fnv1a(hash, v);
  }
  problem->fingerprint = hash;
  return {};
}

// ---- cuFFT --------------------------------------------------------------------------------------

// The transforms are FFTs in double, O(n log n): the complex forward DFT
// X_k = sum_j x_j exp(-2 pi i j k / n) of one length n, for every n >= 1, by an iterative radix-2
// FFT where n is a power of two and by Bluestein's algorithm (the DFT as a chirp-weighted
// convolution, done by radix-2 FFTs of a power-of-two length m >= 2n - 1) for every other n.
// R2C transforms the real signal as a complex one; C2R transforms the conjugate of the Hermitian
// extension of its bins (see cufftExecC2R). Every table (twiddles, bit reversal, chirp, the
// spectrum of the convolution's filter) is built once, when the plan is made, each entry from its
// exact integer index. The error stays at the level of double rounding (about 1e-15 relative to
// the signal's norm), far below the final rounding to float.
//
// kFftBlock transforms are computed side by side: arrays are laid out [element][transform of the
// block], so that every innermost loop runs across the transforms of a block with one shared
// twiddle (vectorisable).
constexpr int64_t kFftBlock = 8;
constexpr double kPi = 3.14159265358979323846;

// A radix-2 decimation-in-time FFT of a power-of-two length m.
class Radix2Fft {
 public:
  explicit Radix2Fft(int64_t m) : m_(m) {
    int log2m = 0;
    while ((int64_t{1} << log2m) < m) ++log2m;
    reversed_.assign(static_cast<size_t>(m), 0);
    for (int64_t i = 1; i < m; ++i) {
      reversed_[i] = (reversed_[i >> 1] >> 1) | ((i & 1) << (log2m - 1));
    }
    // exp(-2 pi i j / m) = cos - i sin for j < m / 2, each from its exact index.
    cos_.resize(static_cast<size_t>(m / 2));
    sin_.resize(static_cast<size_t>(m / 2));
    for (int64_t j = 0; j < m / 2; ++j) {
      const double angle = 2.0 * kPi * static_cast<double>(j) / static_cast<double>(m);
      cos_[j] = std::cos(angle);
      sin_[j] = std::sin(angle);
    }
  }

  int64_t length() const { return m_; }

  // W transforms side by side, in place: re and im hold m rows of W.
  template <int64_t W>
  void forward(double* re, double* im) const {
    for (int64_t i = 0; i < m_; ++i) {
      const int64_t j = reversed_[i];
      if (i < j) {
        for (int64_t t = 0; t < W; ++t) {
          std::swap(re[i * W + t], re[j * W + t]);
          std::swap(im[i * W + t], im[j * W + t]);
        }
      }
    }
    for (int64_t half = 1; half < m_; half *= 2) {
      const int64_t step = m_ / (2 * half);  // twiddle j of this stage is exp(-2 pi i j step / m)
      for (int64_t start = 0; start < m_; start += 2 * half) {
        for (int64_t j = 0; j < half; ++j) {
          const double c = cos_[j * step], s = sin_[j * step];
          double* a_re = re + (start + j) * W;
          double* a_im = im + (start + j) * W;
          double* b_re = a_re + half * W;
          double* b_im = a_im + half * W;
          for (int64_t t = 0; t < W; ++t) {
            // (b_re + i b_im)(c - i s)
            const double p_re = b_re[t] * c + b_im[t] * s;
            const double p_im = b_im[t] * c - b_re[t] * s;
            b_re[t] = a_re[t] - p_re;
            b_im[t] = a_im[t] - p_im;
            a_re[t] += p_re;
            a_im[t] += p_im;
          }
        }
      }
    }
  }

 private:
  int64_t m_;
  std::vector<int64_t> reversed_;  // bit reversal of log2(m) bits
  std::vector<double> cos_, sin_;
};

int64_t bluestein_length(int64_t n) {
  int64_t m = 1;
  while (m < 2 * n - 1) m *= 2;
  return m;
}

// The forward DFT of length n: radix-2 where n is a power of two, Bluestein otherwise.
//
// Bluestein: with c_j = exp(-pi i j^2 / n), j k = (j^2 + k^2 - (k - j)^2) / 2 gives
// X_k = c_k sum_j (x_j c_j) conj(c_{k-j}): a linear convolution of x_j c_j (j < n) with
// conj(c_l) (|l| < n), computed as a circular one of length m >= 2n - 1 (no wrap-around reaches
// the bins kept) by two radix-2 FFTs and the precomputed spectrum of conj(c).
class Dft {
 public:
  explicit Dft(int64_t n)
      : n_(n), bluestein_(!is_power_of_two(static_cast<uint64_t>(n))),
        fft_(bluestein_ ? bluestein_length(n) : n) {
    if (!bluestein_) return;
    const int64_t m = fft_.length();
    chirp_cos_.resize(static_cast<size_t>(n));
    chirp_sin_.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      // j^2 mod 2n exactly (j < 2^31), so the angle is exact up to one rounding.
      const uint64_t square = static_cast<uint64_t>(j) * static_cast<uint64_t>(j);
      const uint64_t phase = square % (2 * static_cast<uint64_t>(n));
      const double angle = kPi * static_cast<double>(phase) / static_cast<double>(n);
      chirp_cos_[j] = std::cos(angle);  // c_j = cos - i sin
      chirp_sin_[j] = std::sin(angle);
    }
    // The filter conj(c_l) at l and m - l, transformed, with the inverse transform's 1/m folded in.
    filter_re_.assign(static_cast<size_t>(m), 0.0);
    filter_im_.assign(static_cast<size_t>(m), 0.0);
    for (int64_t l = 0; l < n; ++l) {
      filter_re_[l] = chirp_cos_[l];
      filter_im_[l] = chirp_sin_[l];
      if (l > 0) {
        filter_re_[m - l] = chirp_cos_[l];
        filter_im_[m - l] = chirp_sin_[l];
      }
    }
    fft_.forward<1>(filter_re_.data(), filter_im_.data());
    const double inverse_m = 1.0 / static_cast<double>(m);  // a power of two: exact
    for (int64_t k = 0; k < m; ++k) {
      filter_re_[k] *= inverse_m;
      filter_im_[k] *= inverse_m;
    }
  }

  // Rows of the arrays forward() works in: n, or Bluestein's padded length.
  int64_t rows() const { return fft_.length(); }

  // kFftBlock transforms in place: rows [0, n) of re and im in, X_0 .. X_{n-1} out; rows
  // [n, rows()) are scratch.
  void forward(double* re, double* im) const {
    constexpr int64_t W = kFftBlock;
    if (!bluestein_) {
      fft_.forward<W>(re, im);
      return;
    }
    const int64_t m = fft_.length();
    for (int64_t j = 0; j < n_; ++j) {  // a_j = x_j c_j
      const double c = chirp_cos_[j], s = chirp_sin_[j];
      double* r = re + j * W;
      double* i = im + j * W;
      for (int64_t t = 0; t < W; ++t) {
        const double x_re = r[t], x_im = i[t];
        r[t] = x_re * c + x_im * s;
        i[t] = x_im * c - x_re * s;
      }
    }
    std::fill(re + n_ * W, re + m * W, 0.0);
    std::fill(im + n_ * W, im + m * W, 0.0);
    fft_.forward<W>(re, im);
    // The product of the spectra, conjugated: the inverse FFT as conj(FFT(conj(.))).
    for (int64_t k = 0; k < m; ++k) {
      const double f_re = filter_re_[k], f_im = filter_im_[k];
      double* r = re + k * W;
      double* i = im + k * W;
      for (int64_t t = 0; t < W; ++t) {
        const double a_re = r[t], a_im = i[t];
        r[t] = a_re * f_re - a_im * f_im;
        i[t] = -(a_re * f_im + a_im * f_re);
      }
    }
    fft_.forward<W>(re, im);
    for (int64_t k = 0; k < n_; ++k) {  // X_k = c_k conj(row k)
      const double c = chirp_cos_[k], s = chirp_sin_[k];
      double* r = re + k * W;
      double* i = im + k * W;
      for (int64_t t = 0; t < W; ++t) {
        const double y_re = r[t], y_im = -i[t];
        r[t] = y_re * c + y_im * s;
        i[t] = y_im * c - y_re * s;
      }
    }
  }

 private:
  int64_t n_;
  bool bluestein_;
  Radix2Fft fft_;
  std::vector<double> chirp_cos_, chirp_sin_;  // Bluestein only
  std::vector<double> filter_re_, filter_im_;
};

struct FftPlan {
  bool made = false;
  bool auto_allocate = true;
  cufftType type = CUFFT_R2C;
  int64_t n = 0, batch = 0;
  int64_t istride = 0, idist = 0, ostride = 0, odist = 0;
  size_t work_bytes = 0;
  void* work_area = nullptr;
  std::vector<unsigned char> auto_work;  // the area cuFFT allocated itself
  cudaStream_t stream = nullptr;
  std::unique_ptr<const Dft> dft;  // the transform's tables, built when the plan is made
};

struct FftPlans {
  std::mutex mutex;
  std::map<int, std::unique_ptr<FftPlan>> plans;
  int next_handle = 1;
};

FftPlans& fft_plans() {
  static FftPlans instance;
  return instance;
}

FftPlan* find_plan(cufftHandle handle) {
  FftPlans& p = fft_plans();
  std::lock_guard<std::mutex> lock(p.mutex);
  auto it = p.plans.find(handle);
  return it == p.plans.end() ? nullptr : it->second.get();
}

const char* fft_result_name(cufftResult r) {
  switch (r) {
    case CUFFT_SUCCESS: return "CUFFT_SUCCESS";
    case CUFFT_INVALID_PLAN: return "CUFFT_INVALID_PLAN";
    case CUFFT_ALLOC_FAILED: return "CUFFT_ALLOC_FAILED";
    case CUFFT_INVALID_TYPE: return "CUFFT_INVALID_TYPE";
    case CUFFT_INVALID_VALUE: return "CUFFT_INVALID_VALUE";
    case CUFFT_INTERNAL_ERROR: return "CUFFT_INTERNAL_ERROR";
    case CUFFT_EXEC_FAILED: return "CUFFT_EXEC_FAILED";
    case CUFFT_SETUP_FAILED: return "CUFFT_SETUP_FAILED";
    case CUFFT_INVALID_SIZE: return "CUFFT_INVALID_SIZE";
    case CUFFT_UNALIGNED_DATA: return "CUFFT_UNALIGNED_DATA";
    case CUFFT_INVALID_DEVICE: return "CUFFT_INVALID_DEVICE";
    case CUFFT_NO_WORKSPACE: return "CUFFT_NO_WORKSPACE";
    case CUFFT_NOT_IMPLEMENTED: return "CUFFT_NOT_IMPLEMENTED";
    case CUFFT_NOT_SUPPORTED: return "CUFFT_NOT_SUPPORTED";
    default: return "a cufftResult";
  }
}

cufftResult fft_fail(cufftResult result, const char* call, cufftHandle plan,
                     const std::string& why) {
  std::cerr << "cuFFT emulator: " << call << " (plan " << plan << ") returns "
            << fft_result_name(result) << ": " << why << "\n";
  return result;
}

const char* fft_type_name(int type) {
  switch (type) {
    case CUFFT_R2C: return "CUFFT_R2C";
    case CUFFT_C2R: return "CUFFT_C2R";
    case CUFFT_C2C: return "CUFFT_C2C";
    case CUFFT_D2Z: return "CUFFT_D2Z";
    case CUFFT_Z2D: return "CUFFT_Z2D";
    case CUFFT_Z2Z: return "CUFFT_Z2Z";
    default: return "an unrecognised cufftType";
  }
}

// The plan's state and the work area as an exec sees them; fails as the real exec would.
cufftResult prepare_exec(cufftHandle handle, cufftType type, const char* call, FftPlan** out) {
  FftPlan* plan = find_plan(handle);
  if (plan == nullptr) {
    return fft_fail(CUFFT_INVALID_PLAN, call, handle, "not a live cufftCreate handle");
  }
  if (!plan->made) {
    return fft_fail(CUFFT_INVALID_PLAN, call, handle, "the plan was created but never made");
  }
  if (plan->type != type) {
    return fft_fail(CUFFT_INVALID_PLAN, call, handle,
                    std::string("the plan is a ") + fft_type_name(plan->type) + " plan, not " +
                        fft_type_name(type));
  }
  if (plan->work_bytes > 0 && plan->work_area == nullptr) {
    return fft_fail(CUFFT_NO_WORKSPACE, call, handle,
                    "auto-allocation is off and no work area (" + std::to_string(plan->work_bytes) +
                        " bytes) was set by cufftSetWorkArea");
  }
  *out = plan;
  return CUFFT_SUCCESS;
}

// Rejects data the transform cannot address as laid out: null pointers, misaligned elements,
// an output that partly overlaps the input (in place means the same pointer), a work area that
// overlaps either.
cufftResult check_exec_memory(const FftPlan& plan, cufftHandle handle, const char* call,
                              const void* in, size_t in_element, int64_t in_count, const void* out,
                              size_t out_element, int64_t out_count) {
  if (in == nullptr || out == nullptr) {
    return fft_fail(CUFFT_INVALID_VALUE, call, handle, "idata or odata is null");
  }
  if (reinterpret_cast<uintptr_t>(in) % in_element != 0 ||
      reinterpret_cast<uintptr_t>(out) % out_element != 0) {
    return fft_fail(CUFFT_INVALID_VALUE, call, handle,
                    "idata " + describe_pointer(in) + " or odata " + describe_pointer(out) +
                        " is not aligned to its element type");
  }
  const Elements input{in, in_count, plan.istride, plan.batch, plan.idist, in_element};
  const Elements output{out, out_count, plan.ostride, plan.batch, plan.odist, out_element};
  if (in != out && elements_overlap(input, output)) {
    return fft_fail(CUFFT_INVALID_VALUE, call, handle,
                    "the output overlaps the input (an in-place transform passes the same "
                    "pointer twice)");
  }
  const Elements work = byte_range(plan.work_area, plan.work_bytes);
  if (elements_overlap(work, input) || elements_overlap(work, output)) {
    return fft_fail(CUFFT_INVALID_VALUE, call, handle,
                    "the work area (" + std::to_string(plan.work_bytes) +
                        " bytes) overlaps the input or the output");
  }
  return CUFFT_SUCCESS;
}

void overwrite_work_area(const FftPlan& plan) {
  if (plan.work_area != nullptr && plan.work_bytes > 0) {
    std::memset(plan.work_area, 0xff, plan.work_bytes);
  }
}

}  // namespace

// ==== cuBLAS =====================================================================================

extern "C" {

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "error detected trying to check the license";
  }
  return "unknown error";
}

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  if (handle == nullptr) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasCreate", "handle is null");
  }
  *handle = blas_handles().add(std::make_unique<cublasContext>());
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (!blas_handles().remove(handle)) {
    return blas_fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasDestroy",
                     "not a live cublasCreate handle: " + describe_pointer(handle));
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId) {
  cublasContext* h = blas_handles().find(handle);
  if (h == nullptr) {
    return blas_fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasSetStream",
                     "not a live cublasCreate handle: " + describe_pointer(handle));
  }
  h->stream = streamId;
  // Documented: setting the stream unconditionally resets the workspace to the default pool.
  h->user_workspace = nullptr;
  h->user_workspace_bytes = 0;
  h->has_user_workspace = false;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* streamId) {
  cublasContext* h = blas_handles().find(handle);
  if (h == nullptr) {
    return blas_fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasGetStream",
                     "not a live cublasCreate handle: " + describe_pointer(handle));
  }
  if (streamId == nullptr) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasGetStream", "streamId is null");
  }
  *streamId = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace,
                                     size_t workspaceSizeInBytes) {
  cublasContext* h = blas_handles().find(handle);
  if (h == nullptr) {
    return blas_fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasSetWorkspace",
                     "not a live cublasCreate handle: " + describe_pointer(handle));
  }
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    return blas_fail(
        CUBLAS_STATUS_INVALID_VALUE, "cublasSetWorkspace",
        "the workspace " + describe_pointer(workspace) + " is not aligned to 256 bytes");
  }
  if (workspace == nullptr && workspaceSizeInBytes > 0) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetWorkspace",
                     "a null workspace of " + std::to_string(workspaceSizeInBytes) + " bytes");
  }
  h->user_workspace = workspace;
  h->user_workspace_bytes = workspaceSizeInBytes;
  h->has_user_workspace = true;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t* mode) {
  cublasContext* h = blas_handles().find(handle);
  if (h == nullptr) {
    return blas_fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasGetPointerMode",
                     "not a live cublasCreate handle: " + describe_pointer(handle));
  }
  if (mode == nullptr) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasGetPointerMode", "mode is null");
  }
  *mode = h->pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode) {
  cublasContext* h = blas_handles().find(handle);
  if (h == nullptr) {
    return blas_fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasSetPointerMode",
                     "not a live cublasCreate handle: " + describe_pointer(handle));
  }
  if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetPointerMode",
                     "mode " + std::to_string(static_cast<int>(mode)));
  }
  // Device memory is host memory here: both modes read alpha and beta the same way.
  h->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo) {
  const char* call = "cublasGemmEx";
  cublasContext* h = blas_handles().find(handle);
  if (h == nullptr) {
    return blas_fail(CUBLAS_STATUS_NOT_INITIALIZED, call,
                     "not a live cublasCreate handle: " + describe_pointer(handle));
  }
  const std::string shapes = std::string("transa = ") + op_name(transa) +
                             ", transb = " + op_name(transb) + ", m = " + std::to_string(m) +
                             ", n = " + std::to_string(n) + ", k = " + std::to_string(k) +
                             ", lda = " + std::to_string(lda) + ", ldb = " + std::to_string(ldb) +
                             ", ldc = " + std::to_string(ldc);
  // The documented CUBLAS_STATUS_INVALID_VALUE conditions, in the documentation's order.
  if (m < 0 || n < 0 || k < 0) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call, "a negative size: " + shapes);
  }
  if (!valid_op(transa) || !valid_op(transb)) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     "transa or transb is not CUBLAS_OP_N, _T or _C: " + shapes);
  }
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  const int64_t a_rows = ta ? k : m, b_rows = tb ? n : k;
  if (lda < std::max<int64_t>(1, a_rows)) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     ld_rule("lda", lda, op_name(transa), ta ? "k" : "m", a_rows) + ": " + shapes);
  }
  if (ldb < std::max<int64_t>(1, b_rows)) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     ld_rule("ldb", ldb, op_name(transb), tb ? "n" : "k", b_rows) + ": " + shapes);
  }
  if (ldc < std::max(1, m)) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     ld_rule("ldc", ldc, "C", "m", m) + ": " + shapes);
  }
  if (alpha == nullptr || beta == nullptr) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call, "alpha or beta is null");
  }
  if (!known_compute_type(computeType)) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     "computeType " + std::to_string(static_cast<int>(computeType)) +
                         " is not a cublasComputeType_t");
  }
  if (!known_gemm_algo(algo)) {
    return blas_fail(
        CUBLAS_STATUS_INVALID_VALUE, call,
        "algo " + std::to_string(static_cast<int>(algo)) + " is not a cublasGemmAlgo_t");
  }
  if (!emulated_compute_type(computeType) || Atype != Btype || !emulated_types(Atype, Ctype)) {
    return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, call,
                     std::string("Atype ") + type_name(Atype) + ", Btype " + type_name(Btype) +
                         ", Ctype " + type_name(Ctype) + ", computeType " +
                         std::to_string(static_cast<int>(computeType)) +
                         " (emulated with CUBLAS_COMPUTE_32F: bf16 A and B with bf16 or fp32 C, "
                         "or all fp32)");
  }
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;

  Gemm g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m;
  g.n = n;
  g.k = k;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.ldb = ldb;
  g.C = C;
  g.ldc = ldc;
  g.D = C;
  g.ldd = ldc;
  g.ab_type = Atype;
  g.cd_type = Ctype;
  std::memcpy(&g.alpha, alpha, sizeof(float));
  std::memcpy(&g.beta, beta, sizeof(float));

  // A GPU would fault on these; the emulation says which.
  const bool reads_ab = k > 0 && g.alpha != 0.0f;
  if (C == nullptr || (reads_ab && (A == nullptr || B == nullptr))) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     "a null matrix pointer (A " + describe_pointer(A) + ", B " +
                         describe_pointer(B) + ", C " + describe_pointer(C) + "): " + shapes);
  }
  const size_t ab_element = element_bytes(Atype), c_element = element_bytes(Ctype);
  const Elements a_elements =
      reads_ab ? matrix_elements(A, a_rows, ta ? m : k, lda, ab_element) : Elements{};
  const Elements b_elements =
      reads_ab ? matrix_elements(B, b_rows, tb ? k : n, ldb, ab_element) : Elements{};
  const Elements c_elements = matrix_elements(C, m, n, ldc, c_element);
  // Stricter than a GPU, which would compute garbage: C may not share memory with what is read.
  if (elements_overlap(c_elements, a_elements) || elements_overlap(c_elements, b_elements)) {
    return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     "C overlaps A or B (an output that aliases an input): " + shapes);
  }
  if (h->has_user_workspace && h->user_workspace != nullptr) {
    const size_t used = std::min(h->user_workspace_bytes, kGemmExWorkspaceUse);
    const Elements work = byte_range(h->user_workspace, used);
    if (elements_overlap(work, a_elements) || elements_overlap(work, b_elements) ||
        elements_overlap(work, c_elements)) {
      return blas_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                       "the workspace set by cublasSetWorkspace overlaps A, B or C: " + shapes);
    }
  }
  // Runs in stream order (the handle's stream), overwriting the workspace as the GPU's GEMM may.
  void* workspace = h->has_user_workspace ? h->user_workspace : nullptr;
  const size_t used = workspace != nullptr ? std::min(h->user_workspace_bytes, kGemmExWorkspaceUse) : 0;
  emu::enqueue(h->stream, [g, workspace, used]() {
    if (used > 0) std::memset(workspace, 0xff, used);
    run_gemm(g);
  });
  return CUBLAS_STATUS_SUCCESS;
}

// ==== cuBLASLt ===================================================================================

const char* cublasLtGetStatusName(cublasStatus_t status) { return cublasGetStatusName(status); }
const char* cublasLtGetStatusString(cublasStatus_t status) { return cublasGetStatusString(status); }

cublasStatus_t cublasLtCreate(cublasLtHandle_t* lightHandle) {
  if (lightHandle == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtCreate", "lightHandle is null");
  }
  *lightHandle = lt_handles().add(std::make_unique<cublasLtContext>());
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t lightHandle) {
  if (!lt_handles().remove(lightHandle)) {
    return lt_fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasLtDestroy",
                   "not a live cublasLtCreate handle: " + describe_pointer(lightHandle));
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* matLayout, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
  if (matLayout == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatrixLayoutCreate", "matLayout is null");
  }
  auto layout = std::make_unique<LtLayout>();
  layout->type = static_cast<uint32_t>(type);
  layout->rows = rows;
  layout->cols = cols;
  layout->ld = ld;
  *matLayout = reinterpret_cast<cublasLtMatrixLayout_t>(lt_layouts().add(std::move(layout)));
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t matLayout) {
  if (!lt_layouts().remove(matLayout)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatrixLayoutDestroy",
                   "not a live layout: " + describe_pointer(matLayout));
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t matLayout,
                                                cublasLtMatrixLayoutAttribute_t attr,
                                                const void* buf, size_t sizeInBytes) {
  const char* call = "cublasLtMatrixLayoutSetAttribute";
  LtLayout* l = lt_layouts().find(matLayout);
  if (l == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "not a live layout: " + describe_pointer(matLayout));
  }
  switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_TYPE: return set_attribute(l->type, buf, sizeInBytes, call, "TYPE");
    case CUBLASLT_MATRIX_LAYOUT_ORDER:
      return set_attribute(l->order, buf, sizeInBytes, call, "ORDER");
    case CUBLASLT_MATRIX_LAYOUT_ROWS: return set_attribute(l->rows, buf, sizeInBytes, call, "ROWS");
    case CUBLASLT_MATRIX_LAYOUT_COLS: return set_attribute(l->cols, buf, sizeInBytes, call, "COLS");
    case CUBLASLT_MATRIX_LAYOUT_LD: return set_attribute(l->ld, buf, sizeInBytes, call, "LD");
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT:
      return set_attribute(l->batch_count, buf, sizeInBytes, call, "BATCH_COUNT");
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET:
      return set_attribute(l->batch_offset, buf, sizeInBytes, call, "STRIDED_BATCH_OFFSET");
    case CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET:
      return set_attribute(l->plane_offset, buf, sizeInBytes, call, "PLANE_OFFSET");
    case CUBLASLT_MATRIX_LAYOUT_BATCH_MODE:
      return set_attribute(l->batch_mode, buf, sizeInBytes, call, "BATCH_MODE");
  }
  return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                 "attribute " + std::to_string(static_cast<int>(attr)) + " does not exist");
}

cublasStatus_t cublasLtMatrixLayoutGetAttribute(cublasLtMatrixLayout_t matLayout,
                                                cublasLtMatrixLayoutAttribute_t attr, void* buf,
                                                size_t sizeInBytes, size_t* sizeWritten) {
  const char* call = "cublasLtMatrixLayoutGetAttribute";
  const LtLayout* l = lt_layouts().find(matLayout);
  if (l == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "not a live layout: " + describe_pointer(matLayout));
  }
  switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_TYPE:
      return get_attribute(l->type, buf, sizeInBytes, sizeWritten, call, "TYPE");
    case CUBLASLT_MATRIX_LAYOUT_ORDER:
      return get_attribute(l->order, buf, sizeInBytes, sizeWritten, call, "ORDER");
    case CUBLASLT_MATRIX_LAYOUT_ROWS:
      return get_attribute(l->rows, buf, sizeInBytes, sizeWritten, call, "ROWS");
    case CUBLASLT_MATRIX_LAYOUT_COLS:
      return get_attribute(l->cols, buf, sizeInBytes, sizeWritten, call, "COLS");
    case CUBLASLT_MATRIX_LAYOUT_LD:
      return get_attribute(l->ld, buf, sizeInBytes, sizeWritten, call, "LD");
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT:
      return get_attribute(l->batch_count, buf, sizeInBytes, sizeWritten, call, "BATCH_COUNT");
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET:
      return get_attribute(l->batch_offset, buf, sizeInBytes, sizeWritten, call,
                           "STRIDED_BATCH_OFFSET");
    case CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET:
      return get_attribute(l->plane_offset, buf, sizeInBytes, sizeWritten, call, "PLANE_OFFSET");
    case CUBLASLT_MATRIX_LAYOUT_BATCH_MODE:
      return get_attribute(l->batch_mode, buf, sizeInBytes, sizeWritten, call, "BATCH_MODE");
  }
  return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                 "attribute " + std::to_string(static_cast<int>(attr)) + " does not exist");
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* matmulDesc,
                                        cublasComputeType_t computeType, cudaDataType_t scaleType) {
  if (matmulDesc == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulDescCreate", "matmulDesc is null");
  }
  auto desc = std::make_unique<LtMatmulDesc>();
  desc->compute_type = static_cast<int32_t>(computeType);
  desc->scale_type = static_cast<int32_t>(scaleType);
  *matmulDesc = reinterpret_cast<cublasLtMatmulDesc_t>(lt_descs().add(std::move(desc)));
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t matmulDesc) {
  if (!lt_descs().remove(matmulDesc)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulDescDestroy",
                   "not a live matmul descriptor: " + describe_pointer(matmulDesc));
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t matmulDesc,
                                              cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              size_t sizeInBytes) {
  const char* call = "cublasLtMatmulDescSetAttribute";
  LtMatmulDesc* d = lt_descs().find(matmulDesc);
  if (d == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "not a live matmul descriptor: " + describe_pointer(matmulDesc));
  }
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE:
      return set_attribute(d->compute_type, buf, sizeInBytes, call, "COMPUTE_TYPE");
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE:
      return set_attribute(d->scale_type, buf, sizeInBytes, call, "SCALE_TYPE");
    case CUBLASLT_MATMUL_DESC_POINTER_MODE:
      return set_attribute(d->pointer_mode, buf, sizeInBytes, call, "POINTER_MODE");
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB:
    case CUBLASLT_MATMUL_DESC_TRANSC: {
      const char* name = attr == CUBLASLT_MATMUL_DESC_TRANSA   ? "TRANSA"
                         : attr == CUBLASLT_MATMUL_DESC_TRANSB ? "TRANSB"
                                                               : "TRANSC";
      int32_t op = 0;
      const cublasStatus_t status = set_attribute(op, buf, sizeInBytes, call, name);
      if (status != CUBLAS_STATUS_SUCCESS) return status;
      if (!valid_op(op)) {
        return lt_fail(
            CUBLAS_STATUS_INVALID_VALUE, call,
            std::string(name) + " = " + std::to_string(op) + " is not a cublasOperation_t");
      }
      if (attr == CUBLASLT_MATMUL_DESC_TRANSA) {
        d->trans_a = op;
      } else if (attr == CUBLASLT_MATMUL_DESC_TRANSB) {
        d->trans_b = op;
      } else {
        d->trans_c = op;
      }
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_FILL_MODE:
      return set_attribute(d->fill_mode, buf, sizeInBytes, call, "FILL_MODE");
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
      return set_attribute(d->epilogue, buf, sizeInBytes, call, "EPILOGUE");
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
    case CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE:
    case CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE:
    case CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET:
    case CUBLASLT_MATMUL_DESC_A_SCALE_POINTER:
    case CUBLASLT_MATMUL_DESC_B_SCALE_POINTER:
    case CUBLASLT_MATMUL_DESC_C_SCALE_POINTER:
    case CUBLASLT_MATMUL_DESC_D_SCALE_POINTER:
    case CUBLASLT_MATMUL_DESC_AMAX_D_POINTER:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER:
    case CUBLASLT_MATMUL_DESC_FAST_ACCUM:
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE:
    case CUBLASLT_MATMUL_DESC_A_SCALE_MODE:
    case CUBLASLT_MATMUL_DESC_B_SCALE_MODE:
    case CUBLASLT_MATMUL_DESC_C_SCALE_MODE:
    case CUBLASLT_MATMUL_DESC_D_SCALE_MODE:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE:
    case CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER:
    case CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE:
    case CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR:
      return lt_fail(
          CUBLAS_STATUS_NOT_SUPPORTED, call,
          "attribute " + std::to_string(static_cast<int>(attr)) + " is real but not emulated");
  }
  return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                 "attribute " + std::to_string(static_cast<int>(attr)) + " does not exist");
}

cublasStatus_t cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t matmulDesc,
                                              cublasLtMatmulDescAttributes_t attr, void* buf,
                                              size_t sizeInBytes, size_t* sizeWritten) {
  const char* call = "cublasLtMatmulDescGetAttribute";
  const LtMatmulDesc* d = lt_descs().find(matmulDesc);
  if (d == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "not a live matmul descriptor: " + describe_pointer(matmulDesc));
  }
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE:
      return get_attribute(d->compute_type, buf, sizeInBytes, sizeWritten, call, "COMPUTE_TYPE");
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE:
      return get_attribute(d->scale_type, buf, sizeInBytes, sizeWritten, call, "SCALE_TYPE");
    case CUBLASLT_MATMUL_DESC_POINTER_MODE:
      return get_attribute(d->pointer_mode, buf, sizeInBytes, sizeWritten, call, "POINTER_MODE");
    case CUBLASLT_MATMUL_DESC_TRANSA:
      return get_attribute(d->trans_a, buf, sizeInBytes, sizeWritten, call, "TRANSA");
    case CUBLASLT_MATMUL_DESC_TRANSB:
      return get_attribute(d->trans_b, buf, sizeInBytes, sizeWritten, call, "TRANSB");
    case CUBLASLT_MATMUL_DESC_TRANSC:
      return get_attribute(d->trans_c, buf, sizeInBytes, sizeWritten, call, "TRANSC");
    case CUBLASLT_MATMUL_DESC_FILL_MODE:
      return get_attribute(d->fill_mode, buf, sizeInBytes, sizeWritten, call, "FILL_MODE");
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
      return get_attribute(d->epilogue, buf, sizeInBytes, sizeWritten, call, "EPILOGUE");
    default: break;
  }
  return lt_fail(CUBLAS_STATUS_NOT_SUPPORTED, call,
                 "attribute " + std::to_string(static_cast<int>(attr)) + " is not emulated");
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (pref == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulPreferenceCreate", "pref is null");
  }
  *pref = reinterpret_cast<cublasLtMatmulPreference_t>(
      lt_preferences().add(std::make_unique<LtPreference>()));
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  if (!lt_preferences().remove(pref)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulPreferenceDestroy",
                   "not a live preference: " + describe_pointer(pref));
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, size_t sizeInBytes) {
  const char* call = "cublasLtMatmulPreferenceSetAttribute";
  LtPreference* p = lt_preferences().find(pref);
  if (p == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "not a live preference: " + describe_pointer(pref));
  }
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_SEARCH_MODE:
      return set_attribute(p->search_mode, buf, sizeInBytes, call, "SEARCH_MODE");
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
      return set_attribute(p->max_workspace_bytes, buf, sizeInBytes, call, "MAX_WORKSPACE_BYTES");
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
      return set_attribute(p->reduction_scheme_mask, buf, sizeInBytes, call,
                           "REDUCTION_SCHEME_MASK");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
      return set_attribute(p->min_alignment[0], buf, sizeInBytes, call, "MIN_ALIGNMENT_A_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
      return set_attribute(p->min_alignment[1], buf, sizeInBytes, call, "MIN_ALIGNMENT_B_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
      return set_attribute(p->min_alignment[2], buf, sizeInBytes, call, "MIN_ALIGNMENT_C_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      return set_attribute(p->min_alignment[3], buf, sizeInBytes, call, "MIN_ALIGNMENT_D_BYTES");
    case CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT:
      return set_attribute(p->max_waves_count, buf, sizeInBytes, call, "MAX_WAVES_COUNT");
    case CUBLASLT_MATMUL_PREF_IMPL_MASK:
      return set_attribute(p->impl_mask, buf, sizeInBytes, call, "IMPL_MASK");
  }
  return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                 "attribute " + std::to_string(static_cast<int>(attr)) + " does not exist");
}

cublasStatus_t cublasLtMatmulPreferenceGetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    void* buf, size_t sizeInBytes,
                                                    size_t* sizeWritten) {
  const char* call = "cublasLtMatmulPreferenceGetAttribute";
  const LtPreference* p = lt_preferences().find(pref);
  if (p == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "not a live preference: " + describe_pointer(pref));
  }
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_SEARCH_MODE:
      return get_attribute(p->search_mode, buf, sizeInBytes, sizeWritten, call, "SEARCH_MODE");
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
      return get_attribute(p->max_workspace_bytes, buf, sizeInBytes, sizeWritten, call,
                           "MAX_WORKSPACE_BYTES");
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
      return get_attribute(p->reduction_scheme_mask, buf, sizeInBytes, sizeWritten, call,
                           "REDUCTION_SCHEME_MASK");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
      return get_attribute(p->min_alignment[0], buf, sizeInBytes, sizeWritten, call,
                           "MIN_ALIGNMENT_A_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
      return get_attribute(p->min_alignment[1], buf, sizeInBytes, sizeWritten, call,
                           "MIN_ALIGNMENT_B_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
      return get_attribute(p->min_alignment[2], buf, sizeInBytes, sizeWritten, call,
                           "MIN_ALIGNMENT_C_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      return get_attribute(p->min_alignment[3], buf, sizeInBytes, sizeWritten, call,
                           "MIN_ALIGNMENT_D_BYTES");
    case CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT:
      return get_attribute(p->max_waves_count, buf, sizeInBytes, sizeWritten, call,
                           "MAX_WAVES_COUNT");
    case CUBLASLT_MATMUL_PREF_IMPL_MASK:
      return get_attribute(p->impl_mask, buf, sizeInBytes, sizeWritten, call, "IMPL_MASK");
  }
  return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                 "attribute " + std::to_string(static_cast<int>(attr)) + " does not exist");
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t operationDesc, cublasLtMatrixLayout_t Adesc,
    cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
    cublasLtMatmulPreference_t preference, int requestedAlgoCount,
    cublasLtMatmulHeuristicResult_t heuristicResultsArray[], int* returnAlgoCount) {
  const char* call = "cublasLtMatmulAlgoGetHeuristic";
  if (lt_handles().find(lightHandle) == nullptr) {
    return lt_fail(CUBLAS_STATUS_NOT_INITIALIZED, call,
                   "not a live cublasLtCreate handle: " + describe_pointer(lightHandle));
  }
  const LtMatmulDesc* desc = lt_descs().find(operationDesc);
  const LtLayout* a = lt_layouts().find(Adesc);
  const LtLayout* b = lt_layouts().find(Bdesc);
  const LtLayout* c = lt_layouts().find(Cdesc);
  const LtLayout* d = lt_layouts().find(Ddesc);
  const LtPreference* pref = lt_preferences().find(preference);
  if (desc == nullptr || a == nullptr || b == nullptr || c == nullptr || d == nullptr ||
      pref == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "the matmul descriptor, a layout or the preference is not a live descriptor");
  }
  if (requestedAlgoCount <= 0) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "requestedAlgoCount = " + std::to_string(requestedAlgoCount));
  }
  if (heuristicResultsArray == nullptr || returnAlgoCount == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "heuristicResultsArray or returnAlgoCount is null");
  }
  *returnAlgoCount = 0;
  LtProblem problem;
  const LtCheck check = check_lt_problem(*desc, *a, *b, *c, *d, &problem);
  if (check.verdict != Verdict::kOk) {
    return lt_fail(CUBLAS_STATUS_NOT_SUPPORTED, call, "no algorithm: " + check.why);
  }
  if (pref->search_mode != CUBLASLT_SEARCH_BEST_FIT) {
    return lt_fail(CUBLAS_STATUS_NOT_SUPPORTED, call,
                   "search mode " + std::to_string(pref->search_mode) +
                       " (emulated: CUBLASLT_SEARCH_BEST_FIT)");
  }
  for (int i = 0; i < 4; ++i) {
    if (!is_power_of_two(pref->min_alignment[i])) {
      return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     std::string("MIN_ALIGNMENT_") + "ABCD"[i] + "_BYTES = " +
                         std::to_string(pref->min_alignment[i]) + " is not a power of two");
    }
  }
  AlgoInfo info;
  for (int i = 0; i < 4; ++i) info.alignment[i] = pref->min_alignment[i];
  info.workspace_bytes = std::min(pref->max_workspace_bytes, kLtWorkspaceUse);
  info.fingerprint = problem.fingerprint;
  cublasLtMatmulHeuristicResult_t& result = heuristicResultsArray[0];
  result = cublasLtMatmulHeuristicResult_t{};
  result.algo = encode_algo(info);
  result.workspaceSize = static_cast<size_t>(info.workspace_bytes);
  result.state = CUBLAS_STATUS_SUCCESS;
  result.wavesCount = 1.0f;
  *returnAlgoCount = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t computeDesc,
                              const void* alpha, const void* A, cublasLtMatrixLayout_t Adesc,
                              const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                              const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo,
                              void* workspace, size_t workspaceSizeInBytes, cudaStream_t stream) {
  (void)stream;  // every stream is the host thread
  const char* call = "cublasLtMatmul";
  if (lt_handles().find(lightHandle) == nullptr) {
    return lt_fail(CUBLAS_STATUS_NOT_INITIALIZED, call,
                   "not a live cublasLtCreate handle: " + describe_pointer(lightHandle));
  }
  const LtMatmulDesc* desc = lt_descs().find(computeDesc);
  const LtLayout* a = lt_layouts().find(Adesc);
  const LtLayout* b = lt_layouts().find(Bdesc);
  const LtLayout* c = lt_layouts().find(Cdesc);
  const LtLayout* d = lt_layouts().find(Ddesc);
  if (desc == nullptr || a == nullptr || b == nullptr || c == nullptr || d == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "the matmul descriptor or a layout is not a live descriptor");
  }
  if (alpha == nullptr || beta == nullptr) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call, "alpha or beta is null");
  }
  LtProblem problem;
  const LtCheck check = check_lt_problem(*desc, *a, *b, *c, *d, &problem);
  if (check.verdict == Verdict::kConflict) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call, check.why);
  }
  if (check.verdict == Verdict::kUnsupported) {
    return lt_fail(CUBLAS_STATUS_NOT_SUPPORTED, call, check.why);
  }
  Gemm g = problem.gemm;
  std::memcpy(&g.alpha, alpha, sizeof(float));
  std::memcpy(&g.beta, beta, sizeof(float));
  const bool reads_c = g.beta != 0.0f;
  if (A == nullptr || B == nullptr || D == nullptr || (reads_c && C == nullptr)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "a null matrix pointer (A " + describe_pointer(A) + ", B " +
                       describe_pointer(B) + ", C " + describe_pointer(C) + ", D " +
                       describe_pointer(D) + ")");
  }
  if (C == D &&
      (c->type != d->type || c->rows != d->rows || c->cols != d->cols || c->ld != d->ld)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "in place (C == D) with different layouts: " + layout_text("C", *c) + ", " +
                       layout_text("D", *d));
  }

  AlgoInfo info;
  if (algo == nullptr) {
    // The implicit heuristic query knows the pointers and the workspace given.
    info.alignment[0] = address_alignment(A);
    info.alignment[1] = address_alignment(B);
    info.alignment[2] = reads_c ? address_alignment(C) : 1;
    info.alignment[3] = address_alignment(D);
    info.workspace_bytes =
        workspace == nullptr ? 0 : std::min<uint64_t>(workspaceSizeInBytes, kLtWorkspaceUse);
    info.fingerprint = problem.fingerprint;
  } else if (!decode_algo(*algo, &info)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "algo was not returned by cublasLtMatmulAlgoGetHeuristic");
  }
  if (info.fingerprint != problem.fingerprint) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "algo was chosen by the heuristic for another problem (sizes, transposes, "
                   "leading dimensions or types differ)");
  }
  const struct {
    const char* name;
    const void* p;
    uint32_t alignment;
    bool used;
  } operands[4] = {{"A", A, info.alignment[0], true},
                   {"B", B, info.alignment[1], true},
                   {"C", C, info.alignment[2], reads_c},
                   {"D", D, info.alignment[3], true}};
  for (const auto& operand : operands) {
    if (!operand.used || operand.alignment <= 1) continue;
    const auto misalignment = reinterpret_cast<uintptr_t>(operand.p) % operand.alignment;
    if (misalignment != 0) {
      return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                     std::string(operand.name) + " = " + describe_pointer(operand.p) +
                         " is less aligned than the " + std::to_string(operand.alignment) +
                         " bytes the algorithm was chosen for (address % " +
                         std::to_string(operand.alignment) + " = " + std::to_string(misalignment) +
                         "); a real kernel may fault");
    }
  }
  if (workspaceSizeInBytes < info.workspace_bytes) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "workspaceSizeInBytes = " + std::to_string(workspaceSizeInBytes) +
                       " is less than the " + std::to_string(info.workspace_bytes) +
                       " bytes the algorithm needs");
  }
  if (info.workspace_bytes > 0 &&
      (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0)) {
    return lt_fail(
        CUBLAS_STATUS_INVALID_VALUE, call,
        "the workspace " + describe_pointer(workspace) + " is null or not 256-byte aligned");
  }
  const size_t ab_element = element_bytes(g.ab_type), cd_element = element_bytes(g.cd_type);
  const Elements a_elements = matrix_elements(A, static_cast<int64_t>(a->rows),
                                              static_cast<int64_t>(a->cols), a->ld, ab_element);
  const Elements b_elements = matrix_elements(B, static_cast<int64_t>(b->rows),
                                              static_cast<int64_t>(b->cols), b->ld, ab_element);
  const Elements c_elements =
      reads_c ? matrix_elements(C, static_cast<int64_t>(c->rows), static_cast<int64_t>(c->cols),
                                c->ld, cd_element)
              : Elements{};
  const Elements d_elements = matrix_elements(D, static_cast<int64_t>(d->rows),
                                              static_cast<int64_t>(d->cols), d->ld, cd_element);
  // Stricter than a GPU, which would compute garbage.
  if (elements_overlap(d_elements, a_elements) || elements_overlap(d_elements, b_elements) ||
      (C != D && elements_overlap(d_elements, c_elements))) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call,
                   "D overlaps A, B or (other than exactly, C == D) C");
  }
  const size_t used = static_cast<size_t>(info.workspace_bytes);
  const Elements work = byte_range(workspace, used);
  if (elements_overlap(work, a_elements) || elements_overlap(work, b_elements) ||
      elements_overlap(work, c_elements) || elements_overlap(work, d_elements)) {
    return lt_fail(CUBLAS_STATUS_INVALID_VALUE, call, "the workspace overlaps A, B, C or D");
  }
  g.A = A;
  g.B = B;
  g.C = C;
  g.D = D;
  // Runs in stream order, overwriting the workspace as the GPU's matmul may.
  emu::enqueue(stream, [g, workspace, used]() {
    if (used > 0) std::memset(workspace, 0xff, used);
    run_gemm(g);
  });
  return CUBLAS_STATUS_SUCCESS;
}

// ==== cuFFT ======================================================================================

cufftResult cufftCreate(cufftHandle* handle) {
  if (handle == nullptr) return fft_fail(CUFFT_INVALID_VALUE, "cufftCreate", -1, "handle is null");
  FftPlans& p = fft_plans();
  std::lock_guard<std::mutex> lock(p.mutex);
  const int id = p.next_handle++;
  p.plans[id] = std::make_unique<FftPlan>();
  *handle = id;
  return CUFFT_SUCCESS;
}

cufftResult cufftSetAutoAllocation(cufftHandle plan, int autoAllocate) {
  FftPlan* p = find_plan(plan);
  if (p == nullptr) {
    return fft_fail(CUFFT_INVALID_PLAN, "cufftSetAutoAllocation", plan,
                    "not a live cufftCreate handle");
  }
  // It decides what cufftMakePlan* does; once the plan is made it has nothing left to change.
  if (!p->made) p->auto_allocate = autoAllocate != 0;
  return CUFFT_SUCCESS;
}

cufftResult cufftMakePlanMany64(cufftHandle plan, int rank, long long int* n,
                                long long int* inembed, long long int istride, long long int idist,
                                long long int* onembed, long long int ostride, long long int odist,
                                cufftType type, long long int batch, size_t* workSize) {
  const char* call = "cufftMakePlanMany64";
  FftPlan* p = find_plan(plan);
  if (p == nullptr)
    return fft_fail(CUFFT_INVALID_PLAN, call, plan, "not a live cufftCreate handle");
  if (p->made) {
    return fft_fail(CUFFT_INVALID_PLAN, call, plan,
                    "the plan was already made (create a new handle per plan)");
  }
  if (workSize == nullptr || n == nullptr) {
    return fft_fail(CUFFT_INVALID_VALUE, call, plan, "n or workSize is null");
  }
  if (rank < 1 || rank > 3) {
    return fft_fail(CUFFT_INVALID_SIZE, call, plan, "rank " + std::to_string(rank));
  }
  if (rank != 1) {
    return fft_fail(CUFFT_NOT_SUPPORTED, call, plan,
                    "rank " + std::to_string(rank) + " (emulated: rank 1)");
  }
  if (type != CUFFT_R2C && type != CUFFT_C2R) {
    return fft_fail(
        CUFFT_NOT_SUPPORTED, call, plan,
        std::string("type ") + fft_type_name(type) + " (emulated: CUFFT_R2C, CUFFT_C2R)");
  }
  const int64_t length = n[0];
  if (length < 1 || batch < 1 || length > (int64_t{1} << 31) || batch > (int64_t{1} << 40)) {
    return fft_fail(CUFFT_INVALID_SIZE, call, plan,
                    "n = " + std::to_string(length) + ", batch = " + std::to_string(batch));
  }
  const int64_t real_count = length, complex_count = length / 2 + 1;
  const int64_t in_count = type == CUFFT_R2C ? real_count : complex_count;
  const int64_t out_count = type == CUFFT_R2C ? complex_count : real_count;
  if ((inembed == nullptr) != (onembed == nullptr)) {
    // The documentation leaves open which advanced parameters are then ignored.
    return fft_fail(CUFFT_NOT_SUPPORTED, call, plan,
                    "exactly one of inembed and onembed is null (emulated: both or neither)");
  }
  if (inembed == nullptr) {
    // The basic layout: contiguous transforms one after another; istride etc. are ignored.
    istride = 1;
    ostride = 1;
    idist = in_count;
    odist = out_count;
  }
  if (istride < 1 || ostride < 1 || idist < 0 || odist < 0) {
    return fft_fail(CUFFT_INVALID_VALUE, call, plan,
                    "istride = " + std::to_string(istride) + ", idist = " + std::to_string(idist) +
                        ", ostride = " + std::to_string(ostride) +
                        ", odist = " + std::to_string(odist));
  }
  // Outputs of different transforms must not land on the same element; the emulation verifies
  // the two layouts that guarantee it (transforms one after another, or interleaved).
  if (batch > 1 && odist < out_count * ostride && ostride < batch * odist) {
    return fft_fail(CUFFT_NOT_SUPPORTED, call, plan,
                    "ostride = " + std::to_string(ostride) + ", odist = " + std::to_string(odist) +
                        " with batch " + std::to_string(batch) + " and " +
                        std::to_string(out_count) + " outputs per transform: outputs may coincide");
  }
  // The transform's tables (twiddles; for Bluestein the chirp and the filter's spectrum).
  std::unique_ptr<const Dft> dft;
  try {
    dft = std::make_unique<const Dft>(length);
  } catch (const std::bad_alloc&) {
    return fft_fail(CUFFT_ALLOC_FAILED, call, plan,
                    "no memory for the tables of a length-" + std::to_string(length) + " FFT");
  }
  p->dft = std::move(dft);
  p->type = type;
  p->n = length;
  p->batch = batch;
  p->istride = istride;
  p->idist = idist;
  p->ostride = ostride;
  p->odist = odist;
  // Scratch for the intermediate spectra of a multi-pass FFT: never needed for length 1.
  p->work_bytes =
      length > 1 ? static_cast<size_t>(batch * complex_count) * sizeof(cufftComplex) : 0;
  if (p->auto_allocate && p->work_bytes > 0) {
    p->auto_work.assign(p->work_bytes, 0);
    p->work_area = p->auto_work.data();
  }
  p->made = true;
  *workSize = p->work_bytes;
  return CUFFT_SUCCESS;
}

cufftResult cufftMakePlanMany(cufftHandle plan, int rank, int* n, int* inembed, int istride,
                              int idist, int* onembed, int ostride, int odist, cufftType type,
                              int batch, size_t* workSize) {
  long long n64[3] = {0, 0, 0}, in64[3] = {0, 0, 0}, on64[3] = {0, 0, 0};
  const int copied = (rank >= 1 && rank <= 3) ? rank : 0;
  for (int i = 0; i < copied; ++i) {
    if (n != nullptr) n64[i] = n[i];
    if (inembed != nullptr) in64[i] = inembed[i];
    if (onembed != nullptr) on64[i] = onembed[i];
  }
  return cufftMakePlanMany64(
      plan, rank, n != nullptr ? n64 : nullptr, inembed != nullptr ? in64 : nullptr, istride, idist,
      onembed != nullptr ? on64 : nullptr, ostride, odist, type, batch, workSize);
}

cufftResult cufftMakePlan1d(cufftHandle plan, int nx, cufftType type, int batch, size_t* workSize) {
  return cufftMakePlanMany(plan, 1, &nx, nullptr, 1, 0, nullptr, 1, 0, type, batch, workSize);
}

cufftResult cufftGetSize(cufftHandle handle, size_t* workSize) {
  FftPlan* p = find_plan(handle);
  if (p == nullptr) {
    return fft_fail(CUFFT_INVALID_PLAN, "cufftGetSize", handle, "not a live cufftCreate handle");
  }
  if (workSize == nullptr) {
    return fft_fail(CUFFT_INVALID_VALUE, "cufftGetSize", handle, "workSize is null");
  }
  *workSize = p->work_bytes;
  return CUFFT_SUCCESS;
}

cufftResult cufftSetWorkArea(cufftHandle plan, void* workArea) {
  FftPlan* p = find_plan(plan);
  if (p == nullptr) {
    return fft_fail(CUFFT_INVALID_PLAN, "cufftSetWorkArea", plan, "not a live cufftCreate handle");
  }
  // Documented: an auto-allocated work area is freed.
  p->auto_work.clear();
  p->auto_work.shrink_to_fit();
  p->work_area = workArea;
  return CUFFT_SUCCESS;
}

cufftResult cufftSetStream(cufftHandle plan, cudaStream_t stream) {
  FftPlan* p = find_plan(plan);
  if (p == nullptr) {
    return fft_fail(CUFFT_INVALID_PLAN, "cufftSetStream", plan, "not a live cufftCreate handle");
  }
  p->stream = stream;
  return CUFFT_SUCCESS;
}

cufftResult cufftDestroy(cufftHandle plan) {
  FftPlans& p = fft_plans();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (p.plans.erase(plan) != 1) {
    std::cerr << "cuFFT emulator: cufftDestroy (plan " << plan
              << ") returns CUFFT_INVALID_PLAN: not a live cufftCreate handle\n";
    return CUFFT_INVALID_PLAN;
  }
  return CUFFT_SUCCESS;
}

cufftResult cufftExecR2C(cufftHandle plan, cufftReal* idata, cufftComplex* odata) {
  const char* call = "cufftExecR2C";
  FftPlan* p = nullptr;
  cufftResult result = prepare_exec(plan, CUFFT_R2C, call, &p);
  if (result != CUFFT_SUCCESS) return result;
  const int64_t n = p->n, bins = n / 2 + 1;
  result = check_exec_memory(*p, plan, call, idata, sizeof(cufftReal), n, odata,
                             sizeof(cufftComplex), bins);
  if (result != CUFFT_SUCCESS) return result;

  // Runs in stream order (the plan's stream), like the GPU's transform.
  emu::enqueue(p->stream, [p, idata, odata, n, bins]() {
    const Dft& dft = *p->dft;
    std::vector<cufftComplex> spectrum(static_cast<size_t>(p->batch * bins));
    // Transforms in blocks of kFftBlock (see Dft), each a complex one with a zero imaginary part.
    const size_t block_size = static_cast<size_t>(dft.rows() * kFftBlock);
    std::vector<double> re(block_size), im(block_size);  // [x][transform of block]
    for (int64_t b0 = 0; b0 < p->batch; b0 += kFftBlock) {
      const int64_t width = std::min(kFftBlock, p->batch - b0);
      for (int64_t x = 0; x < n; ++x) {
        for (int64_t t = 0; t < kFftBlock; ++t) {
          re[x * kFftBlock + t] = t < width ? idata[(b0 + t) * p->idist + x * p->istride] : 0.0;
          im[x * kFftBlock + t] = 0.0;
        }
      }
      dft.forward(re.data(), im.data());
      for (int64_t k = 0; k < bins; ++k) {
        for (int64_t t = 0; t < width; ++t) {
          spectrum[(b0 + t) * bins + k] = make_cuComplex(static_cast<float>(re[k * kFftBlock + t]),
                                                         static_cast<float>(im[k * kFftBlock + t]));
        }
      }
    }
    overwrite_work_area(*p);
    for (int64_t b = 0; b < p->batch; ++b) {
      for (int64_t k = 0; k < bins; ++k)
        odata[b * p->odist + k * p->ostride] = spectrum[b * bins + k];
    }
  });
  return CUFFT_SUCCESS;
}

cufftResult cufftExecC2R(cufftHandle plan, cufftComplex* idata, cufftReal* odata) {
  const char* call = "cufftExecC2R";
  FftPlan* p = nullptr;
  cufftResult result = prepare_exec(plan, CUFFT_C2R, call, &p);
  if (result != CUFFT_SUCCESS) return result;
  const int64_t n = p->n, bins = n / 2 + 1;
  result = check_exec_memory(*p, plan, call, idata, sizeof(cufftComplex), bins, odata,
                             sizeof(cufftReal), n);
  if (result != CUFFT_SUCCESS) return result;

  // Runs in stream order (the plan's stream), like the GPU's transform.
  emu::enqueue(p->stream, [p, idata, odata, n, bins]() {
    // The Hermitian extension X_{n-k} = conj(X_k): bin 0 and (even n) bin n/2 count once with their
    // real parts only, bins 1 .. ceil(n/2) - 1 twice. Its inverse is real, so
    // x_j = sum_k X_k exp(2 pi i j k / n) = conj(sum_k conj(X_k) exp(-2 pi i j k / n)) is the real
    // part of the forward transform of the conjugated extension.
    const int64_t paired_end = (n % 2 == 0) ? n / 2 : bins;  // bins [1, paired_end) pair up
    const Dft& dft = *p->dft;
    std::vector<float> signal(static_cast<size_t>(p->batch * n));
    // As in R2C, blocks of transforms with the transform innermost.
    const size_t block_size = static_cast<size_t>(dft.rows() * kFftBlock);
    std::vector<double> re(block_size), im(block_size);  // [k][transform of block]
    for (int64_t b0 = 0; b0 < p->batch; b0 += kFftBlock) {
      const int64_t width = std::min(kFftBlock, p->batch - b0);
      for (int64_t k = 0; k < bins; ++k) {
        for (int64_t t = 0; t < kFftBlock; ++t) {
          const cufftComplex v =
              t < width ? idata[(b0 + t) * p->idist + k * p->istride] : make_cuComplex(0.0f, 0.0f);
          if (k == 0 || k >= paired_end) {  // bin 0, bin n/2 of even n
            re[k * kFftBlock + t] = v.x;
            im[k * kFftBlock + t] = 0.0;
          } else {
            re[k * kFftBlock + t] = v.x;
            im[k * kFftBlock + t] = -static_cast<double>(v.y);
            re[(n - k) * kFftBlock + t] = v.x;
            im[(n - k) * kFftBlock + t] = v.y;
          }
        }
      }
      dft.forward(re.data(), im.data());
      for (int64_t x = 0; x < n; ++x) {
        for (int64_t t = 0; t < width; ++t) {
          signal[(b0 + t) * n + x] = static_cast<float>(re[x * kFftBlock + t]);
        }
      }
    }
    // Documented: a complex-to-real transform may overwrite its input. It does here (NaN), so a
    // caller that reads the spectrum afterwards fails.
    const cufftComplex poison = make_cuComplex(std::nanf(""), std::nanf(""));
    for (int64_t b = 0; b < p->batch; ++b) {
      for (int64_t k = 0; k < bins; ++k) idata[b * p->idist + k * p->istride] = poison;
    }
    overwrite_work_area(*p);
    for (int64_t b = 0; b < p->batch; ++b) {
      for (int64_t x = 0; x < n; ++x) odata[b * p->odist + x * p->ostride] = signal[b * n + x];
    }
  });
  return CUFFT_SUCCESS;
}

cufftResult cufftExecC2C(cufftHandle plan, cufftComplex* idata, cufftComplex* odata,
                         int direction) {
  (void)idata;
  (void)odata;
  (void)direction;
  FftPlan* p = nullptr;
  // No plan is ever C2C here (cufftMakePlan* does not emulate it), so this names the mismatch.
  return prepare_exec(plan, CUFFT_C2C, "cufftExecC2C", &p);
}

}  // extern "C"
