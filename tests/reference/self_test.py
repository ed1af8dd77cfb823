"""Self-checks of the independent FreqKV reference (no C++ binary needed).

Run:  /usr/bin/python3 tests/reference/parity.py --self-test
 or:  /usr/bin/python3 tests/reference/self_test.py

Checks
  dims        F/L/step and chunk arithmetic, invalid configurations rejected
  operator    DCT orthonormal; P against an FFT-built DCT; P.1 = 1; P = I when L = N;
              P P^T = (L/N) I; low cosines resample onto the L grid
  short       T <= C: FreqKV == plain causal attention (attention and whole-model loss)
  naive       vectorised FreqKV == a token-by-token recompute written with math.cos loops
              (generation view: cache grows to C, [S,C) compressed to L rows, ...), all chunks
  active      T > C: FreqKV differs from plain attention (compression is really on)
  gradcheck   torch.autograd.gradcheck of the FreqKV attention (gradients through memories)
  fd          whole-model gradient vs central finite differences on several entries
  io          bf16 rounding, safetensors round trips, sharded == single file, token files,
              windows/stride arithmetic, batch invariance, the reference CLI
"""
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_io  # noqa: E402
import torch_freqkv as R  # noqa: E402

DT = torch.float64
_results = []


def check(name, ok, detail=""):
    _results.append((name, bool(ok), detail))
    print("  [%s] %s %s" % ("ok" if ok else "FAIL", name, detail))


def maxdiff(a, b):
    a = a.detach().numpy() if torch.is_tensor(a) else np.asarray(a)
    b = b.detach().numpy() if torch.is_tensor(b) else np.asarray(b)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# ----------------------------------------------------------------------------------------------
# A token-by-token recompute, written without torch and without matrices.
# ----------------------------------------------------------------------------------------------
def _compress_rows(rows, L):
    """rows: list of N channel-vectors -> L vectors: per channel DCT-II, keep L, DCT-III, rescale."""
    N = len(rows)
    D = len(rows[0])
    out = [[0.0] * D for _ in range(L)]
    for c in range(D):
        coeff = []
        for kk in range(L):
            a = math.sqrt(1.0 / N) if kk == 0 else math.sqrt(2.0 / N)
            coeff.append(a * sum(rows[n][c] * math.cos(math.pi * (2 * n + 1) * kk / (2 * N))
                                 for n in range(N)))
        for m in range(L):
            acc = 0.0
            for kk in range(L):
                a = math.sqrt(1.0 / L) if kk == 0 else math.sqrt(2.0 / L)
                acc += a * coeff[kk] * math.cos(math.pi * (2 * m + 1) * kk / (2 * L))
            out[m][c] = math.sqrt(L / N) * acc
    return out


def _rope_vec(x, p, theta):
    D = len(x)
    half = D // 2
    y = [0.0] * D
    for j in range(half):
        f = theta ** (-2.0 * j / D)
        c, s = math.cos(p * f), math.sin(p * f)
        y[j] = x[j] * c - x[j + half] * s
        y[j + half] = x[j + half] * c + x[j] * s
    return y


def naive_attention(q, k, v, theta, C=None, S=0, r=0.5, freqkv=True):
    """q [Hq,T,D], k/v [Hkv,T,D] (numpy, pre-RoPE), one sequence. Generation view of FreqKV: the
    cache (pre-RoPE keys and values) grows to C; when a new token arrives and the cache is full,
    rows [S, C) are compressed to L rows; RoPE uses cache indices."""
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    rep = Hq // Hkv
    if freqkv:
        L = int(math.floor((C - S) * r))
    out = np.zeros((Hq, T, D))
    for g in range(Hkv):
        ck, cv = [], []
        for t in range(T):
            if freqkv and len(ck) == C:
                ck = ck[:S] + _compress_rows(ck[S:], L)
                cv = cv[:S] + _compress_rows(cv[S:], L)
            ck.append(list(k[g, t]))
            cv.append(list(v[g, t]))
            n = len(ck)
            keys = [_rope_vec(ck[j], j, theta) for j in range(n)]
            for h in range(g * rep, (g + 1) * rep):
                qr = _rope_vec(list(q[h, t]), n - 1, theta)
                sc = [sum(qr[d] * keys[j][d] for d in range(D)) / math.sqrt(D) for j in range(n)]
                mx = max(sc)
                e = [math.exp(s - mx) for s in sc]
                z = sum(e)
                for d in range(D):
                    out[h, t, d] = sum(e[j] * cv[j][d] for j in range(n)) / z
    return out


def naive_attn_fn(C, S, r, freqkv=True):
    def fn(q, k, v, theta):
        outs = [naive_attention(q[b].detach().numpy(), k[b].detach().numpy(), v[b].detach().numpy(),
                                theta, C, S, r, freqkv) for b in range(q.shape[0])]
        return torch.tensor(np.stack(outs), dtype=DT)
    return fn


def rand_qkv(B, Hq, Hkv, T, D, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=DT) * scale
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=DT) * scale
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=DT)
    return q, k, v


# ----------------------------------------------------------------------------------------------
def test_dims():
    print("dims")
    check("C16 S2 r0.5", R.freqkv_dims(16, 2, 0.5) == (14, 7, 7))
    check("C16 S0 r0.25", R.freqkv_dims(16, 0, 0.25) == (16, 4, 12))
    check("C4096 S4 r0.5 (paper)", R.freqkv_dims(4096, 4, 0.5) == (4092, 2046, 2046))
    check("bounds C16 S2 r0.5 T45",
          R.chunk_bounds(45, 16, 7) == [(0, 16), (16, 23), (23, 30), (30, 37), (37, 44), (44, 45)])
    check("bounds T<=C", R.chunk_bounds(10, 16, 7) == [(0, 10)] and R.chunk_bounds(16, 16, 7) == [(0, 16)])
    for C, S, r, why in [(16, 16, 0.5, "S>=C"), (16, 20, 0.5, "S>C"), (16, -1, 0.5, "S<0"),
                         (4, 2, 0.25, "L<1"), (16, 2, 1.0, "step<1")]:
        try:
            R.freqkv_dims(C, S, r)
            ok = False
        except ValueError:
            ok = True
        check("rejects %s" % why, ok)


def test_operator():
    print("operator")
    for N in [1, 2, 5, 14, 16]:
        D = R.dct_matrix(N)
        check("DCT_%d orthonormal" % N, maxdiff(D @ D.t(), torch.eye(N, dtype=DT)) < 1e-13)

    def dct_fft(x):  # DCT-II along dim 0 via a length-2N FFT of the even extension
        N = x.shape[0]
        y = torch.cat([x, x.flip(0)], dim=0)
        Y = torch.fft.fft(y.to(torch.complex128), dim=0)[:N]
        kk = torch.arange(N, dtype=DT).unsqueeze(1)
        tw = torch.exp(-1j * math.pi * kk / (2 * N))
        X = 0.5 * (tw * Y).real
        a = torch.full((N, 1), math.sqrt(2.0 / N), dtype=DT)
        a[0] = math.sqrt(1.0 / N)
        return a * X

    worst = 0.0
    for N, L in [(14, 7), (16, 4), (12, 6), (11, 5), (5, 2), (9, 9), (7, 1)]:
        P = R.compression_matrix(N, L)
        DN = dct_fft(torch.eye(N, dtype=DT))  # columns = DCT of unit vectors
        DL = dct_fft(torch.eye(L, dtype=DT))
        P_fft = math.sqrt(L / N) * torch.linalg.inv(DL) @ DN[:L]
        worst = max(worst, maxdiff(P, P_fft))
        check("P(%d->%d) constant signal kept" % (N, L),
              maxdiff(P @ torch.ones(N, dtype=DT), torch.ones(L, dtype=DT)) < 1e-13)
        check("P(%d->%d) P P^T = (L/N) I" % (N, L),
              maxdiff(P @ P.t(), (L / N) * torch.eye(L, dtype=DT)) < 1e-13)
        # a low cosine (frequency k < L) sampled on the N grid maps to the same cosine on the L grid
        for kf in range(L):
            xn = torch.cos(math.pi * (2 * torch.arange(N, dtype=DT) + 1) * kf / (2 * N))
            xl = torch.cos(math.pi * (2 * torch.arange(L, dtype=DT) + 1) * kf / (2 * L))
            if maxdiff(P @ xn, xl) > 1e-12:
                check("P(%d->%d) resamples cosine k=%d" % (N, L, kf), False)
    check("P == FFT-built DCT path", worst < 1e-12, "max diff %.2e" % worst)
    for N in [1, 3, 8, 14]:
        check("P(%d->%d) == I" % (N, N), maxdiff(R.compression_matrix(N, N), torch.eye(N, dtype=DT)) < 1e-13)
    # against the loop-written compressor used by the naive recompute
    rng = np.random.default_rng(1)
    x = rng.standard_normal((14, 3))
    y_loop = np.array(_compress_rows([list(r) for r in x], 7))
    check("P == loop DCT->truncate->IDCT->rescale",
          maxdiff(R.compression_matrix(14, 7) @ torch.tensor(x), y_loop) < 1e-12)


def test_short_equals_plain():
    print("short (T <= C)")
    theta = 10000.0
    for T, C, S, r in [(16, 16, 2, 0.5), (10, 16, 4, 0.5), (7, 32, 0, 0.25)]:
        q, k, v = rand_qkv(2, 4, 2, T, 8, seed=T)
        a = R.freqkv_attention(q, k, v, theta, C, S, r)
        b = R.plain_attention(q, k, v, theta)
        c = torch.tensor(np.stack([naive_attention(q[i].numpy(), k[i].numpy(), v[i].numpy(), theta,
                                                   freqkv=False) for i in range(2)]))
        check("T=%d C=%d freqkv == plain" % (T, C), maxdiff(a, b) == 0.0, "diff %.1e" % maxdiff(a, b))
        check("T=%d C=%d plain == naive" % (T, C), maxdiff(b, c) < 1e-12, "diff %.1e" % maxdiff(b, c))
    cfg = hf_io.make_config(vocab_size=50, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, max_position_embeddings=16)
    params = R.torch_params(hf_io.random_params(cfg, 3), requires_grad=False)
    ids = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(0))
    l1 = R.loss_sum(params, cfg, ids[:, :16], ids[:, 1:], R.make_attn_fn(True, 16, 4, 0.5))
    l2 = R.loss_sum(params, cfg, ids[:, :16], ids[:, 1:], R.make_attn_fn(False))
    check("model loss T=C: freqkv == no-freqkv", float(l1) == float(l2), "%.6f %.6f" % (l1, l2))


def test_naive_recompute():
    print("naive (token-by-token recompute)")
    theta = 10000.0
    cases = [  # B, Hq, Hkv, T, D, C, S, r
        (1, 4, 2, 45, 8, 16, 2, 0.5),   # F=14 L=7 step=7, partial last chunk of 1
        (2, 2, 2, 40, 8, 16, 0, 0.25),  # F=16 L=4 step=12, no sink, full chunks
        (1, 2, 1, 27, 8, 12, 1, 0.5),   # F=11 L=5 step=6, partial last chunk of 3
        (1, 2, 2, 30, 4, 16, 4, 0.5),   # F=12 L=6 step=6
        (1, 1, 1, 20, 8, 6, 5, 0.5),    # F=1 -> L=0: invalid, skipped below
        (1, 2, 1, 23, 8, 7, 3, 0.75),   # F=4 L=3 step=1: one new token per chunk
    ]
    for B, Hq, Hkv, T, D, C, S, r in cases:
        try:
            R.freqkv_dims(C, S, r)
        except ValueError:
            continue
        q, k, v = rand_qkv(B, Hq, Hkv, T, D, seed=T + C, scale=0.7)
        a = R.freqkv_attention(q, k, v, theta, C, S, r)
        b = torch.tensor(np.stack([naive_attention(q[i].numpy(), k[i].numpy(), v[i].numpy(), theta,
                                                   C, S, r) for i in range(B)]))
        d = maxdiff(a, b)
        check("T=%d C=%d S=%d r=%g Hq=%d Hkv=%d" % (T, C, S, r, Hq, Hkv), d < 1e-11, "diff %.1e" % d)
    # whole model, with the naive attention plugged in
    cfg = hf_io.make_config(vocab_size=60, hidden_size=16, intermediate_size=24, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=16)
    params = R.torch_params(hf_io.random_params(cfg, 5), requires_grad=False)
    ids = torch.randint(0, 60, (1, 46), generator=torch.Generator().manual_seed(1))
    l1 = R.loss_sum(params, cfg, ids[:, :45], ids[:, 1:], R.make_attn_fn(True, 16, 2, 0.5))
    l2 = R.loss_sum(params, cfg, ids[:, :45], ids[:, 1:], naive_attn_fn(16, 2, 0.5))
    check("model loss T=45 C=16 S=2: vectorised == naive", abs(float(l1) - float(l2)) < 1e-9 * abs(float(l2)),
          "%.10f %.10f" % (l1, l2))


def test_active():
    print("active (T > C)")
    q, k, v = rand_qkv(1, 2, 2, 30, 8, seed=9)
    a = R.freqkv_attention(q, k, v, 10000.0, 16, 2, 0.5)
    b = R.plain_attention(q, k, v, 10000.0)
    check("chunk 0 equals plain", maxdiff(a[:, :, :16], b[:, :, :16]) < 1e-13)
    check("later chunks differ from plain", maxdiff(a[:, :, 16:], b[:, :, 16:]) > 1e-3,
          "diff %.2e" % maxdiff(a[:, :, 16:], b[:, :, 16:]))


def test_gradcheck():
    print("gradcheck")
    for (T, C, S, r, Hq, Hkv) in [(13, 6, 1, 0.5, 2, 1), (11, 5, 0, 0.5, 1, 1)]:
        q, k, v = rand_qkv(1, Hq, Hkv, T, 4, seed=T)
        q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
        ok = torch.autograd.gradcheck(lambda a, b, c: R.freqkv_attention(a, b, c, 10000.0, C, S, r),
                                      (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
        check("freqkv_attention T=%d C=%d S=%d r=%g" % (T, C, S, r), ok)
    # the gradient really flows through the memories: a loss on the last chunk only
    q, k, v = rand_qkv(1, 2, 2, 45, 8, seed=2)
    k.requires_grad_(); v.requires_grad_()
    out = R.freqkv_attention(q, k, v, 10000.0, 16, 2, 0.5)
    out[:, :, 44:].sum().backward()
    gk = k.grad[0].abs().sum(dim=(0, 2))
    gv = v.grad[0].abs().sum(dim=(0, 2))
    # token 44 sees sink 0..1, memory M_5 (a function of tokens 2..43), and itself
    check("last-chunk loss reaches every earlier key/value via sink+memory",
          bool((gk > 0).all()) and bool((gv > 0).all()))


def test_fd():
    print("fd (whole model, finite differences)")
    for tied, T, C, S, r in [(False, 45, 16, 2, 0.5), (True, 40, 16, 0, 0.25)]:
        cfg = hf_io.make_config(vocab_size=40, hidden_size=16, intermediate_size=24, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=4, tie_word_embeddings=tied,
                                max_position_embeddings=C)
        pnp = hf_io.random_params(cfg, 11)
        rng = np.random.default_rng(2)
        tokens = rng.integers(0, 40, size=2 * (T + 1) + 3)
        res = R.eval_loss(cfg, pnp, tokens, T, stride=None, batch=2, freqkv=True, cache=C, sink=S, ratio=r)
        attn = R.make_attn_fn(True, C, S, r)
        win = torch.as_tensor(R.make_windows(tokens, T))

        def f(params):
            return float(R.loss_sum(params, cfg, win[:, :T], win[:, 1:], attn)) / (win.shape[0] * T)

        base = R.torch_params(pnp, requires_grad=False)
        picks = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.1.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight",
                 "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
        if not tied:
            picks.append("lm_head.weight")
        worst = 0.0
        for name in picks:
            flat = base[name].view(-1)
            for idx in rng.choice(flat.numel(), size=2, replace=False):
                if name == "model.embed_tokens.weight":  # pick a row of a token that occurs
                    idx = int(tokens[0]) * cfg["hidden_size"] + int(idx) % cfg["hidden_size"]
                h = 1e-5
                old = float(flat[idx])
                flat[idx] = old + h
                fp = f(base)
                flat[idx] = old - h
                fm = f(base)
                flat[idx] = old
                fd = (fp - fm) / (2 * h)
                ad = float(res["grads"][name].reshape(-1)[idx])
                err = abs(fd - ad) / max(1e-6, abs(ad))
                worst = max(worst, err)
        check("tied=%s T=%d C=%d S=%d r=%g" % (tied, T, C, S, r), worst < 1e-5, "worst rel err %.1e" % worst)


def test_io():
    print("io")
    bits = hf_io.f32_to_bf16_bits(np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 0.0], np.float32))
    check("bf16 rounding (ties to even)", list(bits) == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x0000],
          str([hex(b) for b in bits]))
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        t = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b.c": rng.standard_normal(7).astype(np.float32)}
        for dt in ["F32", "F16", "BF16"]:
            p = os.path.join(d, "x.safetensors")
            hf_io.save_safetensors(p, t, dt, metadata={"format": "pt"})
            back, dts = hf_io.load_safetensors(p, with_dtypes=True)
            ok = set(back) == set(t) and all(dts[n] == dt for n in t) and all(
                np.array_equal(back[n], hf_io.round_to_dtype(t[n], dt)) and back[n].shape == t[n].shape for n in t)
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
            check("safetensors %s round trip" % dt, ok and n % 8 == 0)
        cfg = hf_io.make_config(tie_word_embeddings=True)
        p1 = hf_io.write_model_dir(os.path.join(d, "m1"), cfg, seed=4, dtype="BF16")
        p2 = hf_io.write_model_dir(os.path.join(d, "m2"), cfg, seed=4, dtype="BF16", shards=2)
        c1, l1 = hf_io.load_model_dir(os.path.join(d, "m1"))
        c2, l2 = hf_io.load_model_dir(os.path.join(d, "m2"))
        ok = set(l1) == set(l2) == set(p1) == set(hf_io.param_shapes(cfg)) and "lm_head.weight" not in l1
        ok = ok and all(np.array_equal(l1[n], l2[n]) and np.array_equal(l1[n], p1[n]) for n in l1)
        check("bf16 sharded dir == single file == written", ok)
        for dt, hi in [("uint16", 65535), ("uint32", 70000), ("int32", 2 ** 31 - 1)]:
            toks = np.array([0, 1, hi, 7])
            p = os.path.join(d, "t.bin")
            hf_io.write_tokens(p, toks, dt)
            check("tokens %s round trip" % dt, np.array_equal(hf_io.read_tokens(p, dt), toks)
                  and os.path.getsize(p) == 4 * hf_io.TOKEN_DTYPES[dt].itemsize)
    toks = np.arange(101)
    w = R.make_windows(toks, 40, 20)
    check("windows stride 20 T=40 n=101", w.shape == (4, 41) and w[3, 0] == 60 and w[3, -1] == 100)
    check("windows default stride", R.make_windows(toks, 9).shape == (10, 10)
          and R.make_windows(toks, 10).shape == (9, 11) and R.make_windows(toks, 200).shape[0] == 0)
    cfg = hf_io.make_config(vocab_size=30, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                            head_dim=8, max_position_embeddings=16)
    pnp = hf_io.random_params(cfg, 1)
    toks = np.random.default_rng(3).integers(0, 30, 120)
    r1 = R.eval_loss(cfg, pnp, toks, 20, stride=13, batch=1, cache=16, sink=2)
    r3 = R.eval_loss(cfg, pnp, toks, 20, stride=13, batch=3, cache=16, sink=2)
    gd = max(maxdiff(r1["grads"][n], r3["grads"][n]) for n in r1["grads"])
    check("batch invariance", abs(r1["loss"] - r3["loss"]) < 1e-12 and gd < 1e-12 and r1["windows"] == 8)


def test_cli():
    print("reference CLI")
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as d:
        cfg = hf_io.make_config(vocab_size=30, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                                head_dim=8, max_position_embeddings=16, tie_word_embeddings=True)
        hf_io.write_model_dir(os.path.join(d, "m"), cfg, seed=2)
        hf_io.write_tokens(os.path.join(d, "t.bin"), np.random.default_rng(0).integers(0, 30, 70), "uint32")
        cmd = [sys.executable, os.path.join(here, "torch_freqkv.py"), "eval-loss", "--model", os.path.join(d, "m"),
               "--tokens", os.path.join(d, "t.bin"), "--token-dtype", "uint32", "--seq-len", "30",
               "--sink", "2", "--grads-out", os.path.join(d, "g.safetensors")]
        p = subprocess.run(cmd, capture_output=True, text=True)
        import json
        ok = p.returncode == 0
        if ok:
            res = json.loads(p.stdout.strip().splitlines()[-1])
            g = hf_io.load_safetensors(os.path.join(d, "g.safetensors"))
            ok = res["windows"] == 2 and res["tokens"] == 60 and abs(res["ppl"] - math.exp(res["loss"])) < 1e-9 \
                and set(g) == set(hf_io.param_shapes(cfg))
        check("eval-loss runs, JSON + grads file", ok, p.stderr.strip()[-200:])
        p = subprocess.run(cmd[:-2] + ["--sink", "16"], capture_output=True, text=True)
        check("eval-loss rejects sink >= cache", p.returncode != 0 and "sink" in p.stderr)


def run_all():
    _results.clear()
    torch.manual_seed(0)
    for t in [test_dims, test_operator, test_short_equals_plain, test_naive_recompute, test_active,
              test_gradcheck, test_fd, test_io, test_cli]:
        try:
            t()
        except Exception as e:  # a crash is a failure, keep going
            import traceback
            traceback.print_exc()
            check(t.__name__ + " crashed", False, repr(e))
    bad = [r for r in _results if not r[1]]
    print("self-test: %d checks, %d failed" % (len(_results), len(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_all())
