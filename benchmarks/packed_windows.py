"""Packed documents, sliding windows and grouped-query heads against full causal
attention at the same S, in one run (issue #10's targets).

    python benchmarks/packed_windows.py                          # the issue's shapes (a GPU)
    python benchmarks/packed_windows.py --seq-len 4096 --window-seq-len 4096 --window 256 \\
        --batch 1 --heads 4 --head-dim 64 --dtype float32       # a CPU

For each activation and each of `--paths` (the default dispatch, or an implementation
by name), the timed call (`--timed`): "step", a training step's share (the output and
its gradients for a given cotangent; the default), "sum-gradient" (the gradient of the
output's sum, as timed up to the sixth part of issue #10: XLA drops the forward kernel
where the gradient does not need it, sigmoid and 'none', and makes the cotangent inside
the call) or "forward" (the output alone; `--forward` for short). Cases: full causal;
`--documents` packed documents of S/documents positions each (`segment_ids`);
keys/values with heads/8 heads (grouped-query 8:1); and a sliding window of `--window`
at `--window-seq-len`. Each case is compiled once and timed in `--rounds` interleaved
rounds. The ratios are the time over full causal's at the same S in the same round
(their median and range), through the default dispatch and through the same path. The
path "cudnn mask" is the peer the issue names: softmax with the visibility written out
as a mask, through `jax.nn.dot_product_attention`'s cuDNN (without swish and RoPE). The
implementation that ran is printed beside each row (`eqx_xlstm.dispatch.plan`).

    python benchmarks/packed_windows.py --paths default triton chunked "cudnn mask"
    python benchmarks/packed_windows.py --paths default "mosaic persistent"
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from gpu_clock import ClockSampler
from timing import (
    add_round_arguments,
    compiled_median_ms,
    packed_ids,
    print_table_header,
    random_qkv,
    sum_gradient,
    training_step,
)

import eqx_xlstm as ex
from eqx_xlstm import dispatch
from eqx_xlstm.implementations import Mosaic

TIMED = ("step", "sum-gradient", "forward")


def timed_form(fn, timed):
    """`fn(q, k, v)` as the `timed` call (one of `TIMED`); "step" takes the cotangent
    as a fourth argument."""
    return {"step": training_step, "sum-gradient": sum_gradient, "forward": lambda f: f}[timed](fn)


def timed_call(activation, timed="step", **kwargs):
    """Our attention with swish + RoPE as the `timed` call."""

    def output(q, k, v):
        return ex.attention(
            q, k, v, activation_function=activation, qk_pre_activation_function="swish", **kwargs
        )

    return timed_form(output, timed)


def timed_arrays(q, k, v, timed):
    """The timed call's arguments: q, k, v and, for a step, a cotangent like q."""
    if timed != "step":
        return q, k, v
    return q, k, v, jax.random.normal(jax.random.key(3), q.shape, q.dtype)


def chosen(q, k, v, activation, timed="step", **kwargs):
    """The implementation dispatch picks for this call (its forward's where only the
    forward is timed)."""
    seen = {}
    original = dispatch.plan

    def spy(spec, requested=None):
        plan = original(spec, requested)
        seen["name"] = plan.forward.name if timed == "forward" else plan.gradient.name
        return plan

    dispatch.plan = spy
    try:
        jax.eval_shape(timed_call(activation, timed, **kwargs), *timed_arrays(q, k, v, timed))
    finally:
        dispatch.plan = original
    return seen.get("name", "?")


def explicit_mask(seq_len, ids=None, window=None):
    """The visibility rule of a case written out as a bool `(S, S)` mask (the peer's
    input)."""
    i, j = jnp.arange(seq_len)[:, None], jnp.arange(seq_len)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j < window
    if ids is not None:
        mask &= ids[:, None] == ids[None, :]
    return mask


def masked_cudnn_call(mask, timed="step"):
    """The peer: `jax.nn.dot_product_attention` through cuDNN with the mask written out
    (softmax; no swish or RoPE, so it does less than our rows)."""

    def output(q, k, v):
        bthn = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
        out = jax.nn.dot_product_attention(*bthn, mask=mask, implementation="cudnn")
        return jnp.swapaxes(out, 1, 2)

    return timed_form(output, timed)


def compile_case(activation, arrays, kwargs, path, timed="step"):
    """`(compiled call, its arguments, implementation)` of one case on one path
    ("default": the dispatch's choice; "cudnn mask": the explicit mask through cuDNN),
    or None where the path cannot serve it."""
    xs = timed_arrays(*arrays, timed)
    if path == "cudnn mask":
        mask = explicit_mask(
            arrays[0].shape[-2], kwargs.get("segment_ids"), kwargs.get("sliding_window")
        )
        call, name = masked_cudnn_call(mask, timed), "jax.nn cudnn"
    else:
        if path == "mosaic persistent":  # Mosaic's persistent schedule, a CUDA block per SM
            sms = getattr(jax.devices()[0], "core_count", 0) or 4
            kwargs = {**kwargs, "implementation": Mosaic(ctas=sms)}
        elif path != "default":
            kwargs = {**kwargs, "implementation": path}
        try:
            name = chosen(*arrays, activation, timed, **kwargs)
        except ValueError:  # "cannot serve these inputs"
            return None
        call = timed_call(activation, timed, **kwargs)
    return jax.jit(call).lower(*xs).compile(), xs, name


def _summary(values, digits):
    """The median of per-round values, with their range where there are several."""
    text = f"{statistics.median(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def _clock_columns(rows, times, mhz, i):
    """Row `i`'s median SM clock, and its ratio to the default full causal's in SM
    cycles (time x clock, per round): what the time ratio would be at equal clocks,
    where the kernels' time follows the SM clock."""
    if None in mhz[i]:
        return " | |"
    cycles = lambda j: [t * f for t, f in zip(times[j], mhz[j], strict=True)]
    text = f" {_summary(mhz[i], 0)} |"
    j = _full_index(rows, times, rows[i][0], "default")
    if j is None or None in mhz[j]:
        return text + " |"
    return text + f" {_summary([a / b for a, b in zip(cycles(i), cycles(j))], 3)} |"


def _full_index(rows, times, seq_len, path):
    """The row of full causal at `seq_len` on `path`, if timed."""
    for i, (s, case, p, _) in enumerate(rows):
        if (s, case, p) == (seq_len, "full causal", path) and i in times:
            return i
    return None


def _full(rows, times, seq_len, path):
    """The per-round times of full causal at `seq_len` on `path`, if timed."""
    i = _full_index(rows, times, seq_len, path)
    return None if i is None else times[i]


def add_case_arguments(parser):
    """The shapes of the cases (issue #10's by default), shared with
    `profile_kernels.py`."""
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--window-seq-len", type=int, default=32768)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser)
    add_round_arguments(parser)
    parser.add_argument("--activations", nargs="+", default=["softmax", "sigmoid", "none"])
    parser.add_argument("--timed", choices=TIMED, default="step", help="the timed call")
    parser.add_argument("--forward", action="store_true", help='short for "--timed forward"')
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["default"],
        help='"default", implementation names, "cudnn mask" (softmax with the mask written '
        'out: the issue\'s peer) or "mosaic persistent" (Mosaic(ctas=the SM count))',
    )
    args = parser.parse_args()
    timed = "forward" if args.forward else args.timed
    dtype = jnp.dtype(args.dtype)
    groups = max(1, args.heads // 8)
    device = jax.devices()[0]
    print(
        f"{device.device_kind}, jax {jax.__version__}; {args.dtype}, B={args.batch}, "
        f"NH={args.heads}, D={args.head_dim}, swish, "
        f"timed: {timed}; median ms over {args.rounds} rounds of {args.repeats} samples of "
        f"{args.sample_ms:g} ms (ratios: per round, median and range); packed and grouped "
        f"at S={args.seq_len}, the window at S={args.window_seq_len}"
    )
    clocks = ClockSampler()
    header = (
        "| activation | S | case | path | implementation | ms | ratio to default full causal "
        "| ratio to this path's full causal |"
    )
    if clocks.available:  # the clock each case ran at, and the ratio in SM cycles
        header += " SM MHz | cycles ratio to default full causal |"
    print_table_header(header)
    inputs = {}
    for seq_len in sorted({args.seq_len, args.window_seq_len}):
        shape = (args.batch, args.heads, seq_len, args.head_dim)
        inputs[seq_len] = random_qkv(shape, dtype)
    ids = packed_ids(args.seq_len, args.documents)
    for activation in args.activations:
        rows = []  # (S, case, path, compiled case or None)
        for seq_len, label, kwargs, kv in [
            (args.seq_len, f"{args.documents} packed documents", {"segment_ids": ids}, None),
            (args.seq_len, f"grouped {args.heads}:{groups} heads", {}, groups),
            (args.window_seq_len, f"window {args.window}", {"sliding_window": args.window}, None),
        ]:
            q, k, v = inputs[seq_len]
            arrays = (q, k[:, :kv], v[:, :kv]) if kv else (q, k, v)
            for path in args.paths:
                if path == "cudnn mask" and (activation != "softmax" or kv):
                    continue
                cases = [("full causal", (q, k, v), {}), (label, arrays, kwargs)]
                if any(r[:3] == (seq_len, "full causal", path) for r in rows):
                    cases = cases[1:]
                if path == "cudnn mask":
                    cases = cases[1:]
                for case, xs, kw in cases:
                    compiled = compile_case(activation, xs, kw, path, timed)
                    rows.append((seq_len, case, path, compiled))
        # Rounds interleave the cases, so that a drift of the GPU's clock over the run
        # shows in the ratios' range instead of biasing them.
        times = {i: [] for i, row in enumerate(rows) if row[3] is not None}
        mhz = {i: [] for i in times}
        for _ in range(args.rounds):
            for i in times:
                compiled, xs, _ = rows[i][3]
                start = time.perf_counter()
                times[i].append(
                    compiled_median_ms(
                        compiled, *xs, repeats=args.repeats, sample_ms=args.sample_ms
                    )
                )
                mhz[i].append(clocks.median_mhz(start, time.perf_counter()))

        for i, (seq_len, case, path, compiled) in enumerate(rows):
            if compiled is None:
                print(f"| {activation} | {seq_len} | {case} | {path} | cannot serve | | | |")
                continue
            ratios = []
            for base in (_full(rows, times, seq_len, "default"), _full(rows, times, seq_len, path)):
                each = [t / b for t, b in zip(times[i], base)] if base else None
                ratios.append(_summary(each, 3) if each else "")
            row = (
                f"| {activation} | {seq_len} | {case} | {path} | {compiled[2]} "
                f"| {_summary(times[i], 2)} | {ratios[0]} | {ratios[1]} |"
            )
            if clocks.available:
                row += _clock_columns(rows, times, mhz, i)
            print(row, flush=True)
    clocks.close()


if __name__ == "__main__":
    main()
