"""What the swish + RoPE pass in front of an attention kernel costs (GPU).

Times, for bf16 queries and keys of shape (B, NH, S, D), with the RoPE tables
`attention` uses at S (composed on the device beyond S=4096): the pass in XLA (swish,
RoPE, cast back to bf16; one fusion per tensor), the same pass as the Triton kernel
`prepare_pass.prepare_rows` (what the Mosaic kernels' raw path runs on a GPU), a plain
elementwise pass over the same bytes (`2 * x`, XLA's memory-bound pass), and the bare
cuDNN causal softmax forward for scale. TB/s counts the bytes read and written (q and
k, each read once and written once).

    python benchmarks/rope_pass.py --seqs 4096,8192,16384,32768

A second table times the pass's backward (the raw rows' gradients from the prepared
rows'): XLA's gradient of the same maths, the Triton kernel
`prepare_pass.prepare_rows_gradient` (what dispatch runs after cuDNN's or the full
causal kernels' backward where the forward pass is the kernel), and a plain pass over
the same bytes; with the mismatches of the kernel's results against XLA's.
"""

import argparse

import jax
import jax.numpy as jnp
from timing import bare_causal_attention, median_ms, print_table_header, random_qkv

from eqx_xlstm import maths
from eqx_xlstm.implementations.prepare_pass import prepare_rows, prepare_rows_gradient
from eqx_xlstm.nn.rope import rope_tables

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--seqs", default="4096,8192,16384,32768")
parser.add_argument("--repeats", type=int, default=20)
args = parser.parse_args()


def bench(fn, *xs):
    return median_ms(fn, *xs, repeats=args.repeats, sample_ms=50.0)


def tables(x):
    """The RoPE tables `attention` uses for rows like x (composed beyond S=4096)."""
    return rope_tables(x.shape[-2], x.shape[-1], None, None, 1e4)


def rope_pass(q, k):
    sin, cos = tables(q)
    q, k = (maths.prepare(x, "swish", sin, cos, jnp.float32) for x in (q, k))
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)


def triton_pass(q, k):
    sin, cos = tables(q)
    return tuple(prepare_rows(x, "swish", sin, cos) for x in (q, k))


def plain_pass(q, k):
    return 2 * q, 2 * k


def backward_pass(q, k, dq, dk):
    """The pass's gradient as dispatch runs it after the kernels (XLA's, of the same
    maths): the raw rows' gradients from the prepared rows' (`dq`, `dk`)."""
    sin, cos = tables(q)

    def prepare(x):
        return maths.prepare(x, "swish", sin, cos, jnp.float32).astype(x.dtype)

    return tuple(jax.vjp(prepare, x)[1](g)[0] for x, g in ((q, dq), (k, dk)))


def triton_backward_pass(q, k, dq, dk):
    sin, cos = tables(q)
    return tuple(prepare_rows_gradient(x, g, "swish", sin, cos) for x, g in ((q, dq), (k, dk)))


def plain_backward_pass(q, k, dq, dk):
    return q + dq, k + dk


B, H, D = args.batch, args.heads, args.head_dim
print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; bf16 B={B} NH={H} D={D}")
header = (
    "| S | XLA pass | Triton pass | Triton / XLA | plain 2*x pass | XLA TB/s | Triton TB/s "
    "| cuDNN fwd | XLA pass / cuDNN fwd | outputs equal |"
)
print_table_header(header)
backward_rows = []
for seq in (int(s) for s in args.seqs.split(",")):
    q, k, v = random_qkv((B, H, seq, D), jnp.bfloat16)
    dq, dk = random_qkv((B, H, seq, D), jnp.bfloat16, count=2)
    t_back = bench(backward_pass, q, k, dq, dk)
    t_back_triton = bench(triton_backward_pass, q, k, dq, dk)
    t_back_plain = bench(plain_backward_pass, q, k, dq, dk)
    grads = (jax.jit(f)(q, k, dq, dk) for f in (backward_pass, triton_backward_pass))
    differ = sum(int(jnp.sum(a != b)) for a, b in zip(*grads, strict=True)) / (2 * q.size)
    moved = 3 * 2 * q.size * q.dtype.itemsize
    backward_rows.append((seq, t_back, t_back_triton, t_back_plain, moved, differ))
    t_rope = bench(rope_pass, q, k)
    t_triton = bench(triton_pass, q, k)
    t_plain = bench(plain_pass, q, k)
    t_cudnn = bench(bare_causal_attention, q, k, v)
    moved = 2 * 2 * q.size * q.dtype.itemsize
    same = all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(jax.jit(rope_pass)(q, k), jax.jit(triton_pass)(q, k), strict=True)
    )
    print(
        f"| {seq} | {t_rope:.3f} ms | {t_triton:.3f} ms | {t_triton / t_rope:.2f} "
        f"| {t_plain:.3f} ms | {moved / t_rope / 1e9:.2f} | {moved / t_triton / 1e9:.2f} "
        f"| {t_cudnn:.3f} ms | {t_rope / t_cudnn:.3f} | {same} |"
    )

print("\nThe backward pass (reads the raw rows and their gradients, writes one array each):")
print_table_header(
    "| S | XLA | Triton | Triton / XLA | plain q + dq pass | XLA TB/s | Triton TB/s "
    "| entries differing from XLA's |"
)
for seq, t_back, t_triton, t_plain, moved, differ in backward_rows:
    print(
        f"| {seq} | {t_back:.3f} ms | {t_triton:.3f} ms | {t_triton / t_back:.2f} "
        f"| {t_plain:.3f} ms | {moved / t_back / 1e9:.2f} | {moved / t_triton / 1e9:.2f} "
        f"| {differ:.1e} |"
    )
