// CUDA emulation (tests/cuda_emulation): the data-type enumeration of the real library_types.h,
// with the real values, for the emulated cuBLAS, cuBLASLt and cuFFT.
#pragma once

typedef enum cudaDataType_t {
  CUDA_R_32F = 0,
  CUDA_R_64F = 1,
  CUDA_R_16F = 2,
  CUDA_C_32F = 4,
  CUDA_R_16BF = 14,
} cudaDataType;
