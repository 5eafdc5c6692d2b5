"""The Mosaic backward kernels with the gradient through swish and RoPE in their
epilogues (`prepared=`), against the kernels followed by XLA's pass over dQ and dK
(what `attention` runs today): the backward alone, from queries and keys already
prepared, on one Hopper GPU.

    python benchmarks/raw_gradient_epilogue.py

Cases as in `packed_windows.py`: 8 packed documents at S=16384 and a window of 1024 at
S=32768 (bf16, B=4, NH=16 as 64 kernel rows, D=128), sigmoid and softmax; the pair of
dQ and dK/dV kernels, as dispatch runs them there. Prints a table: ms per backward,
the ratio, and the largest difference between the two (relative to the largest
gradient entry).
"""

import argparse

import jax
import jax.numpy as jnp
from profile_kernels import kernel_times
from timing import median_ms, packed_ids, print_table_header, random_qkv

from eqx_xlstm import maths
from eqx_xlstm.implementations import raw_rows
from eqx_xlstm.implementations.mosaic import backward, dq_kernel
from eqx_xlstm.nn.rope import rope_tables


def case_inputs(seq_len, rows, dim, window, documents):
    ids = packed_ids(seq_len, documents) if documents else None
    first = maths.first_keys(seq_len, window, ids)
    positions = jnp.arange(seq_len) if ids is None else maths.segment_positions(ids)
    sin, cos = rope_tables(seq_len, dim, None, None, 10000.0)
    sin, cos = sin[positions], cos[positions]
    q_raw, k_raw, v, g = random_qkv((rows, seq_len, dim), jnp.bfloat16, count=4)
    prepare = lambda x: maths.prepare(x, "swish", sin, cos, jnp.float32).astype(x.dtype)
    q, k = prepare(q_raw), prepare(k_raw)
    first = jnp.broadcast_to(first, (rows, seq_len)).astype(jnp.int32)
    table = raw_rows.rope_pair_table(sin, cos)[None]
    return q_raw, k_raw, q, k, v, g, first, sin, cos, table


def run(activation, q_raw, k_raw, q, k, v, g, first, sin, cos, table, epilogue):
    options = dict(first_key=first)
    if activation == "softmax":  # the row statistics, as the forward kernel gives them
        scores_lse = jnp.zeros(q.shape[:2], jnp.float32) + 12.0
        options |= dict(lse=scores_lse, delta=jnp.zeros(q.shape[:2], jnp.float32))
    rest = (activation, -9.7, False)
    if epilogue:
        options["prepared"] = raw_rows.Prepared(q_raw, k_raw, table, swish=True)
    dq = dq_kernel.mosaic_dq(q, k, v, g, *rest, **options)
    dk, dv = backward.mosaic_dkv(q, k, v, g, *rest, **options)
    if not epilogue:  # XLA's pass: the transpose of swish + RoPE
        prepare = lambda x: maths.prepare(x, "swish", sin, cos, jnp.float32)
        dq = jax.vjp(prepare, q_raw)[1](dq.astype(jnp.float32))[0].astype(q.dtype)
        dk = jax.vjp(prepare, k_raw)[1](dk.astype(jnp.float32))[0].astype(k.dtype)
    return dq, dk, dv


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", nargs="+", default=["sigmoid", "softmax"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also each kernel's µs per call")
    args = parser.parse_args()
    cases = {"packed 8 docs, S=16384": (16384, None, 8), "window 1024, S=32768": (32768, 1024, 0)}
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; bf16, 64 rows, D=128")
    print_table_header(
        "| case | activation | kernels + XLA pass | epilogue | epilogue / pass | max rel diff |"
    )
    for name, (seq_len, window, documents) in cases.items():
        arrays = case_inputs(seq_len, 64, 128, window, documents)
        for activation in args.activations:
            times, results = [], []
            for epilogue in (False, True):
                fn = jax.jit(lambda *a, e=epilogue, f=activation: run(f, *a, epilogue=e))
                results.append(fn(*arrays))
                times.append(median_ms(fn, *arrays, repeats=args.repeats))
                if args.profile:
                    kernels, _ = kernel_times(fn, *arrays)
                    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:4]
                    listed = ", ".join(f"{name} {us:.0f}" for name, (_, us) in top)
                    print(f"  {name}, {activation}, epilogue={epilogue}: {listed} µs", flush=True)
            diff = max(
                float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                / float(jnp.max(jnp.abs(b.astype(jnp.float32))))
                for a, b in zip(*results)
            )
            print(
                f"| {name} | {activation} | {times[0]:.3f} ms | {times[1]:.3f} ms "
                f"| {times[1] / times[0]:.3f} | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
