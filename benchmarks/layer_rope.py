"""Swish + RoPE behind a projection: what our softmax path costs over bare cuDNN in a layer (GPU).

`attention` runs swish + RoPE as an XLA pass in front of cuDNN (benchmarks/rope_pass.py
times it alone). In a model the queries and keys come out of a projection, and XLA may
fuse that pass into the projection's output instead of running it on its own. This
times, for bf16 input `x` of shape (B, S, NH * D) and per-head projections to q, k, v
of shape (B, NH, S, D):

- bare: projections, then `jax.nn.dot_product_attention` (causal, no swish, no RoPE);
- ours: projections, then `attention(softmax, swish + RoPE)` (default path: cuDNN);
- pass only: projections, then the swish + RoPE pass, no attention (its share).

Forward, and fwd+bwd as `value_and_grad` over `x` and the three weights. Ratio = ours /
bare in the same round; only rounds on one machine settle a few percent.

    python benchmarks/layer_rope.py --seqs 4096,8192,16384 --rounds 3
    python benchmarks/layer_rope.py --seqs 256 --dpa-implementation xla  # CPU smoke run
"""

import argparse

import jax
import jax.numpy as jnp
from timing import bare_causal_attention, median_ms, print_table_header

import eqx_xlstm as ex
from eqx_xlstm import maths
from eqx_xlstm.nn.rope import precompute_freqs

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--seqs", default="4096,8192,16384")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--repeats", type=int, default=20)
parser.add_argument("--dpa-implementation", default="cudnn", help="bare attention's path")
args = parser.parse_args()
B, H, D = args.batch, args.heads, args.head_dim


def project(x, wq, wk, wv):
    return [jnp.einsum("bse,ehd->bhsd", x, w) for w in (wq, wk, wv)]


def bare_attention(q, k, v):
    return bare_causal_attention(q, k, v, args.dpa_implementation)


def ours_attention(q, k, v):
    return ex.attention(q, k, v, activation_function="softmax", qk_pre_activation_function="swish")


def layer(attend):
    def run(x, wq, wk, wv):
        return jnp.sum(attend(*project(x, wq, wk, wv)).astype(jnp.float32))

    return run


def pass_only(sin, cos):
    def attend(q, k, v):
        q, k = (maths.prepare(x, "swish", sin, cos, jnp.float32) for x in (q, k))
        return q.astype(v.dtype) + k.astype(v.dtype) + v

    return attend


def fwd_and_fwd_bwd(fn, *xs):
    grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))
    return median_ms(fn, *xs, repeats=args.repeats), median_ms(grads, *xs, repeats=args.repeats)


print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}; bf16 B={B} NH={H} D={D}")
header = (
    "| S | round | bare fwd | ours fwd | ours / bare | pass only | bare fwd+bwd "
    "| ours fwd+bwd | ours / bare | pass only |"
)
print_table_header(header)
for seq in (int(s) for s in args.seqs.split(",")):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (B, seq, H * D), jnp.bfloat16)
    weights = [
        (jax.random.normal(key, (H * D, H, D), jnp.float32) * (H * D) ** -0.5).astype(jnp.bfloat16)
        for key in keys[1:]
    ]
    sin, cos = precompute_freqs(D, seq)
    for round_ in range(args.rounds):
        bare = fwd_and_fwd_bwd(layer(bare_attention), x, *weights)
        ours = fwd_and_fwd_bwd(layer(ours_attention), x, *weights)
        only = fwd_and_fwd_bwd(layer(pass_only(sin, cos)), x, *weights)
        print(
            f"| {seq} | {round_} | {bare[0]:.3f} | {ours[0]:.3f} | {ours[0] / bare[0]:.3f} "
            f"| {only[0]:.3f} | {bare[1]:.3f} | {ours[1]:.3f} | {ours[1] / bare[1]:.3f} "
            f"| {only[1]:.3f} |",
            flush=True,
        )
