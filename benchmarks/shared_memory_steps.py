"""Where the Mosaic backward kernels' speed steps with their shared memory (Hopper GPU;
on a CPU, tiny shapes in interpret mode).

Issue #10's eighth part found the dK/dV kernel 15-20% slower with 16 bytes more
scratch (133240 -> 133256 bytes, as `common.scratch_bytes` counts) where blocks walk
few tiles (docs/benchmarks.md). This maps such steps for both backward kernels: the
bounded dQ and dK/dV kernels as the default path runs them (`--documents` packed
documents; q and k after swish and RoPE, the raw rows given for their gradients), each
with its scratch grown by every `--extra` byte count (unused barriers, 8 bytes each,
and unused KiB in the buffer of first keys), timed in `--rounds` interleaved rounds;
"ratio" is against the same kernel unpadded within a round (median and range).

    python benchmarks/shared_memory_steps.py
    python benchmarks/shared_memory_steps.py --kernels dq --extra 0,1024,1032,1040
"""

import argparse
import contextlib
import functools
import statistics

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from packed_windows import add_case_arguments
from timing import add_round_arguments, compiled_median_ms, packed_ids, print_table_header

from eqx_xlstm import maths
from eqx_xlstm.implementations import raw_rows
from eqx_xlstm.implementations.mosaic import backward, common, dq_kernel, forward

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_case_arguments(parser)
parser.add_argument("--extra", default="0,8,16,24,1024,1032,1040", help="comma-separated bytes")
parser.add_argument("--activations", default="sigmoid,softmax")
parser.add_argument("--kernels", default="dq,dkv")
add_round_arguments(parser)
args = parser.parse_args()

interpret = jax.devices()[0].platform != "gpu"
rows, seq, dim = args.batch * args.heads, args.seq_len, args.head_dim
if interpret:  # Mosaic GPU interpret mode: tiny shapes
    rows, seq, dim = 2, 512, 64
extras = [int(e) for e in args.extra.split(",")]
if any(e % 8 or e < 0 for e in extras):
    raise SystemExit("--extra takes non-negative multiples of 8 bytes")


@contextlib.contextmanager
def grown_scratch(extra):
    """`backward_common.bounded_scratch`, as both kernels' modules call it, with `extra`
    unused bytes: whole KiB in the int32 buffer (after the entries the kernels read),
    the rest as unused barriers after the three block-info ones (the kernels' lists of
    scratch keep their shape)."""
    original = backward.bounded_scratch
    kib, rest = divmod(extra, 1024)

    def grown(tiles):
        buffer, _ = original(tiles)
        buffer = plgpu.SMEM((buffer.shape[0] + 256 * kib,), buffer.dtype)
        return [buffer, plgpu.Barrier(num_barriers=3 + rest // 8)]

    for module in (backward, dq_kernel):
        module.bounded_scratch = grown
    try:
        yield
    finally:
        for module in (backward, dq_kernel):
            module.bounded_scratch = original


def kernel_call(q, k, v, d_out, first_key, raw_q, raw_k, table, stats, *, run, activation, bias):
    prepared = raw_rows.Prepared(raw_q, raw_k, table, swish=True)
    options = dict(first_key=first_key, prepared=prepared, **stats)
    return run(q, k, v, d_out, activation, bias, interpret, **options)


def scratch_bytes(kernel, arrays, softmax):
    options = dict(bounded=True, softmax=softmax, raw=True, interpret=False)
    if kernel == "dq":
        return common.scratch_bytes(dq_kernel._dq_scratch(*arrays, **options))
    return common.scratch_bytes(backward._dkv_scratch(*arrays, fused=False, **options))


keys = jax.random.split(jax.random.key(0), 6)
dtype = jnp.dtype(args.dtype)
raw_q, raw_k, v, d_out = (jax.random.normal(x, (rows, seq, dim), dtype) for x in keys[:4])
angles = jax.random.uniform(keys[4], (1, seq, dim // 2), jnp.float32, 0.0, 6.3)
table = raw_rows.rope_pair_table(jnp.sin(angles), jnp.cos(angles))
q, k = (maths.swish(x) for x in (raw_q, raw_k))  # (the kernels' inputs need not be exact)
first = maths.first_keys(seq, None, packed_ids(seq, args.documents))
first_key = jnp.broadcast_to(first, (rows, seq)).astype(jnp.int32)
arrays = (q, k, v, d_out, first_key, raw_q, raw_k, table)

print(
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.dtype}, N={rows} "
    f"(B x NH), S={seq}, D={dim}, {args.documents} packed documents; each kernel alone; "
    f"{args.rounds} interleaved rounds of {args.repeats} samples of {args.sample_ms:g} ms"
)
print_table_header("| activation | kernel | extra bytes | scratch bytes | ms | ratio |")
for activation in args.activations.split(","):
    softmax = activation == "softmax"
    bias = -5.0 if activation == "sigmoid" else None
    stats = {}
    if softmax:  # the backward's row statistics, from the forward
        out, lse = forward.mosaic_forward(q, k, v, activation, bias, interpret, first_key=first_key)
        stats = dict(lse=lse, delta=maths.row_delta(out, d_out))
    for kernel in args.kernels.split(","):
        run = dq_kernel.mosaic_dq if kernel == "dq" else backward.mosaic_dkv
        call = functools.partial(kernel_call, run=run, activation=activation, bias=bias)
        compiled = {}
        for extra in extras:
            with grown_scratch(extra):
                compiled[extra] = jax.jit(call).lower(*arrays, stats).compile()
        times = {extra: [] for extra in extras}
        for _ in range(args.rounds):
            for extra, form in compiled.items():
                ms = compiled_median_ms(
                    form, *arrays, stats, repeats=args.repeats, sample_ms=args.sample_ms
                )
                times[extra].append(ms)
        base = scratch_bytes(kernel, arrays[:4], softmax)
        for extra in extras:
            ratios = [a / b for a, b in zip(times[extra], times[extras[0]], strict=True)]
            print(
                f"| {activation} | {kernel} | {extra} | {base + extra} "
                f"| {statistics.median(times[extra]):.3f} | {statistics.median(ratios):.3f} "
                f"({min(ratios):.3f}-{max(ratios):.3f}) |",
                flush=True,
            )
