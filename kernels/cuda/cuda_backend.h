// The CUDA backend of Kernels<T> for T = bf16, as seen from plain C++: no CUDA header is needed to
// include this, so model and trainer code can pick the backend at run time.
//
// The backend exists only when the project was built with CUDA (the freqkv_cuda target, which
// defines FREQKV_HAVE_CUDA=1 for everything linking it). It stores tensors in bf16 on one device,
// computes in fp32 (Acc<bf16> = float statistics), and orders all its work on one CUDA stream of
// its own: calls return before the device has finished, except those that hand data to the host
// (copy_to_host, download, sum_squares), host-to-device copies and synchronize(), which wait.
// Invalid indices found on the device (a negative token, a target beyond the vocabulary) cannot
// throw where they are found: they are reported by the next of those waiting calls, as a
// std::out_of_range naming the call and the row.
#pragma once

#include <memory>

#include "kernels/kernels.h"

namespace freqkv {

// True when the CUDA runtime finds at least one usable device (false without a driver or GPU).
bool cuda_device_available();

// The bf16 CUDA backend on device `device`. Throws std::runtime_error carrying the CUDA error
// string when there is no such device or it cannot be initialised.
std::unique_ptr<Kernels<bf16>> make_cuda_kernels(int device = 0);

}  // namespace freqkv
