"""The Mosaic kernels with a persistent schedule against one CUDA block per block of
rows (Hopper GPU; on a CPU, tiny shapes in interpret mode).

`ctas=C` (`mosaic_forward`, `mosaic_dq`, `mosaic_dkv`): C CUDA blocks take the blocks
of query rows (keys for dK/dV) in turn, and the ring of streamed tiles runs on from
one block into the next, so the streaming warpgroup loads a block's first tiles while
the previous block still computes. What that should hide is each block's start (its
range, its first tiles, the launch), which counts where a block walks few tiles:
packed documents and sliding windows (issue #10). Kernels alone, on q and k already
through swish and RoPE, at `packed_windows.py`'s shapes (N = B x NH rows): full causal
and `--documents` packed documents at `--seq-len`, a window of `--window` at
`--window-seq-len`. Each persistent kernel's outputs are compared with the grid
kernel's (they must be equal), then both are timed in `--rounds` interleaved rounds;
"ratio" is persistent / grid within a round (median and range).

    python benchmarks/persistent_kernels.py
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
from packed_windows import add_case_arguments
from timing import add_round_arguments, compiled_median_ms, packed_ids, print_table_header

from eqx_xlstm import maths
from eqx_xlstm.implementations.mosaic import backward, dq_kernel, forward

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_case_arguments(parser)
parser.add_argument("--ctas", default="", help="comma-separated CUDA block counts (default: SMs)")
parser.add_argument("--activations", default="sigmoid,softmax")
parser.add_argument("--kernels", default="forward,dq,dkv")
add_round_arguments(parser, sample_ms=10.0)  # (compiled_median_ms's default)
args = parser.parse_args()

device = jax.devices()[0]
interpret = device.platform != "gpu"
sms = getattr(device, "core_count", 0) or 4
ctas_list = [int(c) for c in args.ctas.split(",")] if args.ctas else [sms]
rows, seq_len, window_seq_len = args.batch * args.heads, args.seq_len, args.window_seq_len
dtype = jnp.dtype(args.dtype)
packed = maths.first_keys(seq_len, None, packed_ids(seq_len, args.documents))
cases = [
    ("full causal", seq_len, None),
    (f"{args.documents} packed documents", seq_len, packed),
    (f"window {args.window}", window_seq_len, maths.first_keys(window_seq_len, args.window)),
]


def kernel_call(kernel, activation, bias, stats):
    """`(q, k, v, dout, *first_key) -> outputs` of one kernel, given `ctas`."""

    def call(q, k, v, dout, *first_key, ctas):
        options = dict(first_key=first_key[0] if first_key else None, ctas=ctas)
        if kernel == "forward":
            return forward.mosaic_forward(q, k, v, activation, bias, interpret, **options)
        if activation == "softmax":
            options |= stats
        run = dq_kernel.mosaic_dq if kernel == "dq" else backward.mosaic_dkv
        return run(q, k, v, dout, activation, bias, interpret, **options)

    return call


print(
    f"{device.device_kind}, jax {jax.__version__}; {args.dtype}, N={rows} (B x NH), "
    f"D={args.head_dim}; "
    f"each kernel alone; {args.rounds} interleaved rounds of {args.repeats} samples; "
    f"SMs: {sms}"
)
print_table_header(
    "| activation | case | S | kernel | grid ms | CUDA blocks | persistent ms | ratio |"
)
for activation in args.activations.split(","):
    bias = -5.0 if activation == "sigmoid" else None
    for label, seq, first in cases:
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, dout = (jax.random.normal(x, (rows, seq, args.head_dim), dtype) for x in keys)
        xs = (q, k, v, dout)
        if first is not None:
            xs += (jnp.broadcast_to(first, (rows, seq)).astype(jnp.int32),)
        stats = {}
        if activation == "softmax":  # the backward's row statistics, from the forward
            first_key = xs[4] if first is not None else None
            run = forward.mosaic_forward
            out, lse = run(q, k, v, activation, bias, interpret, first_key=first_key)
            stats = dict(lse=lse, delta=maths.row_delta(out, dout))
        forms = {}
        for kernel in args.kernels.split(","):
            call = kernel_call(kernel, activation, bias, stats)
            for ctas in [None, *ctas_list]:
                fn = lambda *a, call=call, ctas=ctas: call(*a, ctas=ctas)
                forms[kernel, ctas] = jax.jit(fn).lower(*xs).compile()
            want = jax.tree.leaves(forms[kernel, None](*xs))
            for ctas in ctas_list:
                got = jax.tree.leaves(forms[kernel, ctas](*xs))
                if any(bool(jnp.any(a != b)) for a, b in zip(got, want, strict=True)):
                    raise SystemExit(f"{activation} {label} {kernel}: ctas={ctas} differs")
        times = {form: [] for form in forms}
        for _ in range(args.rounds):
            for form, compiled in forms.items():
                times[form].append(
                    compiled_median_ms(
                        compiled, *xs, repeats=args.repeats, sample_ms=args.sample_ms
                    )
                )
        for kernel in args.kernels.split(","):
            grid = times[kernel, None]
            for ctas in ctas_list:
                ratios = [a / b for a, b in zip(times[kernel, ctas], grid, strict=True)]
                print(
                    f"| {activation} | {label} | {seq} | {kernel} | {statistics.median(grid):.3f} "
                    f"| {ctas} | {statistics.median(times[kernel, ctas]):.3f} "
                    f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |",
                    flush=True,
                )
