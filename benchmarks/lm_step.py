"""A language-model training step on device meshes: tokens/s of one AdamW step with the
model placed by `ex.partition_specs`, for each mesh asked for, in one run.

    python benchmarks/lm_step.py --meshes data=1 data=2 model=2 data=1,model=2,seq=1
    python benchmarks/lm_step.py --seq 262144 --batch-per-data 1 --meshes seq=1 seq=2

Default model: width 1024, 8 blocks, 16 heads, S=4096, bf16 parameters' compute (the
issue's "big enough to matter"); `--small` for a CPU smoke run. Each mesh uses the first
`data * model * seq` devices; the batch is `--batch-per-data` sequences per data shard,
its positions split over `seq`. "scaling" is tokens/s over the first mesh's. Each step
is compiled first and its per-device memory read from XLA's analysis; a step that needs
more than a device holds is reported as not fitting instead of run.
"""

import argparse
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from timing import compiled_median_ms, print_table_header

import eqx_xlstm as ex

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "examples"))
from device_mesh import (  # noqa: E402
    AXES,
    batch_sharding,
    build_mesh,
    describe,
    like_params,
    parse_mesh,
    shardings_of,
)


def step_fn(static, optimizer, param_shardings, opt_shardings):
    def step(params, opt_state, buffers, inputs, targets):
        def loss_fn(params):
            model = eqx.combine(params, buffers, static)
            logits = jax.vmap(model)(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), targets
            ).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.filter_shard(eqx.apply_updates(params, updates), param_shardings)
        return params, eqx.filter_shard(opt_state, opt_shardings), loss

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="+", default=["data=1", "data=2", "model=2"])
    parser.add_argument("--small", action="store_true", help="a tiny model for a CPU")
    parser.add_argument("--batch-per-data", type=int, default=4)
    parser.add_argument("--activation", default="sigmoid")
    parser.add_argument("--no-fsdp", action="store_true")
    parser.add_argument("--seq", type=int, help="sequence length (default 4096; 128 small)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed samples (0: time one step, the first)"
    )
    args = parser.parse_args()
    width, blocks, heads, seq = (64, 2, 4, 128) if args.small else (1024, 8, 16, 4096)
    seq = args.seq or seq
    config = ex.ModelConfig(
        vocab_size=256,
        context_length=seq,
        embedding_dim=width,
        num_heads=heads,
        num_blocks=blocks,
        backend_config=ex.mLSTMBackendAttentionConfig(activation_function=args.activation),
    )
    model = ex.LanguageModel(config, key=jax.random.key(0))
    dtype = jnp.float32 if args.small else jnp.bfloat16
    model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
    params, static = eqx.partition(model, ex.trainable_filter(model))
    # Arrays that are not trained (RoPE tables) are arguments too, not constants
    # folded into the program (slow to compile at long S).
    buffers, static = eqx.partition(static, eqx.is_array)
    optimizer = optax.adamw(1e-4)
    devices = jax.devices()
    print(
        f"{devices[0].device_kind} x{len(devices)}, jax {jax.__version__}; width {width}, "
        f"{blocks} blocks, {heads} heads, S={seq}, {np.dtype(dtype).name}, "
        f"{args.activation}, FSDP {'off' if args.no_fsdp else 'on'}; one AdamW step"
    )
    capacity = device_memory(devices[0])
    print_table_header(
        "| mesh | devices | batch | GiB per device | step ms | tokens/s | per device | scaling |"
    )
    first = None
    for text in args.meshes:
        sizes = parse_mesh(text)
        count = int(np.prod([sizes[a] for a in AXES]))
        if count > len(devices):
            print(f"| {describe(sizes)} | {count} | - | skipped: {len(devices)} visible | | | |")
            continue
        mesh = build_mesh(sizes)
        param_shardings = shardings_of(params, mesh, fsdp=not args.no_fsdp)
        placed = eqx.filter_shard(params, param_shardings)
        opt_state = optimizer.init(placed)
        opt_shardings = like_params(opt_state, param_shardings, mesh)
        opt_state = eqx.filter_shard(opt_state, opt_shardings)
        batch = args.batch_per_data * sizes["data"]
        tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, 256)
        inputs, targets = (
            jax.device_put(x, batch_sharding(mesh)) for x in (tokens[:, :-1], tokens[:, 1:])
        )
        step = step_fn(static, optimizer, param_shardings, opt_shardings)
        replicated = NamedSharding(mesh, PartitionSpec())
        state = (placed, opt_state, jax.device_put(buffers, replicated), inputs, targets)
        start = time.perf_counter()
        compiled = jax.jit(step).lower(*state).compile()
        need = compiled_bytes(compiled)
        print(
            f"compiled {describe(sizes)} in {time.perf_counter() - start:.0f} s, "
            f"{need / 2**30:.2f} GiB per device",
            flush=True,
        )
        row = f"| {describe(sizes)} | {count} | {batch} | {need / 2**30:.2f} |"
        if capacity is not None and need > capacity:
            print(f"{row} does not fit ({capacity / 2**30:.0f} GiB) | | | |", flush=True)
            continue
        try:
            if args.repeats:
                ms = compiled_median_ms(compiled, *state, repeats=args.repeats)
            else:  # one step, the first after compiling
                start = time.perf_counter()
                jax.block_until_ready(compiled(*state))
                ms = (time.perf_counter() - start) * 1e3
        except jax.errors.JaxRuntimeError as error:  # XLA's estimate was short
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            print(f"{row} out of memory when run | | | |", flush=True)
            continue
        rate = batch * seq / (ms / 1e3)
        first = first or rate
        print(
            f"{row} {ms:.1f} | {rate:,.0f} | {rate / count:,.0f} | {rate / first:.2f} |",
            flush=True,
        )


def device_memory(device) -> int | None:
    """Bytes a device can hold (None where the backend does not say, e.g. the CPU)."""
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def compiled_bytes(compiled) -> int:
    """Peak bytes per device of a compiled step by XLA's analysis: arguments, outputs
    and temporaries."""
    mem = compiled.memory_analysis()
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


if __name__ == "__main__":
    main()
