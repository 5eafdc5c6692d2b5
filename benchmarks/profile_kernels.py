"""Where the device time of one attention call goes: each kernel's time per call, from a
`jax.profiler` trace of a few jitted calls (read back with `jax.profiler.ProfileData`).

    python benchmarks/profile_kernels.py --activation sigmoid --cases full packed window

The cases are those of `packed_windows.py` (bf16, B=4, NH=16, D=128, swish + RoPE by
default): full causal and packed documents at `--seq-len`, a sliding window at
`--window-seq-len`; the call `--timed` as there. Kernels are grouped by name (a
fusion's numbered copies add up). `--gaps` also lists the stretches in which no kernel
runs, over `--calls` calls issued back to back. The wall time per call
(`timing.median_ms`) can exceed the kernels' sum without such gaps: the GPU's clock falls
under sustained load, and the trace is short (`packed_windows.py` reports the clock).
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
CALLS = 5  # traced calls a case


def kernel_times(fn, *xs, calls=CALLS, timeline=None):
    """`{kernel name: (launches per call, µs per call)}` on the first GPU, and the
    device's total µs per call. With `timeline` (a dict), also its `"gaps"`, the idle
    stretches between kernels as `(µs, kernel before, kernel after)`, and its
    `"span_us"`, first kernel start to last kernel end."""
    compiled = jax.jit(fn).lower(*xs).compile()
    jax.block_until_ready(compiled(*xs))
    directory = tempfile.mkdtemp()
    with jax.profiler.trace(directory):
        # back to back, as `timing.median_ms` times them: the gaps are the device's
        for _ in range(calls):
            out = compiled(*xs)
        jax.block_until_ready(out)
    (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    events = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith(PLANE):
            continue
        lines = [line for line in plane.lines if line.name.startswith("Stream")]
        for line in lines or plane.lines:  # kernels sit on the stream lines
            for e in line.events:
                events.append((e.start_ns, re.sub(r"\.\d+$", "", e.name), e.duration_ns))
    events.sort()
    # Kernels launched a few times a call under one name (every Mosaic kernel is
    # "entry_mosaic_gpu_kernel") are told apart by their order in the call: #1, #2, ...
    counts = collections.Counter(name for _, name, _ in events)
    seen = collections.Counter()
    totals = collections.defaultdict(lambda: [0, 0.0])
    for _, name, duration in events:
        launches, label = counts[name] // calls, name
        if 1 < launches <= 4 and counts[name] % calls == 0:
            label = f"{name} #{seen[name] % launches + 1}"
            seen[name] += 1
        totals[label][0] += 1
        totals[label][1] += duration / 1e3
    if timeline is not None:
        timeline["gaps"] = idle_gaps(events)
        end = max(start + duration for start, _, duration in events)
        timeline["span_us"] = (end - events[0][0]) / 1e3
    per_call = {name: (n / calls, us / calls) for name, (n, us) in totals.items()}
    return per_call, sum(us for _, us in per_call.values())


def idle_gaps(events):
    """`(µs, name before, name after)` for each stretch of `events` (sorted `(start_ns,
    name, duration_ns)`) in which no kernel runs."""
    gaps, end, before = [], None, None
    for start, name, duration in events:
        if end is not None and start > end:
            gaps.append(((start - end) / 1e3, before, name))
        if end is None or start + duration > end:
            end, before = start + duration, name
    return gaps


def print_gaps(timeline, calls, top):
    """The device's span and idle time per call (`kernel_times`' `timeline`), and the
    `top` longest idle stretches."""
    gaps = timeline["gaps"]
    total = sum(us for us, _, _ in gaps)
    print(f"\ndevice span: {timeline['span_us'] / calls:.0f} µs per call")
    print(f"idle between kernels: {total / calls:.0f} µs per call in {len(gaps)} stretches")
    print("| µs | after | before |")
    print("|---|---|---|")
    for us, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"| {us:.1f} | {before[:50]} | {after[:50]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation", default="sigmoid")
    parser.add_argument("--cases", nargs="+", default=["full", "packed", "window"])
    parser.add_argument("--implementation", default=None)
    add_case_arguments(parser)
    parser.add_argument("--timed", choices=TIMED, default="step")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per case")
    parser.add_argument("--calls", type=int, default=CALLS, help="calls traced a case")
    parser.add_argument(
        "--gaps", action="store_true", help="also list the idle stretches between kernels"
    )
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
        timeline = {} if args.gaps else None
        times, total = kernel_times(fn, *xs, calls=args.calls, timeline=timeline)
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
        if args.gaps:
            print_gaps(timeline, args.calls, args.top)


if __name__ == "__main__":
    main()
