"""The Mosaic kernels with segments and sliding windows (and the grouped forward) on a
Hopper GPU in bf16, against the reference path in float32: output and, for sigmoid and
'none' with one K/V head per query head, the gradients. Softmax at D=64 (at D=128 the
Mosaic softmax kernel refuses them).

    python benchmarks/mosaic_bounded_check.py   # results/h200_mosaic_bounded_check.txt
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import eqx_xlstm as ex
from eqx_xlstm.implementations import Mosaic

CASES = [  # (features, K/V heads of 4 query heads)
    ("segments", 4),
    ("window", 4),
    ("segments+window", 4),
    ("segments", 2),
]


def features(name, seq_len):
    ids = np.repeat(np.arange(6), -(-seq_len // 6))[:seq_len]
    return {
        "segments": dict(segment_ids=ids),
        "window": dict(sliding_window=300),
        "segments+window": dict(segment_ids=ids, sliding_window=77),
    }[name]


def outputs(impl, *arrays, activation, kwargs, grad):
    def f(q, k, v):
        return ex.attention(
            q,
            k,
            v,
            activation_function=activation,
            qk_pre_activation_function="swish",
            sigmoid_bias=-3.0,
            implementation=impl,
            **kwargs,
        )

    if not grad:
        return [f(*arrays[:3])]
    out, vjp = jax.vjp(f, *arrays[:3])
    return [out, *vjp(arrays[3])]


def main():
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    for seq_len in (1000, 4096):
        for activation in ("sigmoid", "none", "softmax"):
            dim = 64 if activation == "softmax" else 128
            for name, kv_heads in CASES:
                keys = jax.random.split(jax.random.key(seq_len), 4)
                q = jax.random.normal(keys[0], (1, 4, seq_len, dim), jnp.bfloat16)
                k, v = (
                    jax.random.normal(key, (1, kv_heads, seq_len, dim), jnp.bfloat16)
                    for key in keys[1:3]
                )
                g = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
                grad = activation != "softmax" and kv_heads == 4
                kwargs = features(name, seq_len)
                f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
                run = functools.partial(outputs, activation=activation, kwargs=kwargs, grad=grad)
                want = jax.jit(functools.partial(run, "reference"))(*f32)
                got = jax.jit(functools.partial(run, Mosaic()))(q, k, v, g)
                errs = [
                    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(got, want, strict=True)
                ]
                print(
                    seq_len,
                    activation,
                    f"D={dim}",
                    name,
                    f"kv heads {kv_heads}",
                    "fwd+bwd" if grad else "fwd",
                    " ".join(f"{e:.1e}" for e in errs),
                    "OK" if max(errs) < 3e-2 else "BAD",
                    flush=True,
                )


if __name__ == "__main__":
    main()
