"""Packed documents, sliding windows and grouped-query heads against full causal
attention at the same S, in one run (issue #10's targets).

    python benchmarks/packed_windows.py                          # the issue's shapes (a GPU)
    python benchmarks/packed_windows.py --seq-len 4096 --window-seq-len 4096 --window 256 \\
        --batch 1 --heads 4 --head-dim 64 --dtype float32       # a CPU

For each activation and each of `--paths` (the default dispatch, or an implementation
by name), fwd+bwd (the gradient of a sum; with `--forward`, the output alone): full
causal; `--documents` packed documents of S/documents positions each (`segment_ids`);
keys/values with heads/8 heads (grouped-query 8:1); and a sliding window of `--window`
at `--window-seq-len`. The ratios are the time over full causal's at the same S,
through the default dispatch and through the same path. The path "cudnn mask" is the
peer the issue names: softmax with the visibility written out as a mask, through
`jax.nn.dot_product_attention`'s cuDNN (without swish and RoPE). The implementation
that ran is printed beside each row (`eqx_xlstm.dispatch.plan`).

    python benchmarks/packed_windows.py --paths default triton chunked "cudnn mask"
"""

import argparse

import jax
import jax.numpy as jnp
from timing import median_ms, packed_ids, print_table_header, random_qkv, sum_gradient

import eqx_xlstm as ex
from eqx_xlstm import dispatch


def timed_call(activation, forward=False, **kwargs):
    """The timed call: the gradient of the output's sum, or with `forward` the output."""

    def output(q, k, v):
        return ex.attention(
            q, k, v, activation_function=activation, qk_pre_activation_function="swish", **kwargs
        )

    return output if forward else sum_gradient(output)


def chosen(q, k, v, activation, forward=False, **kwargs):
    """The implementation dispatch picks for this call (`forward`: without a gradient)."""
    seen = {}
    original = dispatch.plan

    def spy(spec, requested=None):
        plan = original(spec, requested)
        seen["name"] = plan.forward.name if forward else plan.gradient.name
        return plan

    dispatch.plan = spy
    try:
        jax.eval_shape(timed_call(activation, forward, **kwargs), q, k, v)
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


def masked_cudnn_call(mask, forward=False):
    """The peer: `jax.nn.dot_product_attention` through cuDNN with the mask written out
    (softmax; no swish or RoPE, so it does less than our rows)."""

    def output(q, k, v):
        bthn = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
        return jax.nn.dot_product_attention(*bthn, mask=mask, implementation="cudnn")

    return output if forward else sum_gradient(output)


def time_case(activation, arrays, kwargs, path, repeats, forward=False):
    """`(ms, implementation)` of one case on one path ("default": the dispatch's
    choice; "cudnn mask": the explicit mask through cuDNN), or None where the path
    cannot serve it."""
    if path == "cudnn mask":
        mask = explicit_mask(
            arrays[0].shape[-2], kwargs.get("segment_ids"), kwargs.get("sliding_window")
        )
        timed = masked_cudnn_call(mask, forward)
        return median_ms(timed, *arrays, repeats=repeats), "jax.nn cudnn"
    if path != "default":
        kwargs = {**kwargs, "implementation": path}
    try:
        name = chosen(*arrays, activation, forward, **kwargs)
        timed = timed_call(activation, forward, **kwargs)
        return median_ms(timed, *arrays, repeats=repeats), name
    except ValueError:  # "cannot serve these inputs"
        return None


def _ratio(ms, full):
    return f"{ms / full:.3f}" if full else ""


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--activations", nargs="+", default=["softmax", "sigmoid", "none"])
    parser.add_argument("--forward", action="store_true", help="time the forward pass alone")
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["default"],
        help='"default", implementation names, or "cudnn mask" (softmax with the mask '
        "written out: the issue's peer)",
    )
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    groups = max(1, args.heads // 8)
    device = jax.devices()[0]
    print(
        f"{device.device_kind}, jax {jax.__version__}; {args.dtype}, B={args.batch}, "
        f"NH={args.heads}, D={args.head_dim}, swish, "
        f"{'forward' if args.forward else 'fwd+bwd'} median ms; packed and grouped "
        f"at S={args.seq_len}, the window at S={args.window_seq_len}"
    )
    print_table_header(
        "| activation | S | case | path | implementation | ms | ratio to default full causal "
        "| ratio to this path's full causal |"
    )
    inputs = {}
    for seq_len in sorted({args.seq_len, args.window_seq_len}):
        shape = (args.batch, args.heads, seq_len, args.head_dim)
        inputs[seq_len] = random_qkv(shape, dtype)
    ids = packed_ids(args.seq_len, args.documents)
    for activation in args.activations:
        full = {}  # (S, path) -> full causal ms
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
                rows = [("full causal", (q, k, v), {}), (label, arrays, kwargs)]
                if (seq_len, path) in full or path == "cudnn mask":
                    rows = rows[1:]
                for case, xs, kw in rows:
                    timed = time_case(activation, xs, kw, path, args.repeats, args.forward)
                    if timed is None:
                        print(
                            f"| {activation} | {seq_len} | {case} | {path} | cannot serve | | | |"
                        )
                        continue
                    ms, name = timed
                    if case == "full causal":
                        full[seq_len, path] = ms
                    base = full.get((seq_len, "default"))
                    own = full.get((seq_len, path))
                    print(
                        f"| {activation} | {seq_len} | {case} | {path} | {name} | {ms:.2f} "
                        f"| {_ratio(ms, base)} | {_ratio(ms, own)} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
