"""Shared tolerances, golden-vector loading and a float64 NumPy reference."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# ../shared/golden beside the repository; EQX_XLSTM_GOLDEN overrides (e.g. on a GPU box).
GOLDEN_PATH = pathlib.Path(
    os.environ.get("EQX_XLSTM_GOLDEN")
    or pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"
)
GOLDEN_FILE = GOLDEN_PATH / "attention_golden.npz"

F32_OUT = dict(atol=2e-5, rtol=2e-5)
F32_GRAD = dict(atol=1e-4, rtol=2e-5)
BF16 = dict(atol=3e-2, rtol=0)
ROPE = dict(atol=1e-5, rtol=0)
FREQS = dict(atol=5e-5, rtol=0)


def load_golden():
    """(archive, cases); skips the calling test when ../shared/golden is absent."""
    if not GOLDEN_FILE.exists():
        pytest.skip(f"golden vectors not found at {GOLDEN_FILE} (../shared/golden absent)")
    archive = np.load(GOLDEN_FILE)
    return archive, json.loads(str(archive["manifest"]))


def golden_cases(kind):
    """Case dicts of one kind, for parametrization (empty when the file is absent)."""
    if not GOLDEN_FILE.exists():
        return [pytest.param(None, id="golden-missing")]
    cases = json.loads(str(np.load(GOLDEN_FILE)["manifest"]))
    return [pytest.param(c, id=c["id"]) for c in cases if c["kind"] == kind]


def naive_rope(x, theta):
    """Interleaved-pair RoPE in float64, position by position."""
    x = np.asarray(x, np.float64)
    seq, dim = x.shape[-2:]
    out = np.empty_like(x)
    for pos in range(seq):
        for i in range(dim // 2):
            angle = pos * theta ** (-2.0 * i / dim)
            c, s = np.cos(angle), np.sin(angle)
            a, b = x[..., pos, 2 * i], x[..., pos, 2 * i + 1]
            out[..., pos, 2 * i] = a * c - b * s
            out[..., pos, 2 * i + 1] = a * s + b * c
    return out


def naive_attention(
    q, k, v, mask=None, activation="softmax", pre="none", theta=1e4, sigmoid_bias=None
):
    """Attention from the formulas, float64, one query row at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if pre != "none":
        q, k = q / (1 + np.exp(-q)), k / (1 + np.exp(-k))
    q, k = naive_rope(q, theta), naive_rope(k, theta)
    seq, dim = q.shape[-2:]
    if mask is None:
        mask = np.tril(np.ones((seq, seq), bool))
    if sigmoid_bias is None:
        sigmoid_bias = -np.log(seq)
    out = np.zeros(v.shape, np.float64)
    for i in range(seq):
        keys = np.nonzero(mask[i])[0]
        if keys.size == 0:
            continue
        logits = np.einsum("...d,...kd->...k", q[..., i, :], k[..., keys, :]) / np.sqrt(dim)
        if activation == "softmax":
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w = w / w.sum(-1, keepdims=True)
        elif activation == "sigmoid":
            w = 1 / (1 + np.exp(-(logits + sigmoid_bias)))
        else:
            w = logits
        out[..., i, :] = np.einsum("...k,...kd->...d", w, v[..., keys, :])
    return out


def random_qkv(shape=(2, 3, 9, 8), dv=6, seed=0, dtype=jnp.float32):
    """Random queries and keys of `shape`, values with last axis `dv`."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, shape, dtype),
        jax.random.normal(kk, shape, dtype),
        jax.random.normal(kv, (*shape[:-1], dv), dtype),
    )
