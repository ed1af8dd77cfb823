"""Minimal Hugging Face I/O for the independent FreqKV reference (numpy only).

- safetensors read/write (F32, F16, BF16; F64/I32/I64 read too): an 8-byte little-endian header
  length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, the payload.
- HF LLaMA model directories with random weights (config.json + model.safetensors, optionally
  bf16-stored, optionally sharded with model.safetensors.index.json).
- flat little-endian token files (uint16 / uint32 / int32).

Written from the file-format descriptions, independently of the C++ code in this repository.
"""
import json
import os
import struct

import numpy as np

# dtype name -> (numpy dtype of the stored bits, bytes per element)
_STORE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bf16 bits
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "U8": np.dtype("u1"),
}

TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4"), "int32": np.dtype("<i4")}


# ----------------------------------------------------------------------------------------------
# bf16 <-> f32
# ----------------------------------------------------------------------------------------------
def f32_to_bf16_bits(a):
    """Round float32 values to bf16 (round to nearest, ties to even); returns uint16 bit patterns."""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    u = a.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_f32(b):
    b = np.ascontiguousarray(np.asarray(b, dtype=np.uint16))
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(a, dtype):
    """The float32 values that storing `a` as `dtype` and reading it back gives."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.copy()
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(a)).reshape(a.shape)
    raise ValueError("unsupported float dtype %r" % dtype)


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------
def save_safetensors(path, tensors, dtype="F32", metadata=None):
    """Write {name: array} to `path`. `dtype` is one name for all tensors or a {name: dtype} dict."""
    names = sorted(tensors)
    header = {}
    blobs = []
    offset = 0
    for name in names:
        dt = dtype[name] if isinstance(dtype, dict) else dtype
        arr = np.asarray(tensors[name])
        if dt == "BF16":
            raw = f32_to_bf16_bits(arr.astype(np.float32)).reshape(arr.shape)
        elif dt in _STORE:
            raw = arr.astype(_STORE[dt])
        else:
            raise ValueError("unsupported dtype %r" % dt)
        data = np.ascontiguousarray(raw).tobytes()
        header[name] = {"dtype": dt, "shape": [int(s) for s in arr.shape],
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)  # pad the header so the payload is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for data in blobs:
            f.write(data)


def load_safetensors(path, with_dtypes=False):
    """Read a safetensors file; float tensors come back as float32 arrays (bf16/f16 widened)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    base = 8 + n
    out, dtypes = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        shape = tuple(info["shape"])
        b, e = info["data_offsets"]
        raw = np.frombuffer(blob[base + b:base + e], dtype=_STORE[dt])
        count = int(np.prod(shape)) if shape else 1
        if raw.size != count:
            raise ValueError("%s: %s has %d elements, shape %s" % (path, name, raw.size, shape))
        if dt == "BF16":
            arr = bf16_bits_to_f32(raw)
        elif dt in ("F16",):
            arr = raw.astype(np.float32)
        else:
            arr = raw.copy()
        out[name] = arr.reshape(shape)
        dtypes[name] = dt
    return (out, dtypes) if with_dtypes else out


# ----------------------------------------------------------------------------------------------
# HF LLaMA model directories
# ----------------------------------------------------------------------------------------------
def make_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=None, head_dim=8, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=32):
    if num_key_value_heads is None:
        num_key_value_heads = num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings,
        "max_position_embeddings": max_position_embeddings,
        "torch_dtype": "float32",
    }


def param_shapes(cfg):
    """{HF name: shape} of a LLaMA model with this config (no lm_head when tied)."""
    V, H, I = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // Hq
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (Hq * D, H)
        shapes[p + "self_attn.k_proj.weight"] = (Hkv * D, H)
        shapes[p + "self_attn.v_proj.weight"] = (Hkv * D, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, Hq * D)
        shapes[p + "mlp.gate_proj.weight"] = (I, H)
        shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def random_params(cfg, seed=0):
    """Random float32 weights scaled so attention and logits are O(1) (not near-uniform)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":  # tied: it is also the output head
            w = rng.standard_normal(shape) / (np.sqrt(shape[1]) if cfg.get("tie_word_embeddings") else 1.0)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(np.float32)
    return out


def write_model_dir(path, cfg, seed=0, dtype="F32", shards=1, params=None):
    """Write config.json + weights; returns the float32 weights AS STORED (after dtype rounding)."""
    os.makedirs(path, exist_ok=True)
    if params is None:
        params = random_params(cfg, seed)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg, torch_dtype={"F32": "float32", "BF16": "bfloat16",
                                         "F16": "float16"}[dtype]), f, indent=2)
    names = sorted(params)
    if shards <= 1:
        save_safetensors(os.path.join(path, "model.safetensors"), params, dtype,
                         metadata={"format": "pt"})
    else:
        weight_map = {}
        groups = [names[i::shards] for i in range(shards)]  # interleave: layers span shards
        for s, group in enumerate(groups):
            fname = "model-%05d-of-%05d.safetensors" % (s + 1, shards)
            save_safetensors(os.path.join(path, fname), {n: params[n] for n in group}, dtype,
                             metadata={"format": "pt"})
            for n in group:
                weight_map[n] = fname
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return {n: round_to_dtype(params[n], dtype) for n in names}


def load_model_dir(path):
    """(config dict, {name: float32 array}) from an HF model directory (single or sharded)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    params = {}
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for fname in sorted(set(weight_map.values())):
            part = load_safetensors(os.path.join(path, fname))
            for n, a in part.items():
                if weight_map.get(n) == fname:
                    params[n] = a
        missing = set(weight_map) - set(params)
        if missing:
            raise ValueError("index names tensors not found in shards: %s" % sorted(missing))
    else:
        params = load_safetensors(os.path.join(path, "model.safetensors"))
    return cfg, params


# ----------------------------------------------------------------------------------------------
# token files
# ----------------------------------------------------------------------------------------------
def write_tokens(path, tokens, dtype="uint16"):
    arr = np.asarray(tokens)
    dt = TOKEN_DTYPES[dtype]
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dt).max):
        raise ValueError("token out of range for %s" % dtype)
    arr.astype(dt).tofile(path)


def read_tokens(path, dtype="uint16"):
    return np.fromfile(path, dtype=TOKEN_DTYPES[dtype]).astype(np.int64)
