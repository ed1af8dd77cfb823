// CUDA emulation (tests/cuda_emulation): the part of cuFFT (and of cuComplex.h, which the real
// cufft.h includes) that kernels/cuda uses, with the real types, enumerators, values and
// signatures, implemented on the host by emulated_libraries.cpp.
//
// Emulated: single-precision CUFFT_R2C and CUFFT_C2R plans of rank 1 with the advanced data
// layout (element x of batch b at b * dist + x * stride), batched, out of place or in place.
// Transforms are FFTs in double (radix 2; Bluestein for other lengths), stored as float: R2C
// writes the n/2 + 1 bins X_k = sum_x x_j e^{-2 pi i j k / n}; C2R is the unnormalised inverse
// of a Hermitian spectrum (no 1/n; the imaginary parts of bin 0 and, for even n, bin n/2 are
// ignored) and overwrites its input, as the documentation warns an out-of-place C2R may.
// Anything else (other types, ranks 2 and 3) returns CUFFT_NOT_SUPPORTED at plan time instead
// of computing something else.
//
// Work areas: plans of n > 1 report a nonzero work size. With cufftSetAutoAllocation(plan, 0)
// before the plan is made, an exec before cufftSetWorkArea returns CUFFT_NO_WORKSPACE; each exec
// overwrites the whole work area (0xff), so one that overlaps data shows, and must not overlap
// the input or output (CUFFT_INVALID_VALUE).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "library_types.h"

#if !defined(CU_COMPLEX_H_)
#define CU_COMPLEX_H_
typedef float2 cuFloatComplex;
__host__ __device__ static inline float cuCrealf(cuFloatComplex x) { return x.x; }
__host__ __device__ static inline float cuCimagf(cuFloatComplex x) { return x.y; }
__host__ __device__ static inline cuFloatComplex make_cuFloatComplex(float r, float i) {
  cuFloatComplex result;
  result.x = r;
  result.y = i;
  return result;
}
__host__ __device__ static inline cuFloatComplex cuConjf(cuFloatComplex x) {
  return make_cuFloatComplex(cuCrealf(x), -cuCimagf(x));
}
__host__ __device__ static inline cuFloatComplex cuCaddf(cuFloatComplex x, cuFloatComplex y) {
  return make_cuFloatComplex(cuCrealf(x) + cuCrealf(y), cuCimagf(x) + cuCimagf(y));
}
__host__ __device__ static inline cuFloatComplex cuCsubf(cuFloatComplex x, cuFloatComplex y) {
  return make_cuFloatComplex(cuCrealf(x) - cuCrealf(y), cuCimagf(x) - cuCimagf(y));
}
__host__ __device__ static inline cuFloatComplex cuCmulf(cuFloatComplex x, cuFloatComplex y) {
  return make_cuFloatComplex(cuCrealf(x) * cuCrealf(y) - cuCimagf(x) * cuCimagf(y),
                             cuCrealf(x) * cuCimagf(y) + cuCimagf(x) * cuCrealf(y));
}
typedef cuFloatComplex cuComplex;
__host__ __device__ static inline cuComplex make_cuComplex(float x, float y) {
  return make_cuFloatComplex(x, y);
}
#endif  // CU_COMPLEX_H_

extern "C" {

typedef enum cufftResult_t {
  CUFFT_SUCCESS = 0x0,
  CUFFT_INVALID_PLAN = 0x1,
  CUFFT_ALLOC_FAILED = 0x2,
  CUFFT_INVALID_TYPE = 0x3,
  CUFFT_INVALID_VALUE = 0x4,
  CUFFT_INTERNAL_ERROR = 0x5,
  CUFFT_EXEC_FAILED = 0x6,
  CUFFT_SETUP_FAILED = 0x7,
  CUFFT_INVALID_SIZE = 0x8,
  CUFFT_UNALIGNED_DATA = 0x9,
  CUFFT_INVALID_DEVICE = 0xB,
  CUFFT_NO_WORKSPACE = 0xD,
  CUFFT_NOT_IMPLEMENTED = 0xE,
  CUFFT_NOT_SUPPORTED = 0x10,
  CUFFT_MISSING_DEPENDENCY = 0x11,
  CUFFT_NVRTC_FAILURE = 0x12,
  CUFFT_NVJITLINK_FAILURE = 0x13,
  CUFFT_NVSHMEM_FAILURE = 0x14
} cufftResult;

#define MAX_CUFFT_ERROR 0x15

typedef float cufftReal;
typedef double cufftDoubleReal;
typedef cuComplex cufftComplex;

#define CUFFT_FORWARD -1
#define CUFFT_INVERSE 1

typedef enum cufftType_t {
  CUFFT_R2C = 0x2a,
  CUFFT_C2R = 0x2c,
  CUFFT_C2C = 0x29,
  CUFFT_D2Z = 0x6a,
  CUFFT_Z2D = 0x6c,
  CUFFT_Z2Z = 0x69
} cufftType;

typedef int cufftHandle;
#define CUFFT_PLAN_NULL -1

cufftResult cufftCreate(cufftHandle* handle);
// Only before the plan is made, as documented; later calls are accepted and change nothing.
cufftResult cufftSetAutoAllocation(cufftHandle plan, int autoAllocate);
cufftResult cufftMakePlanMany64(cufftHandle plan, int rank, long long int* n,
                                long long int* inembed, long long int istride, long long int idist,
                                long long int* onembed, long long int ostride, long long int odist,
                                cufftType type, long long int batch, size_t* workSize);
cufftResult cufftMakePlanMany(cufftHandle plan, int rank, int* n, int* inembed, int istride,
                              int idist, int* onembed, int ostride, int odist, cufftType type,
                              int batch, size_t* workSize);
cufftResult cufftMakePlan1d(cufftHandle plan, int nx, cufftType type, int batch, size_t* workSize);
cufftResult cufftGetSize(cufftHandle handle, size_t* workSize);
cufftResult cufftSetWorkArea(cufftHandle plan, void* workArea);
cufftResult cufftSetStream(cufftHandle plan, cudaStream_t stream);
cufftResult cufftExecR2C(cufftHandle plan, cufftReal* idata, cufftComplex* odata);
cufftResult cufftExecC2R(cufftHandle plan, cufftComplex* idata, cufftReal* odata);
cufftResult cufftExecC2C(cufftHandle plan, cufftComplex* idata, cufftComplex* odata, int direction);
cufftResult cufftDestroy(cufftHandle plan);

}  // extern "C"
