"""Packed documents, sliding windows and grouped-query heads against full causal
attention at the same S, in one run (issue #10's targets).

    python benchmarks/packed_windows.py                          # the issue's shapes (a GPU)
    python benchmarks/packed_windows.py --seq-len 4096 --window 256 --batch 1 --heads 4 \\
        --head-dim 64 --dtype float32                            # a CPU

For each activation, fwd+bwd (the gradient of a sum) through the default dispatch:
full causal; `--documents` packed documents of S/documents positions each
(`segment_ids`); a sliding window of `--window`; and keys/values with heads/8 heads
(grouped-query 8:1). "ratio" is the time over full causal's. The implementation the
dispatch picks is printed beside each row (`eqx_xlstm.dispatch.plan`).
"""

import argparse

import jax
import jax.numpy as jnp
from timing import median_ms, print_table_header, random_qkv

import eqx_xlstm as ex
from eqx_xlstm import dispatch


def gradient(activation, **kwargs):
    def loss(q, k, v):
        out = ex.attention(
            q, k, v, activation_function=activation, qk_pre_activation_function="swish", **kwargs
        )
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def chosen(q, k, v, activation, **kwargs):
    """The implementation dispatch picks for the gradient of this call."""
    seen = {}
    original = dispatch.plan

    def spy(spec, requested=None):
        plan = original(spec, requested)
        seen["name"] = plan.gradient.name
        return plan

    dispatch.plan = spy
    try:
        jax.eval_shape(gradient(activation, **kwargs), q, k, v)
    finally:
        dispatch.plan = original
    return seen.get("name", "?")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--activations", nargs="+", default=["softmax", "sigmoid", "none"])
    args = parser.parse_args()
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = random_qkv(shape, jnp.dtype(args.dtype))
    ids = jnp.repeat(jnp.arange(args.documents), -(-args.seq_len // args.documents))
    ids = ids[: args.seq_len]
    groups = max(1, args.heads // 8)
    device = jax.devices()[0]
    print(
        f"{device.device_kind}, jax {jax.__version__}; {args.dtype}, B={args.batch}, "
        f"NH={args.heads}, S={args.seq_len}, D={args.head_dim}, swish, fwd+bwd median ms"
    )
    print_table_header("| activation | case | path | ms | ratio to full causal |")
    for activation in args.activations:
        cases = [
            ("full causal", (q, k, v), {}),
            (f"{args.documents} packed documents", (q, k, v), {"segment_ids": ids}),
            (f"window {args.window}", (q, k, v), {"sliding_window": args.window}),
            (f"grouped {args.heads}:{groups} heads", (q, k[:, :groups], v[:, :groups]), {}),
        ]
        full = None
        for label, arrays, kwargs in cases:
            ms = median_ms(gradient(activation, **kwargs), *arrays, repeats=args.repeats)
            full = full or ms
            path = chosen(*arrays, activation, **kwargs)
            print(f"| {activation} | {label} | {path} | {ms:.2f} | {ms / full:.3f} |", flush=True)


if __name__ == "__main__":
    main()
