"""Whether cuDNN's packed-sequence layout could serve packed documents: causal softmax
fwd+bwd through JAX's private cuDNN module with per-row segment lengths and offsets
padded to a static count of M segments, for several M, against cuDNN's plain causal
call at the same S and against the same call with the mask written out (one H200).

    python benchmarks/cudnn_packed_probe.py --max-segments 8 64 1024 16384

No swish or RoPE: the bare kernels. "max rel err" compares the packed call's output and
gradients (M = the real count) with the masked call's.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as cudnn
from packed_windows import explicit_mask
from timing import median_ms, packed_ids, print_table_header, random_qkv, sum_gradient


def packed_lengths_and_offsets(batch, seq_len, documents, max_segments):
    """`(seqlen (B, M), offsets (B, M + 1))` int32 for `documents` equal documents a row,
    padded with -1 to M segments, as the private API takes them."""
    size = seq_len // documents
    lengths = np.full((batch, max_segments), -1, np.int32)
    offsets = np.full((batch, max_segments + 1), -1, np.int32)
    lengths[:, :documents] = size
    offsets[:, :documents] = np.arange(documents) * size
    return jnp.asarray(lengths), jnp.asarray(offsets)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--max-segments", type=int, nargs="+", default=[8, 64, 1024, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)  # BTNH
    q, k, v = random_qkv(shape, jnp.bfloat16)
    scale = args.head_dim**-0.5
    causal = functools.partial(
        cudnn.dot_product_attention, scale=scale, mask_type=cudnn.MaskType.CAUSAL
    )
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; bf16 BTNH {shape}, "
        f"{args.documents} packed documents, causal softmax fwd+bwd, median ms"
    )
    print_table_header("| call | M | ms | / plain causal | max rel err |")
    plain = median_ms(sum_gradient(lambda q, k, v: causal(q, k, v)), q, k, v, repeats=args.repeats)
    print(f"| plain causal | | {plain:.2f} | 1.000 | |", flush=True)

    mask = explicit_mask(args.seq_len, packed_ids(args.seq_len, args.documents))

    def masked(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

    def value_and_grads(fn):
        return jax.jit(lambda q, k, v: (fn(q, k, v), sum_gradient(fn)(q, k, v)))

    want = jax.tree.leaves(value_and_grads(masked)(q, k, v))
    ms = median_ms(sum_gradient(masked), q, k, v, repeats=args.repeats)
    print(f"| mask written out | | {ms:.2f} | {ms / plain:.3f} | |", flush=True)
    for max_segments in args.max_segments:
        lengths, offsets = packed_lengths_and_offsets(
            args.batch, args.seq_len, args.documents, max_segments
        )

        def packed(q, k, v, lengths=lengths, offsets=offsets):
            return causal(
                q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets
            )

        try:
            ms = median_ms(sum_gradient(packed), q, k, v, repeats=args.repeats)
            got = jax.tree.leaves(value_and_grads(packed)(q, k, v))
            err = max(
                float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                / float(jnp.max(jnp.abs(b.astype(jnp.float32))))
                for a, b in zip(got, want, strict=True)
            )
            print(f"| packed | {max_segments} | {ms:.2f} | {ms / plain:.3f} | {err:.1e} |")
        except Exception as error:  # noqa: BLE001 - a probe: report and go on
            print(f"| packed | {max_segments} | {type(error).__name__}: {str(error)[:150]} | | |")


if __name__ == "__main__":
    main()
