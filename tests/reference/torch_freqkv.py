"""Independent float64 PyTorch reference of a LLaMA model with FreqKV attention.

Written from docs/FREQKV.md (the project's specification) and the Hugging Face LLaMA semantics,
NOT from the C++ code in this repository.  Clarity over speed: FreqKV is a plain loop over chunks
and autograd supplies every gradient.

Model (HF names): model.embed_tokens.weight [V,H]; per layer i
model.layers.{i}.input_layernorm.weight, .self_attn.{q,k,v,o}_proj.weight,
.post_attention_layernorm.weight, .mlp.{gate,up,down}_proj.weight; model.norm.weight;
lm_head.weight (absent when tie_word_embeddings: logits then use embed_tokens).

FreqKV schedule (per layer, per sequence of T tokens; C cache, S sink, r ratio):
  F = C - S, L = floor(F r), step = F - L
  chunk 0      : tokens [0, min(C,T)), plain causal attention, RoPE positions 0..n0-1
  M_1          = P . X[S:C]                     (X = pre-RoPE keys, and values, separately)
  chunk g >= 1 : tokens [C+(g-1)step, min(C+g step, T)), n_g of them; keys/values
                 [X[0:S]; M_g; X_g], key positions 0..S+L+n_g-1, query positions S+L..S+L+n_g-1,
                 bottom-right causal mask
  M_{g+1}      = P . [M_g; X_g]
  P            = sqrt(L/N) IDCT_L(DCT_N(x)[:L])  (orthonormal DCT-II / DCT-III, N = F)

Usage as a CLI (mirrors `freqkv eval-loss`):
  /usr/bin/python3 tests/reference/torch_freqkv.py eval-loss --model DIR --tokens FILE \
      --token-dtype uint16 --seq-len T [--stride K] [--cache C --sink S --ratio R | --no-freqkv] \
      [--grads-out FILE]
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_io  # noqa: E402

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# FreqKV geometry and the compression operator
# ----------------------------------------------------------------------------------------------
def freqkv_dims(C, S, r):
    """(F, L, step) for cache C, sink S, ratio r; raises ValueError for invalid configurations."""
    if S < 0:
        raise ValueError("sink size must be >= 0 (got %d)" % S)
    if S >= C:
        raise ValueError("sink size (%d) must be smaller than the cache size (%d)" % (S, C))
    F = C - S
    L = int(math.floor(F * r))
    step = F - L
    if L < 1:
        raise ValueError("compressed length L = floor(%d*%g) = %d < 1" % (F, r, L))
    if step < 1:
        raise ValueError("step = F - L = %d < 1" % step)
    return F, L, step


def chunk_bounds(T, C, step):
    """[(start, end)] of the FreqKV chunks of a length-T sequence."""
    bounds = [(0, min(C, T))]
    s = C
    while s < T:
        bounds.append((s, min(s + step, T)))
        s += step
    return bounds


def dct_matrix(N):
    """Orthonormal DCT-II matrix: D[k, n] = a_k cos(pi (2n+1) k / 2N), a_0 = sqrt(1/N), else sqrt(2/N)."""
    k = torch.arange(N, dtype=DT).unsqueeze(1)
    n = torch.arange(N, dtype=DT).unsqueeze(0)
    D = torch.cos(math.pi * (2.0 * n + 1.0) * k / (2.0 * N))
    a = torch.full((N, 1), math.sqrt(2.0 / N), dtype=DT)
    a[0, 0] = math.sqrt(1.0 / N)
    return a * D


def compression_matrix(N, L):
    """P (L x N) = sqrt(L/N) * D_L^T D_N[:L, :]: DCT_N, keep L lowest coefficients, IDCT_L, rescale."""
    return math.sqrt(L / N) * dct_matrix(L).t() @ dct_matrix(N)[:L, :]


# ----------------------------------------------------------------------------------------------
# LLaMA pieces
# ----------------------------------------------------------------------------------------------
def rms_norm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps))


def apply_rope(x, positions, theta):
    """Rotate-half RoPE on the last dim of x [..., n, D] at the given integer positions [n]."""
    D = x.shape[-1]
    half = D // 2
    inv_freq = theta ** (-(2.0 * torch.arange(half, dtype=DT)) / D)
    ang = torch.as_tensor(positions, dtype=DT).unsqueeze(1) * inv_freq.unsqueeze(0)  # [n, D/2]
    cos = torch.cat([torch.cos(ang), torch.cos(ang)], dim=-1)
    sin = torch.cat([torch.sin(ang), torch.sin(ang)], dim=-1)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q, k, v):
    """Causal attention, bottom-right aligned. q [B,Hq,nq,D]; k, v [B,Hkv,nk,D] (GQA by repeat)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    nq, nk, D = q.shape[2], k.shape[2], q.shape[3]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    i = torch.arange(nq).unsqueeze(1)
    j = torch.arange(nk).unsqueeze(0)
    masked = j > i + (nk - nq)
    scores = scores.masked_fill(masked, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def plain_attention(q, k, v, theta):
    """Ordinary causal attention with absolute RoPE positions 0..T-1 (pre-RoPE q, k in)."""
    pos = torch.arange(q.shape[2])
    return attend(apply_rope(q, pos, theta), apply_rope(k, pos, theta), v)


def freqkv_attention(q, k, v, theta, C, S, r):
    """FreqKV attention. q [B,Hq,T,D], k/v [B,Hkv,T,D], q and k BEFORE RoPE. Returns [B,Hq,T,D]."""
    T = q.shape[2]
    F, L, step = freqkv_dims(C, S, r)
    P = compression_matrix(F, L)  # [L, F], acts on the sequence axis
    bounds = chunk_bounds(T, C, step)
    outs = []
    a, b = bounds[0]
    pos = torch.arange(b - a)
    outs.append(attend(apply_rope(q[:, :, a:b], pos, theta), apply_rope(k[:, :, a:b], pos, theta),
                       v[:, :, a:b]))
    if len(bounds) > 1:
        Mk = P @ k[:, :, S:C]  # [B,Hkv,L,D]
        Mv = P @ v[:, :, S:C]
    for g in range(1, len(bounds)):
        a, b = bounds[g]
        n = b - a
        kk = torch.cat([k[:, :, :S], Mk, k[:, :, a:b]], dim=2)
        vv = torch.cat([v[:, :, :S], Mv, v[:, :, a:b]], dim=2)
        kpos = torch.arange(S + L + n)
        qpos = torch.arange(S + L, S + L + n)
        outs.append(attend(apply_rope(q[:, :, a:b], qpos, theta), apply_rope(kk, kpos, theta), vv))
        if g + 1 < len(bounds):  # a next chunk exists, so this chunk is full: [M_g; X_g] has F rows
            assert n == step
            Mk = P @ torch.cat([Mk, k[:, :, a:b]], dim=2)
            Mv = P @ torch.cat([Mv, v[:, :, a:b]], dim=2)
    return torch.cat(outs, dim=2)


def make_attn_fn(freqkv=True, C=None, S=4, r=0.5):
    if not freqkv:
        return lambda q, k, v, theta: plain_attention(q, k, v, theta)
    freqkv_dims(C, S, r)  # validate up front, whatever T is
    return lambda q, k, v, theta: freqkv_attention(q, k, v, theta, C, S, r)


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def forward_logits(params, cfg, ids, attn_fn):
    """ids [B,T] int64 -> logits [B,T,V]."""
    H = cfg["hidden_size"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = head_dim(cfg)
    eps = float(cfg["rms_norm_eps"])
    theta = float(cfg.get("rope_theta", 10000.0))
    B, T = ids.shape
    x = params["model.embed_tokens.weight"][ids]  # [B,T,H]
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        h = rms_norm(x, params[p + "input_layernorm.weight"], eps)
        q = (h @ params[p + "self_attn.q_proj.weight"].t()).view(B, T, Hq, D).transpose(1, 2)
        k = (h @ params[p + "self_attn.k_proj.weight"].t()).view(B, T, Hkv, D).transpose(1, 2)
        v = (h @ params[p + "self_attn.v_proj.weight"].t()).view(B, T, Hkv, D).transpose(1, 2)
        o = attn_fn(q, k, v, theta)  # [B,Hq,T,D]
        o = o.transpose(1, 2).reshape(B, T, Hq * D)
        x = x + o @ params[p + "self_attn.o_proj.weight"].t()
        h = rms_norm(x, params[p + "post_attention_layernorm.weight"], eps)
        gate = h @ params[p + "mlp.gate_proj.weight"].t()
        up = h @ params[p + "mlp.up_proj.weight"].t()
        x = x + (torch.nn.functional.silu(gate) * up) @ params[p + "mlp.down_proj.weight"].t()
    x = rms_norm(x, params["model.norm.weight"], eps)
    if cfg.get("tie_word_embeddings", False):
        head = params["model.embed_tokens.weight"]
    else:
        head = params["lm_head.weight"]
    return x @ head.t()


def loss_sum(params, cfg, inputs, targets, attn_fn):
    logits = forward_logits(params, cfg, inputs, attn_fn)
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
                                             reduction="sum")


# ----------------------------------------------------------------------------------------------
# eval-loss
# ----------------------------------------------------------------------------------------------
def make_windows(tokens, T, stride=None):
    """[n, T+1] windows starting every `stride` tokens (default T+1); partial windows dropped."""
    if stride is None:
        stride = T + 1
    starts = list(range(0, len(tokens) - (T + 1) + 1, stride))
    if not starts:
        return np.zeros((0, T + 1), dtype=np.int64)
    return np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s in starts])


def torch_params(params_np, requires_grad=True):
    return {n: torch.tensor(np.asarray(a, dtype=np.float64), dtype=DT, requires_grad=requires_grad)
            for n, a in params_np.items()}


def eval_loss(cfg, params_np, tokens, T, stride=None, batch=1, freqkv=True, cache=None, sink=4,
              ratio=0.5, grads=True):
    """Mean next-token loss over all windows (and its gradient). Returns a result dict."""
    if cache is None:
        cache = cfg["max_position_embeddings"]
    attn_fn = make_attn_fn(freqkv, cache, sink, ratio)
    win = make_windows(tokens, T, stride)
    n = win.shape[0]
    if n == 0:
        raise ValueError("no window of %d tokens fits in %d tokens" % (T + 1, len(tokens)))
    params = torch_params(params_np, requires_grad=grads)
    total = torch.zeros((), dtype=DT)
    for s in range(0, n, max(1, batch)):  # batching does not change the math: mean over all tokens
        w = torch.as_tensor(win[s:s + batch])
        total = total + loss_sum(params, cfg, w[:, :T], w[:, 1:], attn_fn)
    loss = total / (n * T)
    out = {"loss": float(loss), "ppl": math.exp(float(loss)), "windows": n, "tokens": n * T}
    if grads:
        loss.backward()
        out["grads"] = {name: p.grad.detach().numpy().copy() for name, p in params.items()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval-loss")
    ev.add_argument("--model", required=True)
    ev.add_argument("--tokens", required=True)
    ev.add_argument("--token-dtype", default="uint16", choices=sorted(hf_io.TOKEN_DTYPES))
    ev.add_argument("--seq-len", type=int, required=True)
    ev.add_argument("--batch", type=int, default=1)
    ev.add_argument("--stride", type=int, default=None)
    ev.add_argument("--cache", type=int, default=None)
    ev.add_argument("--sink", type=int, default=4)
    ev.add_argument("--ratio", type=float, default=0.5)
    ev.add_argument("--no-freqkv", action="store_true")
    ev.add_argument("--grads-out", default=None)
    sub.add_parser("self-test")
    args = ap.parse_args(argv)
    if args.cmd == "self-test":
        import self_test
        return self_test.run_all()
    cfg, params = hf_io.load_model_dir(args.model)
    tokens = hf_io.read_tokens(args.tokens, args.token_dtype)
    try:
        res = eval_loss(cfg, params, tokens, args.seq_len, args.stride, args.batch,
                        not args.no_freqkv, args.cache, args.sink, args.ratio,
                        grads=args.grads_out is not None)
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    grads = res.pop("grads", None)
    if args.grads_out:
        hf_io.save_safetensors(args.grads_out, grads, "F32")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
