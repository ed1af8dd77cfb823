// The matrices of FreqKV compression (see "Compression operator" in docs/FREQKV.md), computed on
// the host in double. Backends convert them to their element type once and apply them as GEMMs.
#pragma once

#include <cstdint>
#include <vector>

namespace freqkv {

// The orthonormal DCT-II of length n as an n x n row-major matrix; row k is basis vector k:
//   D[k, i] = a_k cos(pi (2i + 1) k / 2n),  a_0 = sqrt(1/n),  a_k = sqrt(2/n) for k > 0.
// D is orthogonal, so its transpose is the inverse (the orthonormal DCT-III). With rows < n only
// the first `rows` basis vectors are built (rows x n): the low frequencies compression keeps.
// Throws std::invalid_argument unless n >= 1 and 1 <= rows <= n (rows = -1: all n).
std::vector<double> dct_matrix(int64_t n, int64_t rows = -1);

// The compression N -> L tokens, an L x N row-major matrix (L = n_out, N = n_in):
//   P = sqrt(L/N) D_L^T D_N[0:L, :]
// i.e. DCT the N tokens, keep the L lowest frequencies, inverse DCT of length L, rescale so that
// a constant sequence stays the same constant. With L = N it is the identity.
// Throws std::invalid_argument unless 1 <= n_out <= n_in.
std::vector<double> freqkv_compression_matrix(int64_t n_in, int64_t n_out);

// What `power` successive compressions do to the memory they start from: A = (P[:, 0:L])^power,
// an L x L row-major matrix (L = n_out, P = freqkv_compression_matrix(n_in, n_out)). Each
// compression reads [memory (L rows) ; new tokens] and so maps memory M to P[:, 0:L] M plus a term
// of the tokens alone; a chain of them gives M_out = A M_in + (the chain run with M_in = 0), which
// lets a sequence-parallel rank pass its memory on with one L x L product (LlamaModel's memory
// chain). power = 0 gives the identity. Throws std::invalid_argument for power < 0 or lengths
// freqkv_compression_matrix refuses.
std::vector<double> freqkv_memory_transfer_matrix(int64_t n_in, int64_t n_out, int64_t power);

}  // namespace freqkv
