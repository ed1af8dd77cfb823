#!/usr/bin/env python3
"""A PyTorch implementation of one FreqKV training step, timed like `freqkv bench`.

What the project's issue compares the CUDA step against ("a PyTorch implementation of the same
step (SDPA flash attention, the DCT as one GEMM)", and the authors' FFT formulation), written
here from ../shared/docs/FREQKV.md so that both run on the same machine in the same session
(launch/gpu_check.sh, stage torch-reference) and the ratio is measured, not quoted.

One step = forward + backward of a LLaMA model with FreqKV attention (no optimizer update, as
`freqkv bench`), for B sequences of T tokens, random weights N(0, 0.02) (norms 1) and random
tokens from --seed:
  per layer: RMSNorm -> q, k, v projections -> K and V compressed BEFORE RoPE, chunk by chunk
  (M_1 = P X[S:C], M_{g+1} = P [M_g ; X_g], the rows [S, S+F) of chunk g's keys/values) ->
  RoPE with cache-layout positions (keys of a chunk 0..S+L+n-1, its queries S+L..S+L+n-1; chunk
  0 plain 0..n0-1) -> attention of each chunk over [sink ; memory ; chunk], causal bottom-right
  -> o projection -> RMSNorm -> SwiGLU MLP; then the final RMSNorm, the LM head and the mean
  cross-entropy.
Implementation choices (those a PyTorch fine-tuning script would make):
  - precision: --dtype bf16 (default on cuda) keeps parameters, activations and gradients in
    bf16, as the C++ CUDA backend stores them; RMSNorm and the loss compute in fp32, SDPA
    accumulates in fp32. fp32 / fp64 run the same code in that dtype (fp64: parity checks,
    tests/reference/check_torch_step.py).
  - attention: torch.nn.functional.scaled_dot_product_attention; chunk 0 with is_causal (flash),
    the chunks after it batched into one call per shape with a lower-right causal bias
    (torch.nn.attention.bias.causal_lower_right: the flash kernel when it applies), K/V heads
    repeated for GQA as Hugging Face LLaMA does. Without SDPA (torch < 2.0, e.g. the CPU
    machine's 1.13) or with --attention explicit: an explicit masked softmax.
  - compression: --dct gemm (default) applies P = sqrt(L/N) D_L^T D_N[0:L,:] as one matrix
    (split P = [P_a | P_b] so [M_g ; X_g] is never concatenated); --dct fft is the authors'
    formulation: an orthonormal DCT-II of length N through torch.fft (Makhoul's reordering), keep
    the L lowest coefficients, a DCT-III of length L through an inverse FFT, rescale by
    sqrt(L/N); computed in fp32 (fp64 in fp64 mode) since cuFFT has no bf16 for these lengths.
  - activation recomputation: each layer under torch.utils.checkpoint (on by default; off with
    --no-recompute), as `freqkv bench --recompute`.
  - loss: the LM head and cross-entropy in blocks of --loss-block rows, each block's fp32 logits
    turned into their gradient at once (a custom autograd Function), so the logits of the whole
    sequence never exist and the head's GEMM is not recomputed.
FLOPs per step: the model-FLOP count of trainer/cmd_bench.cpp (ported in step_flops), so the
TFLOP/s and MFU columns mean the same in both tables.

Usage:
  python3 bench/torch_reference_step.py --shape tinyllama-1.1b --device cuda --lengths 8192,32768
  python3 bench/torch_reference_step.py --shape tiny --device cpu --dtype fp32 --cache 64 \
      --lengths 256 --steps 1          # a CPU check of the code path
  python3 bench/torch_reference_step.py --self-check [--device cuda]   # paths agree with each other
"""
import argparse
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

try:  # torch >= 2.0
    from torch.nn.functional import scaled_dot_product_attention as sdpa
except ImportError:  # torch 1.13 (the CPU machine's Debian package): explicit softmax only
    sdpa = None
try:  # torch >= 2.3: lower-right causal masks that SDPA hands to the flash kernel
    from torch.nn.attention.bias import causal_lower_right
except ImportError:
    causal_lower_right = None

# HF config fields of the shapes `freqkv bench` knows (trainer/cmd_bench.cpp, builtin_shape).
SHAPES = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, rope_theta=1e4, rms_norm_eps=1e-5),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rope_theta=1e4, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=258, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=1e4, rms_norm_eps=1e-5),
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# ----------------------------------------------------------------------------------------------
# FreqKV geometry (docs: FREQKV.md, "Parameters" and "Schedule")
# ----------------------------------------------------------------------------------------------
class FreqKV:
    """Cache C, sink S, ratio r and what follows: F = C - S, L = floor(F r), step = F - L."""

    def __init__(self, cache, sink, ratio):
        if sink < 0:
            raise ValueError("sink size must be >= 0 (got %d)" % sink)
        if sink >= cache:
            raise ValueError("sink size (%d) must be smaller than the cache size (%d)" % (sink, cache))
        self.cache, self.sink, self.ratio = cache, sink, ratio
        self.span = cache - sink
        self.kept = int(math.floor(self.span * ratio))
        self.step = self.span - self.kept
        if self.kept < 1:
            raise ValueError("compressed length L = floor(%d*%g) = %d < 1" % (self.span, ratio, self.kept))
        if self.step < 1:
            raise ValueError("step = F - L = %d < 1" % self.step)

    def chunks(self, T):
        """[(start, end)] token ranges of the chunks of a length-T sequence."""
        bounds = [(0, min(self.cache, T))]
        start = self.cache
        while start < T:
            bounds.append((start, min(start + self.step, T)))
            start += self.step
        return bounds


def attention_blocks(T, freqkv):
    """(n_queries, n_keys) of each chunk's attention, and (n_src, n_dst) of each compression."""
    if freqkv is None:
        return [(T, T)], []
    chunks = freqkv.chunks(T)
    blocks = [(chunks[0][1], chunks[0][1])]
    blocks += [(b - a, freqkv.sink + freqkv.kept + b - a) for a, b in chunks[1:]]
    compressions = [(freqkv.span, freqkv.kept)] * (len(chunks) - 1)
    return blocks, compressions


# ----------------------------------------------------------------------------------------------
# Model FLOPs: the count of trainer/cmd_bench.cpp (gemm_parameters, step_flops), ported
# ----------------------------------------------------------------------------------------------
def gemm_parameters(cfg):
    """Weights that multiply activations: every layer's projections and the LM head."""
    H, D, I = cfg["hidden_size"], head_dim(cfg), cfg["intermediate_size"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = H * Hq * D + 2 * H * Hkv * D + Hq * D * H + 3 * H * I
    return per_layer * cfg["num_hidden_layers"] + cfg["vocab_size"] * H


def step_flops(cfg, T, batch, freqkv):
    """Model FLOPs of one forward + backward: 6 N tokens for GEMMs, causal (query, key) pairs
    4 D Hq each forward and twice that backward, compressions 4 L F channels (forward + adjoint)."""
    layers = cfg["num_hidden_layers"]
    gemm = 6.0 * gemm_parameters(cfg) * batch * T
    blocks, compressions = attention_blocks(T, freqkv)
    pairs = sum(nq * (nk - nq) + nq * (nq + 1) / 2.0 for nq, nk in blocks)
    attention = 3.0 * 4.0 * pairs * head_dim(cfg) * cfg["num_attention_heads"] * layers * batch
    channels = 2.0 * cfg["num_key_value_heads"] * head_dim(cfg)
    compression = sum(4.0 * n_dst * n_src * channels * layers * batch for n_src, n_dst in compressions)
    return gemm + attention + compression


# ----------------------------------------------------------------------------------------------
# The compression operator, as a GEMM or through FFTs
# ----------------------------------------------------------------------------------------------
def dct_matrix(N):
    """Orthonormal DCT-II matrix (float64): D[k, n] = a_k cos(pi (2n+1) k / 2N)."""
    k = torch.arange(N, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(N, dtype=torch.float64).unsqueeze(0)
    scale = torch.full((N, 1), math.sqrt(2.0 / N), dtype=torch.float64)
    scale[0, 0] = math.sqrt(1.0 / N)
    return scale * torch.cos(math.pi * (2.0 * n + 1.0) * k / (2.0 * N))


class GemmCompression:
    """M' = P X with P (L x F) built in float64 and cast once; P = [P_a | P_b] so the update
    P [M ; X_g] = P_a M + P_b X_g reads the memory and the chunk where they are."""

    def __init__(self, N, L, dtype, device):
        P = math.sqrt(L / N) * dct_matrix(L).t() @ dct_matrix(N)[:L, :]
        self.P = P.to(device=device, dtype=dtype)
        self.P_memory, self.P_chunk = self.P[:, :L], self.P[:, L:]

    def first(self, rows):  # rows [B, F, channels] -> [B, L, channels]
        return torch.matmul(self.P, rows)

    def update(self, memory, chunk):  # [B, L, ch], [B, step, ch] -> [B, L, ch]
        return torch.matmul(self.P_memory, memory) + torch.matmul(self.P_chunk, chunk)


class FftCompression:
    """The authors' formulation: y = sqrt(L/N) DCT-III_L(DCT-II_N(x)[:L]), both orthonormal, each
    an FFT with Makhoul's reordering (even samples, then odd ones reversed), along the rows."""

    def __init__(self, N, L, dtype, device):
        self.N, self.L = N, L
        self.out_dtype = dtype
        self.fft_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cdt = torch.complex128 if self.fft_dtype == torch.float64 else torch.complex64

        def reorder(n):  # v[m] = x[2m] for m < ceil(n/2), then x[2(n-1-m)+1]
            half = (n + 1) // 2
            return torch.tensor([2 * m if m < half else 2 * (n - 1 - m) + 1 for m in range(n)],
                                device=device)

        def unorder(n):  # x[j] = v[j/2] for even j, v[n-1-(j-1)/2] for odd j
            return torch.tensor([j // 2 if j % 2 == 0 else n - 1 - j // 2 for j in range(n)],
                                device=device)

        self.forward_order = reorder(N)
        self.inverse_order = unorder(L)
        k = torch.arange(L, dtype=torch.float64)
        ortho_N = torch.full((L,), math.sqrt(2.0 / N), dtype=torch.float64)
        ortho_N[0] = math.sqrt(1.0 / N)
        # DCT-II_N coefficient k = a_k Re(exp(-i pi k / 2N) FFT(v)_k)
        self.forward_twiddle = (torch.polar(ortho_N, -math.pi * k / (2 * N))
                                .to(device=device, dtype=cdt).unsqueeze(1))
        # DCT-III_L from coefficients X: s_k = X_k / a_k (a_k of length L), then the FFT of the
        # reordered output is V_k = exp(i pi k / 2L) (s_k - i s_{L-k}) (s_L = 0), k <= L/2
        ortho_L = torch.full((L,), math.sqrt(2.0 / L), dtype=torch.float64)
        ortho_L[0] = math.sqrt(1.0 / L)
        half = L // 2 + 1
        kh = torch.arange(half, dtype=torch.float64)
        self.inverse_twiddle = (torch.polar(torch.ones(half, dtype=torch.float64), math.pi * kh / (2 * L))
                                .to(device=device, dtype=cdt).unsqueeze(1))
        self.inverse_scale = (math.sqrt(L / N) / ortho_L).to(device=device, dtype=self.fft_dtype).unsqueeze(1)

    def compress(self, rows):  # rows [B, N, ch] -> [B, L, ch]
        x = rows.to(self.fft_dtype)
        v = x.index_select(-2, self.forward_order)
        coefficients = (torch.fft.fft(v, dim=-2)[..., :self.L, :] * self.forward_twiddle).real
        s = coefficients * self.inverse_scale  # the rescale sqrt(L/N) folded in (linear)
        half = self.L // 2 + 1
        s_mirror = torch.cat([torch.zeros_like(s[..., :1, :]), s.flip(-2)[..., :half - 1, :]], dim=-2)
        spectrum = torch.complex(s[..., :half, :], -s_mirror) * self.inverse_twiddle
        w = torch.fft.irfft(spectrum, n=self.L, dim=-2)
        return w.index_select(-2, self.inverse_order).to(self.out_dtype)

    def first(self, rows):
        return self.compress(rows)

    def update(self, memory, chunk):
        return self.compress(torch.cat([memory, chunk], dim=-2))


# ----------------------------------------------------------------------------------------------
# Layer pieces
# ----------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """Hugging Face LLaMA's RMSNorm: statistics in fp32 (or fp64), scaled in the weight dtype."""
    stat = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    stat = stat * torch.rsqrt(stat.pow(2).mean(-1, keepdim=True) + eps)
    return weight * stat.to(x.dtype)


class RopeTable:
    """cos/sin of rotate-half RoPE at positions 0..n-1, built in float64, cast to the compute dtype."""

    def __init__(self, n, D, theta, dtype, device):
        inv_freq = theta ** (-(2.0 * torch.arange(D // 2, dtype=torch.float64)) / D)
        angles = torch.arange(n, dtype=torch.float64).unsqueeze(1) * inv_freq.unsqueeze(0)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = torch.cos(angles).to(device=device, dtype=dtype)
        self.sin = torch.sin(angles).to(device=device, dtype=dtype)

    def rotate(self, x, first, n):
        """x [..., n, D] rotated at positions first..first+n-1."""
        cos, sin = self.cos[first:first + n], self.sin[first:first + n]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def explicit_attention(q, k, v):
    """Bottom-right causal attention as a masked softmax (fp32 scores for 16-bit inputs)."""
    nq, nk = q.shape[-2], k.shape[-2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    i = torch.arange(nq, device=q.device).unsqueeze(1)
    j = torch.arange(nk, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(j > i + (nk - nq), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.to(work)).to(q.dtype)


def attend(q, k, v, implementation):
    """q [N, Hq, nq, D], k/v [N, Hkv, nk, D] (nk >= nq): causal, the last query sees every key."""
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:  # GQA: each KV head serves `repeat` query heads (HF LLaMA's repeat_kv)
        N, Hkv, nk, D = k.shape
        k = k[:, :, None].expand(N, Hkv, repeat, nk, D).reshape(N, Hkv * repeat, nk, D)
        v = v[:, :, None].expand(N, Hkv, repeat, nk, D).reshape(N, Hkv * repeat, nk, D)
    nq, nk = q.shape[-2], k.shape[-2]
    if implementation == "explicit" or sdpa is None:
        return explicit_attention(q, k, v)
    if nq == nk:
        return sdpa(q, k, v, is_causal=True)
    if causal_lower_right is not None and q.is_cuda:  # the flash / memory-efficient kernels
        return sdpa(q, k, v, attn_mask=causal_lower_right(nq, nk))
    i = torch.arange(nq, device=q.device).unsqueeze(1)
    j = torch.arange(nk, device=q.device).unsqueeze(0)
    return sdpa(q, k, v, attn_mask=j <= i + (nk - nq))


class StepContext:
    """What every layer shares: the FreqKV geometry, the compression, the RoPE table."""

    def __init__(self, cfg, T, freqkv, dct, attention, dtype, device):
        self.cfg, self.T, self.freqkv = cfg, T, freqkv
        self.attention = attention
        self.D = head_dim(cfg)
        self.Hq, self.Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.eps = float(cfg["rms_norm_eps"])
        positions = T if freqkv is None else min(T, freqkv.cache)
        self.rope = RopeTable(max(positions, 1), self.D, float(cfg.get("rope_theta", 10000.0)), dtype, device)
        self.compression = None
        if freqkv is not None and T > freqkv.cache:
            make = GemmCompression if dct == "gemm" else FftCompression
            self.compression = make(freqkv.span, freqkv.kept, dtype, device)


def chunk_attention(ctx, q, kv, query_first):
    """Attention of Bc chunks: q [Bc, nq, Hq, D] pre-RoPE, kv [Bc, nk, 2 Hkv D] pre-RoPE key|value
    rows in cache layout (key positions 0..nk-1), queries at query_first..; -> [Bc, nq, Hq D]."""
    Bc, nq = q.shape[0], q.shape[1]
    nk = kv.shape[1]
    width = ctx.Hkv * ctx.D
    k = kv[..., :width].reshape(Bc, nk, ctx.Hkv, ctx.D).transpose(1, 2)
    v = kv[..., width:].reshape(Bc, nk, ctx.Hkv, ctx.D).transpose(1, 2)
    k = ctx.rope.rotate(k, 0, nk)
    q = ctx.rope.rotate(q.transpose(1, 2), query_first, nq)
    out = attend(q, k, v, ctx.attention)
    return out.transpose(1, 2).reshape(Bc, nq, ctx.Hq * ctx.D)


def freqkv_attention(ctx, q, kv):
    """q [B, T, Hq, D], kv [B, T, 2 Hkv D], both before RoPE -> [B, T, Hq D]."""
    B, T = q.shape[0], q.shape[1]
    f = ctx.freqkv
    if f is None or T <= f.cache:  # one chunk: plain causal attention, positions 0..T-1
        return chunk_attention(ctx, q, kv, 0)
    S, L, C, step = f.sink, f.kept, f.cache, f.step
    chunks = f.chunks(T)
    # Memories M_1..M_{G-1}, in chunk order: M_1 = P X[S:C], M_{g+1} = P [M_g ; X_g].
    memories = [ctx.compression.first(kv[:, S:C])]
    for a, b in chunks[1:-1]:  # every chunk but the last is full: [M_g ; X_g] has F rows
        memories.append(ctx.compression.update(memories[-1], kv[:, a:b]))
    outputs = [chunk_attention(ctx, q[:, :C], kv[:, :C], 0)]
    full = sum(1 for a, b in chunks[1:] if b - a == step)
    if full:  # the full chunks as one batch: keys [sink ; M_g ; X_g], C rows each
        end = C + full * step
        sink = kv[:, None, :S].expand(B, full, S, kv.shape[-1])
        rows = torch.cat([sink, torch.stack(memories[:full], dim=1),
                          kv[:, C:end].reshape(B, full, step, kv.shape[-1])], dim=2)
        qs = q[:, C:end].reshape(B * full, step, ctx.Hq, ctx.D)
        out = chunk_attention(ctx, qs, rows.reshape(B * full, C, kv.shape[-1]), S + L)
        outputs.append(out.reshape(B, full * step, ctx.Hq * ctx.D))
    a, b = chunks[-1]
    if b - a < step:  # the partial last chunk
        rows = torch.cat([kv[:, :S], memories[-1], kv[:, a:b]], dim=1)
        outputs.append(chunk_attention(ctx, q[:, a:b], rows, S + L))
    return torch.cat(outputs, dim=1)


def layer_forward(ctx, x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd):
    B, T, _ = x.shape
    h = rms_norm(x, w_in, ctx.eps)
    q = F.linear(h, wq).view(B, T, ctx.Hq, ctx.D)
    kv = F.linear(h, torch.cat([wk, wv], dim=0))  # keys | values, before RoPE
    x = x + F.linear(freqkv_attention(ctx, q, kv), wo)
    h = rms_norm(x, w_post, ctx.eps)
    return x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)


LAYER_PARAMS = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj"]


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden W^T, targets)) * scale over row blocks: each block's logits in
    fp32 become their gradient (softmax - one-hot) at once, so no block's logits outlive it and
    the backward only scales the gradients found in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, block, scale):
        work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device)
        total = torch.zeros((), dtype=work, device=hidden.device)
        for start in range(0, hidden.shape[0], block):
            h = hidden[start:start + block]
            t = targets[start:start + block]
            logits = F.linear(h, weight).to(work)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(h.shape[0], device=h.device), t] -= 1.0
            g = probs.mul_(scale).to(hidden.dtype)
            grad_hidden[start:start + block] = g @ weight
            grad_weight += (g.t() @ h).to(work)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype),
                (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None)


def mean_loss(params, cfg, inputs, targets, ctx, recompute=True, loss_block=4096):
    """Mean next-token cross-entropy of inputs/targets [B, T] (int64) through the whole model."""
    B, T = inputs.shape
    x = F.embedding(inputs, params["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        weights = [params["model.layers.%d.%s.weight" % (i, name)] for name in LAYER_PARAMS]
        if recompute:
            x = torch.utils.checkpoint.checkpoint(layer_forward, ctx, x, *weights,
                                                  use_reentrant=False, preserve_rng_state=False)
        else:
            x = layer_forward(ctx, x, *weights)
    x = rms_norm(x, params["model.norm.weight"], ctx.eps)
    head = params["model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"]
    return LinearCrossEntropy.apply(x.reshape(B * T, -1), head, targets.reshape(-1), loss_block,
                                    1.0 / (B * T))


def param_shapes(cfg):
    H, I, V, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], head_dim(cfg)
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    per_layer = {"input_layernorm": (H,), "self_attn.q_proj": (Hq * D, H),
                 "self_attn.k_proj": (Hkv * D, H), "self_attn.v_proj": (Hkv * D, H),
                 "self_attn.o_proj": (H, Hq * D), "post_attention_layernorm": (H,),
                 "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes["model.layers.%d.%s.weight" % (i, name)] = shape
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def random_params(cfg, dtype, device, seed):
    """N(0, 0.02) weights (drawn in fp32 on the device, then cast), norm weights one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = torch.ones(shape, device=device, dtype=dtype)
        else:
            w = (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)
        params[name] = w.requires_grad_(True)
    return params


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(args, cfg, params, device, dtype, T, use_freqkv):
    freqkv = FreqKV(args.cache, args.sink, args.ratio) if use_freqkv else None
    blocks, _ = attention_blocks(T, freqkv)
    row = dict(length=T, freqkv=use_freqkv, chunks=len(blocks), flops=step_flops(cfg, T, args.batch, freqkv))
    try:
        ctx = StepContext(cfg, T, freqkv, args.dct, args.attention, dtype, device)
        generator = torch.Generator(device=device)
        generator.manual_seed(args.seed + 1)
        inputs = torch.randint(0, cfg["vocab_size"], (args.batch, T), generator=generator, device=device)
        targets = torch.randint(0, cfg["vocab_size"], (args.batch, T), generator=generator, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            for p in params.values():
                p.grad = None
            mean_loss(params, cfg, inputs, targets, ctx, args.recompute, args.loss_block).backward()

        for _ in range(args.warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        row["seconds"] = (time.perf_counter() - start) / args.steps
        if device.type == "cuda":
            row["peak_bytes"] = float(torch.cuda.max_memory_allocated(device))
        else:  # the process's high-water mark so far (Linux: KiB)
            row["peak_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0
    except (RuntimeError, ValueError) as e:  # out of memory among them: the other cases go on
        row["error"] = str(e).splitlines()[0][:200]
    finally:
        for p in params.values():
            p.grad = None
    return row


WIDTHS = [7, 12, 6, 8, 9, 10, 8, 6, 12]


def print_row(cells):
    line = "|"
    for i, cell in enumerate(cells):
        pad = " " * max(0, WIDTHS[i] - len(cell))
        line += " " + (cell + pad if i == 1 else pad + cell) + " |"
    print(line, flush=True)


def bytes_text(n):
    return "%.2f GiB" % (n / 2 ** 30) if n >= 2 ** 30 else "%.1f MiB" % (n / 2 ** 20)


def row_cells(row, args, peak):
    label = ("freqkv" + (" (fft)" if args.dct == "fft" else "")) if row["freqkv"] else "full"
    cells = [str(row["length"]), label, str(row["chunks"])]
    if "error" in row:
        return cells + ["-", "-", "%.4g" % (row["flops"] / 1e12), "-", "-", "failed"]
    s = row["seconds"]
    tflops = row["flops"] / s / 1e12
    return cells + [("%.4f" if s < 1 else "%.2f") % s, "%.0f" % (args.batch * row["length"] / s),
                    "%.4g" % (row["flops"] / 1e12), ("%.4f" if tflops < 1 else "%.1f") % tflops,
                    "%.1f%%" % (100.0 * tflops / peak) if peak else "n/a", bytes_text(row["peak_bytes"])]


def bench(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = dict(SHAPES[args.shape])
    name = args.shape
    if args.layers is not None:
        if not 1 <= args.layers <= cfg["num_hidden_layers"]:
            raise SystemExit("--layers %d must be in 1..%d for %s" % (args.layers, cfg["num_hidden_layers"], name))
        cfg["num_hidden_layers"] = args.layers
        name += " (its first %d layer%s)" % (args.layers, "" if args.layers == 1 else "s")
    freqkv = FreqKV(args.cache, args.sink, args.ratio)  # validates
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    params = random_params(cfg, dtype, device, args.seed)
    total = sum(p.numel() for p in params.values())
    attention_kernel = ("explicit masked softmax" if args.attention == "explicit" or sdpa is None else
                        "SDPA (chunk 0 is_causal; later chunks %s)"
                        % ("causal_lower_right" if causal_lower_right is not None else "a boolean mask"))
    print("torch reference: %s: %.2fB parameters (%.2fB in GEMMs), %d layers, hidden %d, heads %d/%d kv, "
          "head_dim %d, vocab %d" % (name, total / 1e9, gemm_parameters(cfg) / 1e9, cfg["num_hidden_layers"],
                                     cfg["hidden_size"], cfg["num_attention_heads"],
                                     cfg["num_key_value_heads"], head_dim(cfg), cfg["vocab_size"]))
    print("torch reference: torch %s on %s (%s), %s, batch %d, %d warm-up + %d timed forward+backward steps "
          "per case; FreqKV cache %d, sink %d, ratio %g (kept %d, step %d), compression %s"
          % (torch.__version__, device, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             args.dtype or str(dtype).replace("torch.", ""), args.batch, args.warmup, args.steps,
             freqkv.cache, freqkv.sink, freqkv.ratio, freqkv.kept, freqkv.step,
             "as one GEMM with P" if args.dct == "gemm" else "DCT-II/DCT-III through torch.fft"))
    print("torch reference: attention %s; activation recomputation %s (torch.utils.checkpoint per layer); "
          "MFU against %s (model FLOPs as trainer/cmd_bench.cpp); memory: %s\n"
          % (attention_kernel, "on" if args.recompute else "off",
             "%.0f TFLOP/s" % peak if peak else "no peak (give --peak-tflops)",
             "torch.cuda.max_memory_allocated (weights, gradients, activations)" if device.type == "cuda"
             else "max RSS of the process so far"), flush=True)
    print_row(["length", "attention", "chunks", "step s", "tokens/s", "TFLOP/step", "TFLOP/s", "MFU", "peak memory"])
    print_row(["-" * w for w in WIDTHS])
    rows = []
    for T in args.lengths:
        for use_freqkv in ([True, False] if args.compare_full else [True]):
            print("torch reference: length %d, %s attention..." % (T, "FreqKV" if use_freqkv else "full"),
                  file=sys.stderr, flush=True)
            rows.append(run_case(args, cfg, params, device, dtype, T, use_freqkv))
            print_row(row_cells(rows[-1], args, peak))
    print()
    for row in rows:
        if "error" in row:
            print("length %d, %s: failed: %s" % (row["length"], "freqkv" if row["freqkv"] else "full", row["error"]))
    return 1 if any("error" in r for r in rows) else 0


# ----------------------------------------------------------------------------------------------
# --self-check: the code paths against each other (SDPA vs explicit softmax, GEMM vs FFT, with
# and without recomputation, bf16 vs fp32) on a small model, on whatever device is given
# ----------------------------------------------------------------------------------------------
def loss_and_grads(cfg, params, inputs, targets, freqkv, dct, attention, recompute, dtype, device):
    ctx = StepContext(cfg, inputs.shape[1], freqkv, dct, attention, dtype, device)
    run = {n: p.detach().to(dtype).requires_grad_(True) for n, p in params.items()}
    loss = mean_loss(run, cfg, inputs, targets, ctx, recompute, loss_block=100)
    loss.backward()
    return float(loss), {n: p.grad.double() for n, p in run.items()}


def self_check(args):
    device = torch.device(args.device)
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, rms_norm_eps=1e-5)
    precise = torch.float32 if device.type == "cuda" else torch.float64
    # fp32 on the GPU: SDPA's kernels sum in another order than the explicit softmax
    loss_tol, grad_tol = (1e-5, 1e-3) if precise == torch.float32 else (1e-9, 1e-8)
    params = random_params(cfg, precise, device, 3)
    with torch.no_grad():  # larger weights than 0.02, so attention is far from uniform
        for n, p in params.items():
            if not n.endswith("norm.weight"):
                p.mul_(1.0 / (0.02 * math.sqrt(p.shape[1])))
    generator = torch.Generator(device=device)
    generator.manual_seed(5)
    T = 300
    inputs = torch.randint(0, 96, (2, T), generator=generator, device=device)
    targets = torch.randint(0, 96, (2, T), generator=generator, device=device)
    freqkv = FreqKV(64, 4, 0.5)  # F 60, L 30, step 30: chunks 64, 30 x 7, 26
    base = loss_and_grads(cfg, params, inputs, targets, freqkv, "gemm", "explicit", False, precise, device)
    variants = [("gemm, sdpa, recompute", "gemm", "sdpa", True, precise, loss_tol, grad_tol),
                ("fft, sdpa, recompute", "fft", "sdpa", True, precise, loss_tol, grad_tol),
                ("fft, explicit", "fft", "explicit", False, precise, loss_tol, grad_tol),
                ("gemm, sdpa, recompute, bf16", "gemm", "sdpa", True, torch.bfloat16, 3e-2, 0.1)]
    failed = 0
    print("self-check on %s (%s): loss %.8f with gemm, explicit softmax, no recompute, %s"
          % (device, "SDPA" if sdpa is not None else "no SDPA: explicit everywhere", base[0], precise))
    for label, dct, attention, recompute, dtype, loss_tol, grad_tol in variants:
        loss, grads = loss_and_grads(cfg, params, inputs, targets, freqkv, dct, attention, recompute, dtype, device)
        rel = abs(loss - base[0]) / abs(base[0])
        worst = max(float((grads[n] - base[1][n]).norm() / base[1][n].norm()) for n in grads)
        ok = rel <= loss_tol and worst <= grad_tol
        failed += not ok
        print("  %-30s loss rel %.2e (<= %.0e), worst gradient rel %.2e (<= %.0e): %s"
              % (label, rel, loss_tol, worst, grad_tol, "ok" if ok else "FAIL"))
    return 1 if failed else 0


def int_list(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="keep only the first N layers")
    ap.add_argument("--lengths", type=int_list, default=[8192, 32768], help="sequence lengths, comma-separated")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--cache", type=int, default=4096)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--dct", choices=["gemm", "fft"], default="gemm",
                    help="compression as one GEMM with P, or the authors' FFT-based DCTs")
    ap.add_argument("--attention", choices=["sdpa", "explicit"], default="sdpa",
                    help="SDPA (when torch has it) or an explicit masked softmax")
    ap.add_argument("--recompute", dest="recompute", action="store_true", default=True,
                    help="activation recomputation per layer (default)")
    ap.add_argument("--no-recompute", dest="recompute", action="store_false")
    ap.add_argument("--compare-full", action="store_true", help="also time plain causal attention")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--loss-block", type=int, default=4096, help="rows per LM-head / cross-entropy block")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default 989 on cuda)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--self-check", action="store_true",
                    help="compare the code paths with each other on a small model and exit")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.loss_block < 1:
        ap.error("--batch, --steps and --loss-block must be >= 1, --warmup >= 0")
    if args.self_check:
        return self_check(args)
    try:
        return bench(args)
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
