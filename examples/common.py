"""What the example training scripts share: arguments, sharding, the training loop,
checkpoints, the loss curve and the final line. Each script brings its data and model."""

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_xlstm as ex

CHECKPOINT = "checkpoint.eqx"


def add_training_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """The options both scripts take; `defaults` sets each script's own values."""
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults["steps"],
        help="total optimizer steps (the schedule spans these)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=defaults["out"], help="folder for the checkpoint, loss curve and log"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --out"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="end after step N as an interruption would (checkpoint saved)",
    )
    parser.add_argument(
        "--activation", default="softmax", help="attention activation: softmax, sigmoid or none"
    )
    parser.add_argument("--backend", default="attention", help="mLSTM backend name")
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="shard the batch over this many devices (jax.sharding)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args) -> None:
    """Input errors, found before anything is written."""
    if args.backend not in ex.BACKENDS:
        fail(f"unknown --backend {args.backend!r}; valid: {', '.join(sorted(ex.BACKENDS))}")
    if args.activation not in ("softmax", "sigmoid", "none"):
        fail(f"unknown --activation {args.activation!r}; valid: softmax, sigmoid, none")
    if args.steps < 1:
        fail(f"--steps must be >= 1, got {args.steps}")
    if args.devices < 1 or args.devices > len(jax.devices()):
        fail(
            f"--devices {args.devices} but {len(jax.devices())} device(s) are visible; on a "
            "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N first"
        )
    if args.batch_size % args.devices:
        fail(f"--batch-size {args.batch_size} is not divisible by --devices {args.devices}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        fail(f"--stop-after must be between 1 and --steps ({args.steps})")
    checkpoint = pathlib.Path(args.out) / CHECKPOINT
    if args.resume and not checkpoint.is_file():
        fail(f"--resume but there is no checkpoint at {checkpoint}")
    if not args.resume and not args.overwrite and checkpoint.is_file():
        fail(f"{checkpoint} exists; pass --resume to continue it or --overwrite to replace it")


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW under a 10% linear warmup, then cosine decay to lr / 10 at `steps`."""
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=lr / 10
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.1)
    )


def masked_cross_entropy(logits, targets, weights):
    """Mean cross-entropy over positions with weight 1; logits (B, L, V)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass
class Run:
    """A training run's state between steps."""

    params: object
    static: object
    opt_state: object
    key: object  # the run's base PRNG key (as raw key data); batches fold in the step
    step: int
    losses: list


def train(args, config: ex.ModelConfig, make_batch: Callable, *, data_settings: dict):
    """Build or resume the model, train to `--steps` (or `--stop-after`), checkpoint.

    `make_batch(key, step)` returns `(tokens, targets, weights)`, each `(batch, length)`,
    the same for the same key and step; the key is the run's, kept in the checkpoint, so
    a resumed run sees the data it would have seen.
    `data_settings` joins the model config in identifying the run: a checkpoint from
    other settings is refused. Returns the `Run` and the model.
    """
    out = pathlib.Path(args.out)
    checkpoint = out / CHECKPOINT
    key = jax.random.key(args.seed)
    model = ex.LanguageModel(config, key=key)
    params, static = eqx.partition(model, ex.trainable_filter(model))
    optimizer = make_optimizer(args.lr, args.steps)
    run = Run(params, static, optimizer.init(params), jax.random.key_data(key), 0, [])
    identity = {
        "config": repr(config),
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "data": data_settings,
    }
    if args.resume:
        stored = ex.read_checkpoint_metadata(checkpoint)
        if stored["identity"] != identity:
            diff = [k for k in identity if stored["identity"].get(k) != identity[k]]
            fail(
                f"the checkpoint in {out} is from a different run ({', '.join(diff)} differ); "
                "use the same settings or another --out"
            )
        (run.params, run.opt_state, run.key), stored = ex.load_checkpoint(
            checkpoint, (run.params, run.opt_state, run.key)
        )
        run.step, run.losses = stored["step"], stored["losses"]

    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    by_batch = NamedSharding(mesh, PartitionSpec("data"))
    run.params, run.opt_state = jax.device_put((run.params, run.opt_state), replicated)

    @eqx.filter_jit
    def train_step(params, opt_state, tokens, targets, weights):
        def loss_fn(params):
            logits = jax.vmap(eqx.combine(params, static))(tokens)
            return masked_cross_entropy(logits, targets, weights)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    last = args.stop_after or args.steps
    data_key = jax.random.fold_in(jax.random.wrap_key_data(run.key), 1)
    progress = _progress(run.step, last, args.no_progress)
    start, tokens_seen = time.perf_counter(), 0
    while run.step < last:
        batch = jax.device_put(make_batch(data_key, run.step), by_batch)
        run.params, run.opt_state, loss = train_step(run.params, run.opt_state, *batch)
        run.step += 1
        run.losses.append(float(loss))
        tokens_seen += batch[0].size
        rate = tokens_seen / (time.perf_counter() - start)
        progress.update(1)
        progress.set_postfix(loss=f"{run.losses[-1]:.4f}", tok_s=f"{rate:,.0f}")
    progress.close()
    ex.save_checkpoint(
        checkpoint,
        (run.params, run.opt_state, run.key),
        {"identity": identity, "step": run.step, "losses": run.losses},
    )
    plot_losses(out / "loss.png", run.losses, title=out.name)
    return run, eqx.combine(run.params, static)


def _progress(initial: int, total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable)


def plot_losses(path: pathlib.Path, losses: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="training loss", title=title, yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_final(**values) -> None:
    print("final: " + json.dumps(values, sort_keys=True))
