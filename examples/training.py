"""What the example training scripts share: their training settings, the training loop
with sharding and checkpoints, the loss curve and the final line. Each script brings
its data and model, and runs as `main(config)` over a frozen dataclass config."""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable

import device_mesh
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from run_folder import FolderError, RunFolder
from stop_signals import StopSignals

import eqx_xlstm as ex


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: the settings both scripts share."""

    steps: int
    """Total optimizer steps (the learning-rate schedule spans these)."""
    out: str
    """Folder for the checkpoints, the loss curve and the lock."""
    batch_size: int
    lr: float
    seed: int = 0
    resume: bool = False
    """Continue from the newest good checkpoint in `out`."""
    overwrite: bool = False
    """Start afresh even if `out` holds checkpoints (deleting them)."""
    stop_after: int | None = None
    """End after this step with a checkpoint and the final line (to try resuming)."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and at the end or on SIGINT/SIGTERM)."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    activation: str = "softmax"
    backend: str = "attention"
    devices: int = 1
    """Shard the batch over this many devices (jax.sharding): `mesh` "data=N"."""
    mesh: str | None = None
    """The device mesh "data=D,model=M,seq=S" (sizes multiplying to at most the visible
    devices): the batch and the parameters (FSDP-style) over `data`, the heads over
    `model`, the positions over `seq`. Part of the run's identity."""
    progress: bool = True


class UsageError(Exception):
    """Bad settings, found before anything is written."""


class TrainingStopped(Exception):  # noqa: N818 (a signal is not an error)
    """Training ended early: a signal (checkpoint saved) or a non-finite loss (the last
    good checkpoint kept). `exit_code` is the process's exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Command-line flags for every `TrainConfig` field, defaulting to `defaults`."""
    add = parser.add_argument
    add("--steps", type=int, default=defaults.steps, help="total optimizer steps")
    add("--seed", type=int, default=defaults.seed, help="0 <= seed < 2**32")
    add("--out", default=defaults.out, help="folder for the checkpoints, loss curve and lock")
    add("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    add("--overwrite", action="store_true", help="start afresh, deleting --out's checkpoints")
    add(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="end after step N with a checkpoint and the final line (to try --resume)",
    )
    add(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        metavar="N",
        help="save every N steps (and at the end, and on SIGINT/SIGTERM)",
    )
    add(
        "--keep", type=int, default=defaults.keep, metavar="N", help="keep the newest N checkpoints"
    )
    add("--activation", default=defaults.activation, help="softmax, sigmoid or none")
    add("--backend", default=defaults.backend, help="mLSTM backend name")
    add("--devices", type=int, default=defaults.devices, help="shard the batch over N devices")
    add(
        "--mesh",
        default=defaults.mesh,
        metavar="data=D,model=M,seq=S",
        help="data, tensor (heads) and sequence parallelism (instead of --devices)",
    )
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr, help="peak learning rate (finite, > 0)")
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
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        activation=args.activation,
        backend=args.backend,
        devices=args.devices,
        mesh=args.mesh,
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
    for flag, value, low in (
        ("--steps", config.steps, 1),
        ("--batch-size", config.batch_size, 1),
        ("--checkpoint-every", config.checkpoint_every, 1),
        ("--keep", config.keep, 1),
        ("--seed", config.seed, 0),
    ):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if config.seed >= 2**32:
        raise UsageError(f"--seed must be < 2**32, got {config.seed}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {config.lr}")
    sizes = mesh_sizes(config)
    flag = f"--mesh {config.mesh}" if config.mesh else f"--devices {config.devices}"
    count = sizes["data"] * sizes["model"] * sizes["seq"]
    if count > len(jax.devices()):
        raise UsageError(
            f"{flag} needs {count} devices but {len(jax.devices())} are visible; on a "
            "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N first"
        )
    if config.batch_size % sizes["data"]:
        what = f"the data axis ({sizes['data']})" if config.mesh else flag
        raise UsageError(f"--batch-size {config.batch_size} is not divisible by {what}")
    if config.stop_after is not None and not 1 <= config.stop_after <= config.steps:
        raise UsageError(f"--stop-after must be between 1 and --steps ({config.steps})")
    if config.resume and config.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    folder = RunFolder(config.out)
    problem = folder.problem()
    if problem:
        raise UsageError(problem)
    if config.resume and not folder.steps():
        raise UsageError(f"--resume but there is no checkpoint in {folder.checkpoints}")
    if not config.resume and not config.overwrite and folder.steps():
        raise UsageError(
            f"{folder.checkpoints} holds checkpoints; pass --resume to continue them or "
            "--overwrite to replace them"
        )


def mesh_sizes(config: TrainConfig) -> dict[str, int]:
    """The mesh's axis sizes from `--mesh`, or `--devices` as data=N; a UsageError for
    a malformed one."""
    if config.mesh is None:
        if config.devices < 1:
            raise UsageError(f"--devices must be >= 1, got {config.devices}")
        return {"data": config.devices, "model": 1, "seq": 1}
    if config.devices != 1:
        raise UsageError("--devices N is --mesh data=N: pass one of them")
    try:
        return device_mesh.parse_mesh(config.mesh)
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_main(main: Callable, config) -> None:
    """`main(config)` as a command: a UsageError or FolderError ends it with exit status
    2 and one line; a stopped run with its own status and one line."""
    try:
        main(config)
    except (UsageError, FolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C in it
        print("\nstopped by SIGINT without saving; --out keeps its checkpoints", file=sys.stderr)
        raise SystemExit(130) from None


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

    def saved(self):
        """What a checkpoint holds besides its header."""
        return self.params, self.opt_state, self.key


def _fresh(config: TrainConfig, model_config: ex.ModelConfig):
    """A new run's model split into (params, static), its optimizer, and its Run."""
    key = jax.random.key(config.seed)
    model = ex.LanguageModel(model_config, key=key)
    params, static = eqx.partition(model, ex.trainable_filter(model))
    optimizer = make_optimizer(config.lr, config.steps)
    run = Run(params, static, optimizer.init(params), jax.random.key_data(key), 0, [])
    return optimizer, run


def _identity(config: TrainConfig, model_config: ex.ModelConfig, data_settings: dict) -> dict:
    """What a checkpoint must match to be resumed; the model config as data. The device
    mesh is part of it: sharding changes the order of floating-point sums."""
    return {
        "model_config": model_config.to_dict(),
        "steps": config.steps,
        "lr": config.lr,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "mesh": device_mesh.describe(mesh_sizes(config)),
        "data": data_settings,
    }


def _same_run(out: pathlib.Path, identity: dict) -> Callable[[dict], None]:
    def accept(metadata: dict) -> None:
        stored = metadata.get("identity", {})
        diff = [k for k in identity if stored.get(k) != identity[k]]
        if diff:
            raise UsageError(
                f"the checkpoints in {out} are from a different run ({', '.join(diff)} "
                "differ); use the same settings or another --out"
            )

    return accept


@eqx.filter_jit
def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train(
    config: TrainConfig,
    model_config: ex.ModelConfig,
    make_batch: Callable,
    *,
    data_settings: dict,
):
    """Build or resume the model, train to `steps` (or `stop_after`) with periodic
    checkpoints; returns the `Run` and the model.

    `make_batch(key, step)` returns `(tokens, targets, weights)`, each `(batch, length)`,
    and optionally the tokens' `segment_ids` (packed documents) last, the same for the
    same key and step; the key is the run's, kept in the checkpoint, so
    a resumed run sees the data it would have seen and ends exactly as an uninterrupted
    one. `data_settings` joins the model config in identifying the run: a checkpoint
    from other settings is refused. SIGINT/SIGTERM save at the next step boundary and
    raise `TrainingStopped`; so does a non-finite loss (without saving).
    """
    folder = RunFolder(config.out)
    identity = _identity(config, model_config, data_settings)
    optimizer, run = _fresh(config, model_config)
    with folder:
        if folder.stale_lock:
            print(
                f"note: taking over {folder.path / 'run.lock'}, left by a run that ended "
                f"without releasing it ({folder.stale_lock})",
                file=sys.stderr,
            )
        if config.overwrite:
            folder.clear()
        if config.resume:
            saved, stored = folder.restore(run.saved(), _same_run(folder.path, identity))
            run.params, run.opt_state, run.key = saved
            run.step, run.losses = stored["step"], stored["losses"]
        elif folder.steps():  # written since `check`
            raise UsageError(
                f"{folder.checkpoints} holds checkpoints; pass --resume or --overwrite"
            )
        _loop(config, optimizer, run, make_batch, folder, identity)
    plot_losses(folder.path / "loss.png", run.losses, title=folder.path.name)
    return run, eqx.combine(run.params, run.static)


def _loop(config, optimizer, run: Run, make_batch, folder: RunFolder, identity: dict) -> None:
    mesh = device_mesh.build_mesh(mesh_sizes(config))
    devices = mesh.devices.size
    param_shardings = device_mesh.shardings_of(run.params, mesh)
    opt_shardings = device_mesh.like_params(run.opt_state, param_shardings, mesh)
    by_batch = device_mesh.batch_sharding(mesh)
    run.params = eqx.filter_shard(run.params, param_shardings)
    run.opt_state = eqx.filter_shard(run.opt_state, opt_shardings)
    static = run.static

    @eqx.filter_jit
    def train_step(params, opt_state, tokens, targets, weights, *segment_ids):
        def loss_fn(params):
            logits = jax.vmap(eqx.combine(params, static))(tokens, *segment_ids)
            return masked_cross_entropy(logits, targets, weights)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.filter_shard(eqx.apply_updates(params, updates), param_shardings)
        return params, eqx.filter_shard(opt_state, opt_shardings), loss

    # The newest checkpoint of this run: the one resumed from, then each one saved.
    saved_step, saved_path = None, None
    if config.resume:
        saved_step, saved_path = run.step, folder.checkpoints / str(run.step)

    def save() -> None:
        nonlocal saved_step, saved_path
        if saved_step == run.step:
            return
        if not bool(_all_finite(run.params)):
            folder.wait()
            raise TrainingStopped(
                _diverged("the parameters became non-finite", saved_path, run.step), 1
            )
        metadata = {"identity": identity, "step": run.step, "losses": list(run.losses)}
        saved_step, saved_path = run.step, folder.save(run.step, run.saved(), metadata, config.keep)

    save()  # a fresh run's step 0, so that `--resume` works after a kill at any moment
    last = config.stop_after or config.steps
    data_key = jax.random.fold_in(jax.random.wrap_key_data(run.key), 1)
    progress = _progress(run.step, last, not config.progress)
    start, tokens_seen = time.perf_counter(), 0
    with StopSignals() as signals:
        while run.step < last and not signals.received:
            batch = jax.device_put(make_batch(data_key, run.step), by_batch)
            run.params, run.opt_state, loss = train_step(run.params, run.opt_state, *batch)
            loss = float(loss)
            if not math.isfinite(loss):
                progress.close()
                folder.wait()
                raise TrainingStopped(
                    _diverged(f"the loss became {loss}", saved_path, run.step + 1), 1
                )
            run.step += 1
            run.losses.append(loss)
            tokens_seen += batch[0].size
            rate = tokens_seen / (time.perf_counter() - start)
            progress.update(1)
            progress.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", tok_s_per_device=f"{rate / devices:,.0f}"
            )
            if run.step % config.checkpoint_every == 0 or run.step == last:
                save()
        progress.close()
        save()
        folder.wait()
    if signals.received:
        raise TrainingStopped(
            f"stopped by {signals.received.name} at step {run.step} of {config.steps}: "
            f"checkpoint saved in {saved_path}; continue with --resume",
            128 + signals.received.value,
        )


def _diverged(what: str, last_good, step: int) -> str:
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved"
    return f"error: {what} at step {step}; stopped without saving it; {kept} (try a lower --lr)"


def load_model(out: str | pathlib.Path) -> tuple[ex.LanguageModel, dict]:
    """The trained model of `out`'s newest good checkpoint, rebuilt from the checkpoint
    alone (its header holds the model config as data), and the header."""
    folder = RunFolder(out)
    for step in folder.steps():
        try:
            identity = ex.read_checkpoint_metadata(folder.checkpoints / str(step))["identity"]
            break
        except ex.CheckpointError:
            continue  # `restore` below names it
    else:
        raise FolderError(f"no usable checkpoint in {folder.checkpoints}")
    model_config = ex.ModelConfig.from_dict(identity["model_config"])
    settings = TrainConfig(
        steps=identity["steps"],
        out=str(out),
        batch_size=identity["batch_size"],
        lr=identity["lr"],
        seed=identity["seed"],
    )
    _, run = _fresh(settings, model_config)
    (params, _, _), header = folder.restore(run.saved(), lambda _: None, set_aside=False)
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
