"""The Mosaic forward kernel with a persistent schedule against one CUDA block per
block of query rows (Hopper GPU; on a CPU, tiny shapes in interpret mode).

`mosaic_forward(..., ctas=C)`: C CUDA blocks take the blocks of query rows in turn and
the ring of key/value slots runs on from one block into the next, so the streaming
warpgroup loads a block's first tiles while the previous block still computes. What
that should hide is each block's start (first keys, first tiles, the launch), which
counts where a block walks few tiles: packed documents and sliding windows (issue
#10). Kernels alone, on q and k already through swish and RoPE: bf16, N = B*NH = 64,
D=128; full causal and 8 packed documents at `--seq`, a window of `--window` at
`--window-seq`. Outputs are compared with the grid kernel's (they must be equal), then
the forms are timed in `--rounds` interleaved rounds; "ratio" is persistent / grid
within a round (median and range).

    python benchmarks/persistent_forward.py
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
from timing import compiled_median_ms, packed_ids, print_table_header

from eqx_xlstm import maths
from eqx_xlstm.implementations.mosaic import forward

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seq", type=int, default=16384)
parser.add_argument("--window-seq", type=int, default=32768)
parser.add_argument("--window", type=int, default=1024)
parser.add_argument("--rows", type=int, default=64, help="N = B * NH")
parser.add_argument("--dim", type=int, default=128)
parser.add_argument("--ctas", default="", help="comma-separated CUDA block counts (default: SMs)")
parser.add_argument("--activations", default="sigmoid,softmax")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()

device = jax.devices()[0]
interpret = device.platform != "gpu"
sms = getattr(device, "core_count", 0) or 4
ctas_list = [int(c) for c in args.ctas.split(",")] if args.ctas else [sms]
cases = [
    ("full causal", args.seq, None),
    ("8 packed documents", args.seq, maths.first_keys(args.seq, None, packed_ids(args.seq, 8))),
    (f"window {args.window}", args.window_seq, maths.first_keys(args.window_seq, args.window)),
]
print(
    f"{device.device_kind}, jax {jax.__version__}; bf16, N={args.rows}, D={args.dim}; "
    f"the forward kernel alone; {args.rounds} interleaved rounds of {args.repeats} samples; "
    f"SMs: {sms}"
)
print_table_header("| activation | case | S | grid ms | CUDA blocks | persistent ms | ratio |")
for activation in args.activations.split(","):
    bias = -5.0 if activation == "sigmoid" else None
    for label, seq, first in cases:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(x, (args.rows, seq, args.dim), jnp.bfloat16) for x in keys)
        xs = (q, k, v)
        if first is not None:
            xs += (jnp.broadcast_to(first, (args.rows, seq)).astype(jnp.int32),)
        forms = {}
        for ctas in [None, *ctas_list]:

            def call(q, k, v, *first_key, ctas=ctas, activation=activation, bias=bias):
                first_key = first_key[0] if first_key else None
                return forward.mosaic_forward(
                    q, k, v, activation, bias, interpret, first_key=first_key, ctas=ctas
                )

            forms[ctas] = jax.jit(call).lower(*xs).compile()
        want = jax.tree.leaves(forms[None](*xs))
        for ctas in ctas_list:
            got = jax.tree.leaves(forms[ctas](*xs))
            if any(bool(jnp.any(a != b)) for a, b in zip(got, want, strict=True)):
                raise SystemExit(f"{activation} {label}: ctas={ctas} differs from the grid kernel")
        times = {ctas: [] for ctas in forms}
        for _ in range(args.rounds):
            for ctas, compiled in forms.items():
                times[ctas].append(compiled_median_ms(compiled, *xs, repeats=args.repeats))
        grid = times[None]
        for ctas in ctas_list:
            ratios = [a / b for a, b in zip(times[ctas], grid, strict=True)]
            print(
                f"| {activation} | {label} | {seq} | {statistics.median(grid):.3f} | {ctas} "
                f"| {statistics.median(times[ctas]):.3f} | {statistics.median(ratios):.3f} "
                f"({min(ratios):.3f}-{max(ratios):.3f}) |",
                flush=True,
            )
