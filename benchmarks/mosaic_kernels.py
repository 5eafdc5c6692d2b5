"""The Mosaic GPU sigmoid kernels on their own, next to their peers (Hopper GPU only).

Checks the kernel against a float32 reference at small shapes, then times forward
calls at bf16, B*NH=64, S=8192 (`--seq`), D=128, causal, without RoPE (kernels only):
bare cuDNN softmax, our Triton sigmoid forward, and the Mosaic kernel for sigmoid,
'none' and softmax. Then the backward pass: the Mosaic dQ and dK/dV kernels, and dK/dV
with dQ fused in, against cuDNN's softmax backward (its fwd+bwd time less its forward
time; fwd+bwd as `value_and_grad`, so nothing is dropped). The variants that lost
(no ping-pong, turns passed when done, the exp form of the sigmoid, two key/value
slots, heads launched inner) are gone from the kernels; their rounds are in
docs/benchmarks.md.

    python benchmarks/mosaic_kernels.py [--seq 16384]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import bare_causal_attention, median_ms

from eqx_xlstm.implementations import Triton
from eqx_xlstm.implementations.mosaic import backward as mosaic_backward
from eqx_xlstm.implementations.mosaic import dq_kernel
from eqx_xlstm.implementations.mosaic import forward as mosaic
from eqx_xlstm.implementations.triton.kernels import Launch, forward
from eqx_xlstm.spec import AttentionSpec

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seq", type=int, default=8192)
N, S, D = 64, parser.parse_args().seq, 128


bench = median_ms


def reference(q, k, v, activation, bias):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    scores = jnp.einsum("nqd,nkd->nqk", q, k) * q.shape[-1] ** -0.5
    w = jax.nn.sigmoid(scores + bias) if activation == "sigmoid" else scores
    causal = jnp.tril(jnp.ones(scores.shape[-2:], bool))
    if activation == "softmax":
        w = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    return jnp.einsum("nqk,nkd->nqd", jnp.where(causal, w, 0.0), v)


def qkv(n, s, d):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(key, (n, s, d), jnp.bfloat16) for key in keys]


def mosaic_call(activation, bias):
    return lambda q, k, v: mosaic.mosaic_forward(q, k, v, activation, bias, False)


print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
for n, s, d in [(2, 384, 64), (3, 1024, 128)]:
    q, k, v = qkv(n, s, d)
    for activation in ("sigmoid", "none", "softmax"):
        got = mosaic_call(activation, -np.log(s))(q, k, v).astype(jnp.float32)
        want = reference(q, k, v, activation, -np.log(s))
        error = float(jnp.max(jnp.abs(got - want)) / jnp.maximum(1.0, jnp.max(jnp.abs(want))))
        print(f"check N={n} S={s} D={d} {activation}: max error / max(1, |ref|) = {error:.4f}")

q, k, v = qkv(N, S, D)
bias = -float(np.log(S))
print(f"bf16 N={N} S={S} D={D}, causal, forward only, no RoPE")


spec = AttentionSpec("sigmoid", "none", "causal", jnp.bfloat16, (N,), S, D, D, bias, "gpu")
launch = Launch(spec, Triton().forward, Triton().backward, interpret=False)
times = {
    "bare cuDNN softmax": bench(bare_causal_attention, q, k, v),
    "Triton sigmoid": bench(lambda q, k, v: forward(q, k, v, launch=launch)[0], q, k, v),
    "Mosaic sigmoid": bench(mosaic_call("sigmoid", bias), q, k, v),
    "Mosaic 'none'": bench(mosaic_call("none", bias), q, k, v),
    "Mosaic softmax": bench(mosaic_call("softmax", 0.0), q, k, v),
}
base = times["bare cuDNN softmax"]
for label, ms in times.items():
    print(f"{label:40s} {ms:7.2f} ms   {ms / base:5.2f} x cuDNN")

print(f"bf16 N={N} S={S} D={D}, causal, backward kernels, no RoPE")


def cudnn_fwd_bwd(q, k, v):
    loss = lambda *x: jnp.sum(bare_causal_attention(*x).astype(jnp.float32))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


d_out = qkv(N, S, D)[0] * 0.1


def backward_kernels():
    """ms of each Mosaic backward kernel (fresh functions, so traced anew)."""
    rest = ("sigmoid", bias, False)
    return {
        "dQ": bench(lambda *a: dq_kernel.mosaic_dq(*a, *rest), q, k, v, d_out),
        "dK/dV": bench(lambda *a: mosaic_backward.mosaic_dkv(*a, *rest), q, k, v, d_out),
        "dK/dV with dQ fused": bench(
            lambda *a: mosaic_backward.mosaic_dkv(*a, *rest, fused=True), q, k, v, d_out
        ),
    }


cudnn_bwd = bench(cudnn_fwd_bwd, q, k, v) - base
print(f"{'cuDNN softmax backward (fwd+bwd - fwd)':44s} {cudnn_bwd:7.2f} ms")
times = backward_kernels()
times["backward (dQ + dK/dV)"] = times["dQ"] + times["dK/dV"]
for label, ms in times.items():
    print(f"{f'Mosaic {label}':44s} {ms:7.2f} ms   {ms / cudnn_bwd:5.2f} x cuDNN")
