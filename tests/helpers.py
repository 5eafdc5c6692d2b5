"""What the tests share: one input helper, the tolerances, golden-vector loading, a
float64 NumPy reference, specs for the implementation protocol, and running a check
script on CPU host devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_xlstm as ex
from eqx_xlstm.spec import default_device

# ../shared/golden beside the repository; EQX_XLSTM_GOLDEN (the file or its folder)
# overrides, e.g. on a GPU machine.
_GOLDEN = pathlib.Path(
    os.environ.get("EQX_XLSTM_GOLDEN")
    or pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"
)
GOLDEN_FILE = _GOLDEN if _GOLDEN.suffix == ".npz" else _GOLDEN / "attention_golden.npz"

# The tolerances of ../shared/golden/README.md, used by every test.
F32_OUT = dict(atol=2e-5, rtol=2e-5)
F32_GRAD = dict(atol=1e-4, rtol=2e-5)
BF16 = dict(atol=3e-2, rtol=0)
ROPE = dict(atol=1e-5, rtol=0)
FREQS = dict(atol=5e-5, rtol=0)
# 16-bit kernels against the reference: weights carry up to ~2^-8 relative error each
# and 'none' outputs are unbounded sums, so the tolerance scales with the largest value.
HALF_KERNEL = dict(atol=3e-2, rtol=2e-2)

ACTIVATIONS = ("softmax", "sigmoid", "none")


def random_inputs(seq=9, batch=(2, 3), dqk=8, dv=6, dtype=jnp.float32, seed=0):
    """Standard-normal `(q, k, v, g)`: queries and keys `(*batch, seq, dqk)`, values and
    an output cotangent `(*batch, seq, dv)`."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (*batch, seq, dqk), dtype)
    k = jax.random.normal(kk, (*batch, seq, dqk), dtype)
    v = jax.random.normal(kv, (*batch, seq, dv), dtype)
    return q, k, v, jax.random.normal(kg, v.shape, dtype)


def random_mask(seq, seed=0, p=0.5):
    return jax.random.bernoulli(jax.random.key(seed), p, (seq, seq))


def out_and_grads(q, k, v, g, mask=None, jit=False, **kwargs):
    """`attention`'s output and (dq, dk, dv) for cotangent `g`, as float32 NumPy; with
    `jit`, the whole computation under `jax.jit`."""

    def run(q, k, v, g):
        out, vjp = jax.vjp(lambda q, k, v: ex.attention(q, k, v, mask, **kwargs), q, k, v)
        return (out, *vjp(g))

    return [np.asarray(x.astype(jnp.float32)) for x in (jax.jit(run) if jit else run)(q, k, v, g)]


def assert_all_close(got, expected, dtype, label=""):
    """Output and gradients (lists, as `out_and_grads` returns) within the shared
    tolerance for `dtype`: F32 for float32 and wider, HALF_KERNEL for 16-bit."""
    names = ("out", "dq", "dk", "dv")
    for name, a, b in zip(names, got, expected, strict=True):
        if jnp.dtype(dtype).itemsize == 2:
            scale = max(1.0, float(np.abs(b).max()))
            tol = dict(atol=HALF_KERNEL["atol"] * scale, rtol=HALF_KERNEL["rtol"])
        else:
            tol = F32_OUT if name == "out" else F32_GRAD
        np.testing.assert_allclose(a, b, **tol, err_msg=name + label)
        assert np.isfinite(a).all(), name + label


def spec(**changes):
    """An AttentionSpec (causal softmax, float32, S=64, D=64 on a CPU) with `changes`."""
    base = dict(
        activation="softmax",
        pre_activation="none",
        mask="causal",
        dtype=jnp.float32,
        batch_shape=(2,),
        seq_len=64,
        dqk=64,
        dv=64,
        sigmoid_bias=-4.0,
        platform="cpu",
    )
    return ex.AttentionSpec(**(base | changes))


def here(**changes):
    """`spec` on this machine's default device."""
    platform, capability = default_device()
    return spec(**({"platform": platform, "gpu_capability": capability} | changes))


def on_hopper(**changes):
    """`spec` on an H100/H200-class GPU, bfloat16."""
    return spec(**({"platform": "gpu", "gpu_capability": "9.0", "dtype": jnp.bfloat16} | changes))


def load_golden():
    """(archive, cases); skips the calling test when ../shared/golden is absent."""
    if not GOLDEN_FILE.exists():
        pytest.skip(f"golden vectors not found at {GOLDEN_FILE} (../shared/golden absent)")
    archive = np.load(GOLDEN_FILE)
    return archive, json.loads(str(archive["manifest"]))


def golden_cases(kind, keep=lambda case: True):
    """Case dicts of one kind for which `keep` holds, for parametrization (one
    placeholder, which skips, when the file is absent)."""
    if not GOLDEN_FILE.exists():
        return [pytest.param(None, id="golden-missing")]
    cases = json.loads(str(np.load(GOLDEN_FILE)["manifest"]))
    return [pytest.param(c, id=c["id"]) for c in cases if c["kind"] == kind and keep(c)]


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


# Blocks and chunks small enough that test sequences span many of them, and rarely a
# whole number of them.
SMALL_CHUNKED = ex.implementations.Chunked(block=5)
SMALL_LINEAR = ex.implementations.Linear(chunk=4)


def run_on_host_devices(script: str, devices: int = 4) -> list[dict]:
    """Run `tests/<script>` in a process with `devices` CPU host devices; its JSON
    lines, one dict each (the test fails with its stderr if it fails)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(
            [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"]
        ).strip(),
    }
    path = pathlib.Path(__file__).with_name(script)
    result = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]
