"""Where the device time of one attention call goes: each kernel's time per call, from a
`jax.profiler` trace of a few jitted calls (read back with `jax.profiler.ProfileData`).

    python benchmarks/profile_kernels.py --activation sigmoid --cases full packed window

The cases are those of `packed_windows.py` (bf16, B=4, NH=16, D=128, swish + RoPE by
default): full causal and packed documents at `--seq-len`, a sliding window at
`--window-seq-len`; the call `--timed` as there. Kernels are grouped by name (a
fusion's numbered copies add up); the wall time per call (`timing.median_ms`) shows
the gaps between them.
"""

import argparse
import collections
import glob
import re
import tempfile

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData
from packed_windows import TIMED, add_case_arguments, timed_arrays, timed_call
from timing import median_ms, packed_ids, random_qkv

PLANE = "/device:GPU:0"


def kernel_times(fn, *xs, calls=5):
    """`{kernel name: (launches per call, µs per call)}` on the first GPU, and the
    device's total µs per call."""
    compiled = jax.jit(fn).lower(*xs).compile()
    jax.block_until_ready(compiled(*xs))
    directory = tempfile.mkdtemp()
    with jax.profiler.trace(directory):
        for _ in range(calls):
            jax.block_until_ready(compiled(*xs))
    (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    events = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith(PLANE):
            continue
        lines = [line for line in plane.lines if line.name.startswith("Stream")]
        for line in lines or plane.lines:  # kernels sit on the stream lines
            for e in line.events:
                events.append((e.start_ns, re.sub(r"\.\d+$", "", e.name), e.duration_ns))
    # Kernels launched a few times a call under one name (every Mosaic kernel is
    # "entry_mosaic_gpu_kernel") are told apart by their order in the call: #1, #2, ...
    counts = collections.Counter(name for _, name, _ in events)
    seen = collections.Counter()
    totals = collections.defaultdict(lambda: [0, 0.0])
    for _, name, duration in sorted(events):
        launches, label = counts[name] // calls, name
        if 1 < launches <= 4 and counts[name] % calls == 0:
            label = f"{name} #{seen[name] % launches + 1}"
            seen[name] += 1
        totals[label][0] += 1
        totals[label][1] += duration / 1e3
    per_call = {name: (n / calls, us / calls) for name, (n, us) in totals.items()}
    return per_call, sum(us for _, us in per_call.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation", default="sigmoid")
    parser.add_argument("--cases", nargs="+", default=["full", "packed", "window"])
    parser.add_argument("--implementation", default=None)
    add_case_arguments(parser)
    parser.add_argument("--timed", choices=TIMED, default="step")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per case")
    args = parser.parse_args()
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.activation}, "
        f"{args.dtype}, B={args.batch}, NH={args.heads}, D={args.head_dim}, swish + RoPE, "
        f"timed: {args.timed}; µs per call on the device"
    )
    for case in args.cases:
        seq_len = args.window_seq_len if case == "window" else args.seq_len
        shape = (args.batch, args.heads, seq_len, args.head_dim)
        q, k, v = random_qkv(shape, jnp.dtype(args.dtype))
        kwargs = {} if args.implementation is None else {"implementation": args.implementation}
        if case == "packed":
            kwargs["segment_ids"] = packed_ids(seq_len, args.documents)
        elif case == "window":
            kwargs["sliding_window"] = args.window
        fn = timed_call(args.activation, args.timed, **kwargs)
        xs = timed_arrays(q, k, v, args.timed)
        times, total = kernel_times(fn, *xs)
        wall = median_ms(fn, *xs, repeats=5, sample_ms=100.0) * 1e3
        print(f"\n{case} (S={seq_len}): {total:.0f} µs of kernels in {wall:.0f} µs per call")
        print("| kernel | launches | µs | share |")
        print("|---|---|---|---|")
        ranked = sorted(times.items(), key=lambda item: -item[1][1])
        for name, (launches, us) in ranked[: args.top]:
            print(f"| {name[:60]} | {launches:g} | {us:.1f} | {us / total:.3f} |")
        rest = sum(us for _, (_, us) in ranked[args.top :])
        if rest:
            print(f"| ({len(ranked) - args.top} more) | | {rest:.1f} | {rest / total:.3f} |")


if __name__ == "__main__":
    main()
