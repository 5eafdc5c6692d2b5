"""The Mosaic kernels with segments, sliding windows and grouped-query heads on a
Hopper GPU in bf16, against the reference path in float32: output and gradients (at
S=4096 the grouped causal case of sigmoid and 'none' runs the fused backward kernel,
the others the dQ + dK/dV pair). "segments per sequence": two sequences, each with
its own segment ids (and so its own RoPE positions). Softmax at `--softmax-dim`.

    python benchmarks/mosaic_bounded_check.py   # results/h200_mosaic_bounded_check.txt
    python benchmarks/mosaic_bounded_check.py --seq-lens 4096 --cases causal
"""

import argparse
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
    ("causal", 2),
    ("segments per sequence", 4),
]


def features(name, seq_len):
    ids = np.repeat(np.arange(6), -(-seq_len // 6))[:seq_len]
    other = np.repeat(np.arange(4), -(-seq_len // 4))[:seq_len]  # another sequence's
    return {
        "segments": dict(segment_ids=ids),
        "segments per sequence": dict(segment_ids=np.stack([ids, other])[:, None, :]),
        "window": dict(sliding_window=300),
        "segments+window": dict(segment_ids=ids, sliding_window=77),
        "causal": {},
    }[name]


def outputs(impl, *arrays, activation, kwargs):
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

    out, vjp = jax.vjp(f, *arrays[:3])
    return [out, *vjp(arrays[3])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1000, 4096])
    parser.add_argument("--cases", nargs="+", default=sorted({name for name, _ in CASES}))
    parser.add_argument("--activations", nargs="+", default=["sigmoid", "none", "softmax"])
    parser.add_argument("--softmax-dim", type=int, default=128, choices=[64, 128])
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    for seq_len in args.seq_lens:
        for activation in args.activations:
            dim = args.softmax_dim if activation == "softmax" else 128
            for name, kv_heads in [case for case in CASES if case[0] in args.cases]:
                keys = jax.random.split(jax.random.key(seq_len), 4)
                kwargs = features(name, seq_len)
                ids = kwargs.get("segment_ids")
                batch = 1 if ids is None or ids.ndim == 1 else ids.shape[0]
                q = jax.random.normal(keys[0], (batch, 4, seq_len, dim), jnp.bfloat16)
                k, v = (
                    jax.random.normal(key, (batch, kv_heads, seq_len, dim), jnp.bfloat16)
                    for key in keys[1:3]
                )
                g = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
                f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
                run = functools.partial(outputs, activation=activation, kwargs=kwargs)
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
                    " ".join(f"{e:.1e}" for e in errs),
                    "OK" if max(errs) < 3e-2 else "BAD",
                    flush=True,
                )


if __name__ == "__main__":
    main()
