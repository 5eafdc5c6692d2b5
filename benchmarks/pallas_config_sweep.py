"""Sweep the Pallas kernel configuration (blocks, warps, stages, fast sigmoid) on a GPU.

Sets the module-level settings of `eqx_xlstm._pallas`, clears the jit caches, and prints
fwd and fwd+bwd times of causal sigmoid attention (bf16, B=4, NH=16, D=128, S=8192,
swish + RoPE) next to bare cuDNN softmax, with the largest error against the reference
path at S=300. A configuration that does not fit the GPU's shared memory is reported.

    python benchmarks/pallas_config_sweep.py     # GPU only
"""

import statistics
import time

import jax
import jax.numpy as jnp

import eqx_xlstm as ex
import eqx_xlstm._pallas as pallas

B, H, D, S = 4, 16, 128, 8192
# (BLOCK_Q, BLOCK_K, NUM_WARPS, NUM_STAGES, FAST_SIGMOID)
CONFIGS = [
    (64, 64, 4, 2, False),
    (128, 64, 4, 2, False),
    (128, 64, 8, 3, False),
    (128, 128, 8, 3, False),
    (64, 128, 4, 3, False),
    (128, 64, 4, 3, True),
    (128, 64, 8, 3, True),
    (64, 64, 4, 2, True),
]


def bench(fn, *xs, repeats=10):
    compiled = jax.jit(fn).lower(*xs).compile()
    jax.block_until_ready(compiled(*xs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*xs))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def grad(fn):
    return jax.grad(lambda *x: jnp.sum(fn(*x).astype(jnp.float32)), argnums=(0, 1, 2))


def sigmoid_attention(implementation):
    return lambda q, k, v: ex.attention(
        q,
        k,
        v,
        activation_function="sigmoid",
        qk_pre_activation_function="swish",
        implementation=implementation,
    )


def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


keys = jax.random.split(jax.random.key(0), 3)
qkv = [jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys]
small = [jax.random.normal(key, (2, 3, 300, D), jnp.bfloat16) for key in keys]
bshd = [x.transpose(0, 2, 1, 3) for x in qkv]
print(f"device: {jax.devices()[0].device_kind}; bf16 B={B} NH={H} D={D} S={S}")
print(
    f"bare cuDNN softmax: fwd {bench(cudnn, *bshd):.2f} ms, "
    f"fwd+bwd {bench(grad(cudnn), *bshd):.2f} ms"
)
for config in CONFIGS:
    (pallas.BLOCK_Q, pallas.BLOCK_K, pallas.NUM_WARPS, pallas.NUM_STAGES, pallas.FAST_SIGMOID) = (
        config
    )
    jax.clear_caches()
    label = "bq={} bk={} warps={} stages={} fast={}".format(*config)
    kernel, reference = sigmoid_attention("pallas"), sigmoid_attention("reference")
    try:
        out, vjp = jax.vjp(kernel, *small)
        expected, vjp_ref = jax.vjp(reference, *small)
        ones = jnp.ones_like(out)
        pairs = zip((out, *vjp(ones)), (expected, *vjp_ref(ones)))
        err = max(
            float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) for a, b in pairs
        )
        print(
            f"{label}: fwd {bench(kernel, *qkv):.2f} ms, "
            f"fwd+bwd {bench(grad(kernel), *qkv):.2f} ms, max error {err:.3f}"
        )
    except Exception as err:  # noqa: BLE001 - e.g. shared memory exceeded
        print(f"{label}: failed: {type(err).__name__}: {str(err)[:160]}")
