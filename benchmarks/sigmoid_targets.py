"""Sigmoid against our softmax path through `attention`, in interleaved rounds (GPU).

For bf16 B=4, NH=16, D=128, causal, swish + RoPE (issue #6's shapes) and each sequence
length, every round times: bare cuDNN (`jax.nn.dot_product_attention`, no RoPE or
swish), our softmax path (swish + RoPE pass, then cuDNN) and our sigmoid path (Mosaic
kernels on a Hopper GPU), forward and fwd+bwd (`value_and_grad`, as a training step
runs it), sigmoid fwd+bwd both with the dQ + dK/dV kernel pair and with the fused
backward kernel. Speedup = our softmax path's time / sigmoid's. Median of `--repeats`
calls per entry; only rounds on one machine settle differences of a few percent. With
`--xla`, each round also times the XLA sigmoid paths: chunked (`implementation="chunked"`,
which fits at every length here) and, up to `--reference-max`, the reference (S x S
weights; out of memory at S=16384), and prints how many times faster our default
sigmoid path is than the faster of them, forward and fwd+bwd (with the backward
`attention` picks).

    python benchmarks/sigmoid_targets.py --seqs 4096,8192,16384 --rounds 3 [--xla]
"""

import argparse

import jax
import jax.numpy as jnp
from timing import median_ms, print_table_header, random_qkv

import eqx_xlstm as ex
from eqx_xlstm.implementations import Mosaic

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seqs", default="4096,8192,16384")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--repeats", type=int, default=20)
parser.add_argument("--xla", action="store_true", help="also time the XLA paths")
parser.add_argument("--reference-max", type=int, default=8192, help="longest S for reference")
args = parser.parse_args()
B, H, D = 4, 16, 128


def value_and_grad(fn):
    loss = lambda *xs: jnp.sum(fn(*xs).astype(jnp.float32))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def ours(activation, implementation=None):
    return lambda q, k, v: ex.attention(  # noqa: E731
        q,
        k,
        v,
        activation_function=activation,
        qk_pre_activation_function="swish",
        implementation=implementation,
    )


def bare(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def sigmoid_backward(fused, qkv):
    """fwd+bwd ms of the sigmoid path with the fused backward or the pair."""
    mosaic = Mosaic(fused_backward_from=0 if fused else None)
    return median_ms(value_and_grad(ours("sigmoid", mosaic)), *qkv, repeats=args.repeats)


def xla_times(seq, qkv):
    """(chunked, reference) forward and fwd+bwd ms; None above --reference-max or where
    out of memory."""
    fwd, fb = [], []
    for implementation in ("chunked", "reference"):
        fits = implementation == "chunked" or seq <= args.reference_max
        fn = ours("sigmoid", implementation)
        fwd.append(time_or_oom(fn, qkv) if fits else None)
        fb.append(time_or_oom(value_and_grad(fn), qkv) if fits else None)
    return fwd, fb


def time_or_oom(fn, qkv):
    """median_ms, or None where XLA runs out of device memory."""
    try:
        return median_ms(fn, *qkv, repeats=args.repeats)
    except Exception as error:  # XlaRuntimeError; its class moved between jax versions
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None


print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}; bf16 B={B} NH={H} D={D}")
header = (
    "| S | round | bare fwd | softmax fwd | sigmoid fwd | fwd speedup | bare fwd+bwd "
    "| softmax fwd+bwd | sigmoid fwd+bwd, pair / fused | fwd+bwd speedup, pair / fused |"
)
if args.xla:
    header += (
        " chunked fwd | chunked fwd+bwd | reference fwd | reference fwd+bwd "
        "| XLA / sigmoid, fwd | XLA / sigmoid, fwd+bwd |"
    )
print_table_header(header)
for seq in (int(s) for s in args.seqs.split(",")):
    qkv = random_qkv((B, H, seq, D), jnp.bfloat16)
    bshd = [x.transpose(0, 2, 1, 3) for x in qkv]
    for round_ in range(args.rounds):
        t = {
            "bare": median_ms(bare, *bshd, repeats=args.repeats),
            "bare fb": median_ms(value_and_grad(bare), *bshd, repeats=args.repeats),
            "softmax": median_ms(ours("softmax"), *qkv, repeats=args.repeats),
            "softmax fb": median_ms(value_and_grad(ours("softmax")), *qkv, repeats=args.repeats),
            "sigmoid": median_ms(ours("sigmoid"), *qkv, repeats=args.repeats),
            "pair": sigmoid_backward(False, qkv),
            "fused": sigmoid_backward(True, qkv),
        }
        row = (
            f"| {seq} | {round_} | {t['bare']:.3f} | {t['softmax']:.3f} | {t['sigmoid']:.3f} "
            f"| {t['softmax'] / t['sigmoid']:.3f} | {t['bare fb']:.3f} | {t['softmax fb']:.3f} "
            f"| {t['pair']:.3f} / {t['fused']:.3f} "
            f"| {t['softmax fb'] / t['pair']:.3f} / {t['softmax fb'] / t['fused']:.3f} |"
        )
        if args.xla:
            fwd, fb = xla_times(seq, qkv)
            ours_fb = t["fused"] if seq >= Mosaic().fused_backward_from else t["pair"]
            cells = (fwd[0], fb[0], fwd[1], fb[1])
            row += " " + " | ".join(f"{x:.3f}" if x else "-" for x in cells) + " |"
            row += f" {min(filter(None, fwd)) / t['sigmoid']:.1f}"
            row += f" | {min(filter(None, fb)) / ours_fb:.1f} |"
        print(row, flush=True)
