"""The code before a change against the code after it, interleaved in one process.

Loads a copy of the old package (`--before`, the folder holding its `__init__.py`)
under another name beside the installed `eqx_xlstm`, compiles every case once for each,
then times them in `--rounds` rounds, alternating which version goes first. Cases, for
each activation, forward and fwd+bwd (`value_and_grad`, as a training step runs it),
with swish + RoPE: the default path; the Pallas kernels ("pallas"); the XLA blockwise
path ("chunked"; for 'none' the linear form: "chunked" before, "linear" after); and the
backend through `eqx.filter_vmap` over the heads axis (forward), beside `attention` on
the same inputs; and ("bounded") packed documents and a sliding window through the
default path. Prints a markdown table: the median time of each version, after /
before per round (min-max) and the median of those ratios.

    git worktree add /tmp/before <commit>
    python benchmarks/before_after.py --before /tmp/before/eqx_xlstm --seqs 4096,8192,16384
    python benchmarks/before_after.py --before /tmp/before/eqx_xlstm --seqs 16384,32768 \
        --groups bounded --sample-ms 100     # issue #10's packed and window cases
"""

import argparse
import importlib.util
import math
import pathlib
import re
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from timing import packed_ids, print_table_header, random_qkv

import eqx_xlstm as new

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--before", required=True, help="folder of the old eqx_xlstm package")
parser.add_argument("--seqs", default="4096,8192,16384")
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--repeats", type=int, default=10)
parser.add_argument(
    "--groups",
    default="default,pallas,chunked,vmap,bounded",
    help="cases to run (also: triton)",
)
parser.add_argument("--documents", type=int, default=8, help="bounded: packed documents")
parser.add_argument("--window", type=int, default=1024, help="bounded: the sliding window")
parser.add_argument("--sample-ms", type=float, default=10.0, help="back-to-back calls per sample")
parser.add_argument("--only", default="", help="a regular expression the case labels must match")
parser.add_argument(
    "--linear-before",
    default="chunked",
    help="the old package's name of the linear 'none' form (chunked before #7, linear after)",
)
args = parser.parse_args()
B, H, D, dtype = args.batch, args.heads, args.head_dim, jnp.dtype(args.dtype)


def load_package(folder, name):
    path = pathlib.Path(folder).resolve()
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


old = load_package(args.before, "eqx_xlstm_before")
VERSIONS = {"before": old, "after": new}


def attention(ex, activation, implementation=None, bias=None, **kwargs):
    return lambda q, k, v: ex.attention(
        q,
        k,
        v,
        activation_function=activation,
        qk_pre_activation_function="swish",
        implementation=implementation,
        sigmoid_bias=bias,
        **kwargs,
    )


def vmapped_backend(ex, activation, seq):
    config = ex.mLSTMBackendAttentionConfig(
        context_length=seq, activation_function=activation, qk_pre_activation_function="swish"
    )
    backend = eqx.filter_vmap(
        ex.mLSTMBackendAttention(config, qk_head_dim=D), in_axes=1, out_axes=1
    )
    return lambda q, k, v: backend(q, k, v)


def value_and_grad(fn):
    loss = lambda *xs: jnp.sum(fn(*xs).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def cases(seq):
    """(group, label, pass, {version: function})."""
    out = []
    for activation in ("softmax", "sigmoid", "none"):
        linear = {"before": args.linear_before, "after": "linear"} if activation == "none" else None
        for group, label, impl in [
            ("default", "default", {"before": None, "after": None}),
            ("pallas", "pallas", {"before": "pallas", "after": "pallas"}),
            ("triton", "triton", {"before": "triton", "after": "triton"}),
            (
                "chunked",
                "chunked" if linear is None else "linear form",
                linear or {"before": "chunked", "after": "chunked"},
            ),
        ]:
            fns = {v: attention(ex, activation, impl[v]) for v, ex in VERSIONS.items()}
            out.append((group, f"{activation} {label}", "fwd", fns))
            out.append(
                (
                    group,
                    f"{activation} {label}",
                    "fwd+bwd",
                    {v: value_and_grad(f) for v, f in fns.items()},
                )
            )
    bounded = [
        (f"{args.documents} packed documents", {"segment_ids": packed_ids(seq, args.documents)}),
        (f"window {args.window}", {"sliding_window": args.window}),
    ]
    for activation in ("softmax", "sigmoid", "none"):
        for label, kwargs in bounded:
            fns = {v: attention(ex, activation, **kwargs) for v, ex in VERSIONS.items()}
            out.append(("bounded", f"{activation} {label}", "fwd", fns))
            grads = {v: value_and_grad(f) for v, f in fns.items()}
            out.append(("bounded", f"{activation} {label}", "fwd+bwd", grads))
    for activation in ("softmax", "sigmoid"):
        bias = -math.log(seq)
        fns = {v: vmapped_backend(ex, activation, seq) for v, ex in VERSIONS.items()}
        out.append(("vmap", f"{activation} backend, filter_vmap over heads", "fwd", fns))
        direct = {v: attention(ex, activation, None, bias) for v, ex in VERSIONS.items()}
        out.append(("vmap", f"{activation} attention, heads as a batch axis", "fwd", direct))
    groups = args.groups.split(",")
    return [c for c in out if c[0] in groups and re.search(args.only, c[1])]


def compiled(fn, xs):
    try:
        exe = jax.jit(fn).lower(*xs).compile()
        jax.block_until_ready(exe(*xs))
        return exe
    except Exception as err:  # noqa: BLE001 - report and go on
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def sample_ms(exe, xs):
    """Median over `repeats` samples of back-to-back calls lasting about `--sample-ms`
    each."""
    start = time.perf_counter()
    jax.block_until_ready(exe(*xs))
    calls = max(1, min(100, round(args.sample_ms / ((time.perf_counter() - start) * 1e3))))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = exe(*xs)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


print(
    f"{jax.devices()[0].device_kind}; jax {jax.__version__}; {dtype.name} B={B} NH={H} D={D}, "
    f"causal, swish + RoPE; {args.rounds} interleaved rounds, median of {args.repeats} samples "
    f"of {args.sample_ms:g} ms"
)
print_table_header(
    "| S | case | pass | before ms | after ms | after / before, per round | median ratio |"
)
for seq in (int(s) for s in args.seqs.split(",")):
    qkv = random_qkv((B, H, seq, D), dtype)
    table = []
    for _group, label, pass_, fns in cases(seq):
        exes = {v: compiled(fn, qkv) for v, fn in fns.items()}
        table.append((label, pass_, exes, {v: [] for v in fns}))
    for round_ in range(args.rounds):
        order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
        for _, _, exes, times in table:
            for version in order:
                if not isinstance(exes[version], str):
                    times[version].append(sample_ms(exes[version], qkv))
    for label, pass_, exes, times in table:
        cells = []
        for version in ("before", "after"):
            ok = not isinstance(exes[version], str)
            cells.append(f"{statistics.median(times[version]):.3f}" if ok else exes[version])
        if all(times.values()):
            ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
            spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
            median = f"{statistics.median(ratios):.3f}"
        else:
            spread = median = "-"
        print(
            f"| {seq} | {label} | {pass_} | {cells[0]} | {cells[1]} | {spread} | {median} |",
            flush=True,
        )
