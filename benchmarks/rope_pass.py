"""What the swish + RoPE pass in front of an attention kernel costs (GPU).

Times, for bf16 queries and keys of shape (B, NH, S, D): the pass `attention` runs in
front of cuDNN and the Mosaic kernels (swish, RoPE, cast back to bf16; one XLA fusion
per tensor), a plain elementwise pass over the same bytes (`2 * x`, the memory-bound
floor), and the bare cuDNN causal softmax forward for scale. GB/s counts the bytes read
and written (q and k, each read once and written once).

    python benchmarks/rope_pass.py --seqs 4096,8192,16384
"""

import argparse

import jax
import jax.numpy as jnp
from timing import bare_causal_attention, median_ms, print_table_header, random_qkv

from eqx_xlstm import maths
from eqx_xlstm.nn.rope import precompute_freqs

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--seqs", default="4096,8192,16384")
parser.add_argument("--repeats", type=int, default=20)
args = parser.parse_args()


def bench(fn, *xs):
    return median_ms(fn, *xs, repeats=args.repeats)


def rope_pass(q, k, sin, cos):
    q, k = (maths.prepare(x, "swish", sin, cos, jnp.float32) for x in (q, k))
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)


def plain_pass(q, k):
    return 2 * q, 2 * k


B, H, D = args.batch, args.heads, args.head_dim
print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; bf16 B={B} NH={H} D={D}")
header = (
    "| S | swish+RoPE pass | plain pass (floor) | pass / floor | pass GB/s | cuDNN fwd "
    "| pass / cuDNN fwd |"
)
print_table_header(header)
for seq in (int(s) for s in args.seqs.split(",")):
    q, k, v = random_qkv((B, H, seq, D), jnp.bfloat16)
    sin, cos = precompute_freqs(D, seq)
    t_rope = bench(rope_pass, q, k, sin, cos)
    t_plain = bench(plain_pass, q, k)
    t_cudnn = bench(bare_causal_attention, q, k, v)
    moved = 2 * 2 * q.size * q.dtype.itemsize
    print(
        f"| {seq} | {t_rope:.3f} ms | {t_plain:.3f} ms | {t_rope / t_plain:.2f} "
        f"| {moved / t_rope / 1e6:.0f} | {t_cudnn:.3f} ms | {t_rope / t_cudnn:.3f} |"
    )
