"""'none' with packed documents: the run-time choice (`tiles_or_linear`, the default)
against the linear form and the Mosaic kernels it chooses between, over document
lengths, as a training step (Hopper GPU).

For each document count (`--counts`) at `--seq-len`: the mean key tiles a query block of the
kernels visits (what the choice reads), which side it picks, and each path's time in
`--rounds` interleaved rounds (median and range); "chosen / best" is the choice
against the faster of the two in the same round.

    python benchmarks/none_packed_choice.py
    python benchmarks/none_packed_choice.py --counts 1 4 8 --rounds 2
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
from packed_windows import add_case_arguments, compile_case
from timing import (
    add_round_arguments,
    compiled_median_ms,
    packed_ids,
    print_table_header,
    random_qkv,
)

from eqx_xlstm import maths
from eqx_xlstm.implementations import TilesOrLinear
from eqx_xlstm.implementations.tiles_or_linear import mean_tiles

PATHS = ("tiles_or_linear", "linear", "mosaic")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 6, 8, 16])
    add_round_arguments(parser)
    args = parser.parse_args()
    seq, dtype = args.seq_len, jnp.dtype(args.dtype)
    shape = (args.batch, args.heads, seq, args.head_dim)
    arrays = random_qkv(shape, dtype)
    limit = TilesOrLinear().tiles_per_block
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; 'none', {args.dtype}, "
        f"B={args.batch}, NH={args.heads}, S={seq}, D={args.head_dim}, swish + RoPE, a "
        f"training step; {args.rounds} interleaved rounds of {args.repeats} samples of "
        f"{args.sample_ms:g} ms; the kernels chosen up to {limit:g} tiles a block"
    )
    print_table_header(
        "| documents | tiles a block | chosen | tiles_or_linear ms | linear ms | mosaic ms "
        "| chosen / best |"
    )
    for documents in args.counts:
        ids = packed_ids(seq, documents)
        tiles = float(mean_tiles(maths.first_keys(seq, None, ids)))
        kwargs = dict(segment_ids=ids)
        cases = {p: compile_case("none", arrays, kwargs, p) for p in PATHS}
        default = compile_case("none", arrays, kwargs, "default")[2]
        times = {p: [] for p in PATHS}
        for r in range(args.rounds):
            for p in PATHS if r % 2 == 0 else PATHS[::-1]:
                compiled, xs, _ = cases[p]
                ms = compiled_median_ms(
                    compiled, *xs, repeats=args.repeats, sample_ms=args.sample_ms
                )
                times[p].append(ms)
        ratios = [d / min(a, b) for d, a, b in zip(*(times[p] for p in PATHS), strict=True)]
        cells = [f"{statistics.median(times[p]):.2f}" for p in PATHS]
        side = "mosaic" if tiles <= limit else "linear"
        print(
            f"| {documents} ({default} by default) | {tiles:.1f} | {side} "
            f"| {' | '.join(cells)} | {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
