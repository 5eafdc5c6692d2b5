"""What the example training scripts share: their training settings, the training loop
with sharding and checkpoints, the loss curve and the final line. Each script brings
its data and model, and runs as `main(config)` over a frozen dataclass config."""

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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: the settings both scripts share."""

    steps: int
    """Total optimizer steps (the learning-rate schedule spans these)."""
    out: str
    """Folder for the checkpoint, the loss curve and the log."""
    batch_size: int
    lr: float
    seed: int = 0
    resume: bool = False
    """Continue from the checkpoint in `out`."""
    overwrite: bool = False
    """Start afresh even if `out` holds a checkpoint."""
    stop_after: int | None = None
    """End after this step as an interruption would (checkpoint saved)."""
    activation: str = "softmax"
    backend: str = "attention"
    devices: int = 1
    """Shard the batch over this many devices (jax.sharding)."""
    progress: bool = True


class UsageError(Exception):
    """Bad settings, found before anything is written."""


def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Command-line flags for every `TrainConfig` field, defaulting to `defaults`."""
    add = parser.add_argument
    add("--steps", type=int, default=defaults.steps, help="total optimizer steps")
    add("--seed", type=int, default=defaults.seed)
    add("--out", default=defaults.out, help="folder for the checkpoint, loss curve and log")
    add("--resume", action="store_true", help="continue from the checkpoint in --out")
    add("--overwrite", action="store_true", help="start afresh even if --out has a checkpoint")
    add(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="end after step N as an interruption would (checkpoint saved)",
    )
    add("--activation", default=defaults.activation, help="softmax, sigmoid or none")
    add("--backend", default=defaults.backend, help="mLSTM backend name")
    add("--devices", type=int, default=defaults.devices, help="shard the batch over N devices")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--no-progress", action="store_true", help="hide the progress bar")


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` the flags of `add_arguments` describe."""
    return TrainConfig(
        steps=args.steps,
        out=args.out,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after=args.stop_after,
        activation=args.activation,
        backend=args.backend,
        devices=args.devices,
        progress=not args.no_progress,
    )


def check(config: TrainConfig) -> None:
    """A UsageError for settings that cannot run, before anything is written."""
    if config.backend not in ex.BACKENDS:
        valid = ", ".join(sorted(ex.BACKENDS))
        raise UsageError(f"unknown --backend {config.backend!r}; valid: {valid}")
    if config.activation not in ("softmax", "sigmoid", "none"):
        raise UsageError(
            f"unknown --activation {config.activation!r}; valid: softmax, sigmoid, none"
        )
    if config.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {config.steps}")
    if config.devices < 1 or config.devices > len(jax.devices()):
        raise UsageError(
            f"--devices {config.devices} but {len(jax.devices())} device(s) are visible; on a "
            "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N first"
        )
    if config.batch_size % config.devices:
        raise UsageError(
            f"--batch-size {config.batch_size} is not divisible by --devices {config.devices}"
        )
    if config.stop_after is not None and not 1 <= config.stop_after <= config.steps:
        raise UsageError(f"--stop-after must be between 1 and --steps ({config.steps})")
    checkpoint = pathlib.Path(config.out) / CHECKPOINT
    if config.resume and not checkpoint.is_file():
        raise UsageError(f"--resume but there is no checkpoint at {checkpoint}")
    if not config.resume and not config.overwrite and checkpoint.is_file():
        raise UsageError(
            f"{checkpoint} exists; pass --resume to continue it or --overwrite to replace it"
        )


def run_main(main: Callable, config) -> None:
    """`main(config)` as a command: a UsageError ends it with exit status 2 and one line."""
    try:
        main(config)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def model_config(config: TrainConfig, **sizes) -> ex.ModelConfig:
    """A `ModelConfig` of `sizes` (vocab_size, context_length, embedding_dim, ...) with
    the backend and activation that `config` names."""
    backend_config = ex.BACKENDS[config.backend].config_class(activation_function=config.activation)
    return ex.ModelConfig(**sizes, backend=config.backend, backend_config=backend_config)


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


def _fresh(config: TrainConfig, model_config: ex.ModelConfig):
    """A new run's model split into (params, static), its optimizer, and its Run."""
    key = jax.random.key(config.seed)
    model = ex.LanguageModel(model_config, key=key)
    params, static = eqx.partition(model, ex.trainable_filter(model))
    optimizer = make_optimizer(config.lr, config.steps)
    run = Run(params, static, optimizer.init(params), jax.random.key_data(key), 0, [])
    return optimizer, run


def _identity(config: TrainConfig, model_config: ex.ModelConfig, data_settings: dict) -> dict:
    """What a checkpoint must match to be resumed; the model config as data."""
    return {
        "model_config": model_config.to_dict(),
        "steps": config.steps,
        "lr": config.lr,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "data": data_settings,
    }


def train(
    config: TrainConfig,
    model_config: ex.ModelConfig,
    make_batch: Callable,
    *,
    data_settings: dict,
):
    """Build or resume the model, train to `steps` (or `stop_after`), checkpoint.

    `make_batch(key, step)` returns `(tokens, targets, weights)`, each `(batch, length)`,
    the same for the same key and step; the key is the run's, kept in the checkpoint, so
    a resumed run sees the data it would have seen. `data_settings` joins the model
    config in identifying the run: a checkpoint from other settings is refused. Returns
    the `Run` and the model.
    """
    out = pathlib.Path(config.out)
    checkpoint = out / CHECKPOINT
    optimizer, run = _fresh(config, model_config)
    identity = _identity(config, model_config, data_settings)
    if config.resume:
        stored = ex.read_checkpoint_metadata(checkpoint)
        if stored["identity"] != identity:
            diff = [k for k in identity if stored["identity"].get(k) != identity[k]]
            raise UsageError(
                f"the checkpoint in {out} is from a different run ({', '.join(diff)} differ); "
                "use the same settings or another --out"
            )
        (run.params, run.opt_state, run.key), stored = ex.load_checkpoint(
            checkpoint, (run.params, run.opt_state, run.key)
        )
        run.step, run.losses = stored["step"], stored["losses"]

    mesh = Mesh(np.array(jax.devices()[: config.devices]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    by_batch = NamedSharding(mesh, PartitionSpec("data"))
    run.params, run.opt_state = jax.device_put((run.params, run.opt_state), replicated)
    static = run.static

    @eqx.filter_jit
    def train_step(params, opt_state, tokens, targets, weights):
        def loss_fn(params):
            logits = jax.vmap(eqx.combine(params, static))(tokens)
            return masked_cross_entropy(logits, targets, weights)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    last = config.stop_after or config.steps
    data_key = jax.random.fold_in(jax.random.wrap_key_data(run.key), 1)
    progress = _progress(run.step, last, not config.progress)
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


def load_model(out: str | pathlib.Path) -> tuple[ex.LanguageModel, dict]:
    """The trained model in `out`'s checkpoint, rebuilt from the checkpoint alone (its
    header holds the model config as data), and the header."""
    checkpoint = pathlib.Path(out) / CHECKPOINT
    header = ex.read_checkpoint_metadata(checkpoint)
    identity = header["identity"]
    model_config = ex.ModelConfig.from_dict(identity["model_config"])
    settings = TrainConfig(
        steps=identity["steps"],
        out=str(out),
        batch_size=identity["batch_size"],
        lr=identity["lr"],
        seed=identity["seed"],
    )
    _, run = _fresh(settings, model_config)
    (params, _, _), header = ex.load_checkpoint(checkpoint, (run.params, run.opt_state, run.key))
    return eqx.combine(params, run.static), header


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


def print_final(**values) -> dict:
    print("final: " + json.dumps(values, sort_keys=True))
    return values
