"""What a checkpoint costs: orbax-checkpoint with verification (this library) against
the single-file `eqx.tree_serialise_leaves` it replaced, measured in the same run.

For a language model and its AdamW state at three sizes: the time a training loop is
blocked by an asynchronous save (the CheckpointManager returns once the arrays are
copied off the devices; the files are written in the background), a complete save, and
a verified load; beside them the same tree written and read as one file by equinox.

    python benchmarks/checkpoint_cost.py [--repeats 5]
"""

import argparse
import pathlib
import shutil
import statistics
import tempfile
import time

import equinox as eqx
import jax
import optax
import orbax.checkpoint as ocp

import eqx_xlstm as ex
from eqx_xlstm.checkpoint import _checksum_strings

SIZES = {  # name: (embedding_dim, num_blocks)
    "MQAR example (width 64, 2 blocks)": (64, 2),
    "char LM example (width 128, 2 blocks)": (128, 2),
    "width 512, 8 blocks": (512, 8),
}


def state_of(width: int, blocks: int):
    config = ex.ModelConfig(
        vocab_size=128, context_length=128, embedding_dim=width, num_heads=4, num_blocks=blocks
    )
    model = ex.LanguageModel(config, key=jax.random.key(0))
    params, _ = eqx.partition(model, ex.trainable_filter(model))
    return params, optax.adamw(1e-3).init(params)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(tree, root: pathlib.Path, repeats: int) -> dict[str, float]:
    metadata = {"step": 1, "losses": [1.0] * 1000}
    manager = ocp.CheckpointManager(
        root / "managed", options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    step = iter(range(1, 10_000))
    blocked = []
    for _ in range(repeats):  # a save while none is in flight, as in a training loop
        start = time.perf_counter()
        manager.save(next(step), args=ex.checkpoint_args(tree, metadata))
        blocked.append(time.perf_counter() - start)
        manager.wait_until_finished()
    blocked = statistics.median(blocked)

    def complete():
        manager.save(next(step), args=ex.checkpoint_args(tree, metadata))
        manager.wait_until_finished()

    complete_save = median_time(complete, repeats)
    latest = root / "managed" / str(manager.latest_step())
    load = median_time(lambda: ex.load_checkpoint(latest, tree), repeats)
    manager.close()

    leaves = [x for x in jax.tree.leaves(tree) if eqx.is_array(x)]
    checksums = median_time(lambda: _checksum_strings(leaves), repeats)

    single = root / "single.eqx"
    eqx_save = median_time(lambda: eqx.tree_serialise_leaves(single, tree), repeats)
    eqx_load = median_time(lambda: eqx.tree_deserialise_leaves(single, tree), repeats)
    return dict(
        blocked=blocked,
        checksums=checksums,
        complete=complete_save,
        load=load,
        eqx_save=eqx_save,
        eqx_load=eqx_load,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; times in ms (median)")
    header = (
        "| tree | MB | async save, loop blocked | of which checksums | complete save "
        "| verified load "
        "| eqx file save | eqx file load | complete / eqx save | load / eqx load |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, (width, blocks) in SIZES.items():
        tree = state_of(width, blocks)
        megabytes = sum(x.nbytes for x in jax.tree.leaves(tree)) / 1e6
        root = pathlib.Path(tempfile.mkdtemp())
        try:
            t = measure(tree, root, args.repeats)
        finally:
            shutil.rmtree(root)
        ms = {key: value * 1e3 for key, value in t.items()}
        print(
            f"| {name} | {megabytes:.1f} | {ms['blocked']:.1f} | {ms['checksums']:.1f} "
            f"| {ms['complete']:.1f} "
            f"| {ms['load']:.1f} | {ms['eqx_save']:.1f} | {ms['eqx_load']:.1f} "
            f"| {t['complete'] / t['eqx_save']:.1f}x | {t['load'] / t['eqx_load']:.1f}x |"
        )


if __name__ == "__main__":
    main()
