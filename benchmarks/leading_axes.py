"""Attention sharded over a leading axis (batch or heads) on every visible device,
against one device on its share, in one run.

    python benchmarks/leading_axes.py --seq-len 8192 --rounds 5

Default dispatch, bf16, B = 2 x devices, NH=16, D=128, swish, causal. For each
activation: fwd+bwd (the gradient of a sum) on one device with its share of the batch
(B=2), then on all devices with the inputs sharded over batch and over heads. Each
sample times calls issued back to back (`timing.median_ms`), so the figure is the
devices' time per call, not the host's round trip; the three cases are interleaved
over `--rounds` rounds. "same program" says whether the per-device compiled program
of the sharded call has the same ops, dtypes and sizes as the one-device call.
"""

import argparse
import collections
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from timing import compiled_median_ms, print_table_header, random_qkv, sum_gradient

import eqx_xlstm as ex

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def gradient(activation):
    def output(q, k, v):
        return ex.attention(
            q, k, v, activation_function=activation, qk_pre_activation_function="swish"
        )

    return sum_gradient(output)


def op_census(compiled) -> collections.Counter:
    """(opcode, dtype, element count) of every instruction of the entry computation."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    census = collections.Counter()
    for dtype, dims, opcode in re.findall(r"= (\w+)\[([\d,]*)\]\S* ([\w-]+)\(", entry):
        size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        census[opcode, dtype, size] += 1
    return census


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--activations", nargs="+", default=["softmax", "sigmoid", "none"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample-ms", type=float, default=50.0)
    args = parser.parse_args()
    devices = jax.devices()
    n = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    shape = (2 * n, 16, args.seq_len, 128)
    full = random_qkv(shape, jnp.bfloat16)
    cases = {"one device, its share": [jax.device_put(x[:2], devices[0]) for x in full]}
    for name, spec in (("batch", PartitionSpec("x")), ("heads", PartitionSpec(None, "x"))):
        cases[name] = [jax.device_put(x, NamedSharding(mesh, spec)) for x in full]
    print(
        f"{n} x {devices[0].device_kind}, jax {jax.__version__}; bf16, B={shape[0]}, NH=16, "
        f"S={args.seq_len}, D=128, swish, causal; fwd+bwd ms, median of {args.rounds} rounds"
    )
    print_table_header(
        "| activation | one device, its share | batch-sharded | ratio | head-sharded | ratio "
        "| same program | collectives |"
    )
    for activation in args.activations:
        compiled = {
            name: jax.jit(gradient(activation)).lower(*xs).compile() for name, xs in cases.items()
        }
        censuses = {name: op_census(c) for name, c in compiled.items()}
        base = censuses["one device, its share"]
        same = "/".join("yes" if censuses[name] == base else "no" for name in ("batch", "heads"))
        found = sum(
            (
                censuses[name][key]
                for name in ("batch", "heads")
                for key in censuses[name]
                if key[0].removesuffix("-start") in COLLECTIVES
            ),
            0,
        )
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, xs in cases.items():
                times[name].append(
                    compiled_median_ms(compiled[name], *xs, repeats=3, sample_ms=args.sample_ms)
                )
        ms = {name: statistics.median(t) for name, t in times.items()}
        one = ms["one device, its share"]
        print(
            f"| {activation} | {one:.3f} | {ms['batch']:.3f} | {ms['batch'] / one:.3f} | "
            f"{ms['heads']:.3f} | {ms['heads'] / one:.3f} | {same} | {found} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
