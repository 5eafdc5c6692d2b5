"""Does the sigmoid stability kit help, and how do the three activations compare?
Trains small language models on harder MQAR settings and on the char LM, each
activation with and without the kit (QK-norm, LayerScale, hybrid norm), over several
seeds, and writes a table and a plot.

    python benchmarks/quality_study.py --quick        # under 10 minutes on 2 CPU cores
    python benchmarks/quality_study.py                # the full study (a GPU)

Writes `docs/quality.md` (or `--out`) and a loss-curve plot beside it. MQAR (Arora et
al. 2023, "Zoology"): accuracy at the queried keys of held-out sequences; the char LM:
validation loss in nats/char on packed stdlib documents.
"""

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import train_charlm  # noqa: E402
import train_mqar  # noqa: E402
import training  # noqa: E402

import eqx_xlstm as ex  # noqa: E402

ACTIVATIONS = ("softmax", "sigmoid", "none")
KIT = dict(qk_norm=True, layer_scale=0.1, post_norm=True)
"""The kit for every activation; sigmoid also learns its bias per head."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One task's size and schedule."""

    steps: int
    batch: int
    lr: float
    width: int
    seq_len: int
    num_pairs: int = 0  # MQAR only
    vocab: int = 128


QUICK = {  # the MQAR example's task, trained briefly: where the activations part ways
    "mqar": Setting(steps=600, batch=32, lr=3e-3, width=64, seq_len=64, num_pairs=8, vocab=64),
    "charlm": Setting(steps=100, batch=16, lr=3e-3, width=64, seq_len=128),
}
FULL = {
    "mqar": Setting(steps=3000, batch=64, lr=1e-3, width=128, seq_len=256, num_pairs=32, vocab=256),
    "charlm": Setting(steps=1500, batch=32, lr=2e-3, width=128, seq_len=256),
}


def model_config(setting: Setting, activation: str, kit: bool) -> ex.ModelConfig:
    backend = ex.mLSTMBackendAttentionConfig(activation_function=activation)
    return ex.ModelConfig(
        vocab_size=setting.vocab,
        context_length=setting.seq_len,
        embedding_dim=setting.width,
        num_heads=4,
        num_blocks=2,
        backend_config=backend,
        **(KIT if kit else {}),
        learned_sigmoid_bias=kit and activation == "sigmoid",
    )


STEPS_PER_CALL = 100
"""Training steps per jitted call (`jax.lax.scan`): one dispatch, not one per step."""


def fit(config: ex.ModelConfig, setting: Setting, seeds: int, batches, evaluate):
    """Train one model per seed with AdamW, all seeds at once (`eqx.filter_vmap`: small
    models leave a GPU mostly idle, so seeds run side by side); for each seed, (the
    loss of every step, the final metric). Seed s draws its own initial weights and
    batches."""
    optimizer = training.make_optimizer(setting.lr, setting.steps)

    def init(key):
        model = ex.LanguageModel(config, key=key)
        return model, optimizer.init(eqx.filter(model, ex.trainable_filter(model)))

    def train_steps(model, opt_state, keys):
        params, static = eqx.partition(model, ex.trainable_filter(model))

        def step(carry, key):
            params, opt_state = carry
            tokens, targets, weights, *ids = batches(key)

            def loss_fn(params):
                logits = jax.vmap(eqx.combine(params, static))(tokens, *ids)
                return training.masked_cross_entropy(logits, targets, weights)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
        return eqx.combine(params, static), opt_state, losses

    models, opt_states = eqx.filter_vmap(init)(jax.vmap(jax.random.key)(jnp.arange(seeds)))
    train = eqx.filter_jit(eqx.filter_vmap(train_steps))
    step_keys = jnp.stack(
        [jax.random.split(jax.random.key(seed + 1000), setting.steps) for seed in range(seeds)]
    )
    losses = []
    for start in range(0, setting.steps, STEPS_PER_CALL):
        keys = step_keys[:, start : start + STEPS_PER_CALL]
        models, opt_states, chunk = train(models, opt_states, keys)
        losses.append(np.asarray(chunk))
    losses = np.concatenate(losses, axis=1)
    seed_model = lambda s: jax.tree.map(lambda x: x[s] if eqx.is_array(x) else x, models)
    return [(list(losses[s]), float(evaluate(seed_model(s)))) for s in range(seeds)]


def mqar_task(setting: Setting):
    config = train_mqar.MQARConfig(
        num_pairs=setting.num_pairs, vocab_size=setting.vocab, seq_len=setting.seq_len
    )
    batches = lambda key: train_mqar.mqar_batch(config, key, setting.batch)
    evaluate = lambda model: train_mqar.held_out_accuracy(config, model)
    return batches, evaluate


def charlm_task(setting: Setting):
    data, documents = train_charlm.load_text(train_charlm.STDLIB_MODULES)
    split = int(0.9 * len(data))
    source, docs = jnp.asarray(data), jnp.asarray(documents)
    length = setting.seq_len

    def batches(key):
        starts = jax.random.randint(key, (setting.batch,), 0, split - length - 1)
        return train_charlm.windows(source, docs, starts, length)

    val_starts = jnp.linspace(split, len(data) - length - 1, 64).astype(int)
    val_batch = train_charlm.windows(source, docs, val_starts, length)

    @jax.jit
    def evaluate(model):
        tokens, targets, weights, ids = val_batch
        return training.masked_cross_entropy(jax.vmap(model)(tokens, ids), targets, weights)

    return batches, evaluate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings for a CPU")
    parser.add_argument("--seeds", type=int, default=None, help="default 2 quick, 3 full")
    parser.add_argument("--tasks", nargs="+", default=["mqar", "charlm"])
    parser.add_argument("--out", default="docs/quality.md")
    parser.add_argument("--steps", type=int, help="override every task's steps (a smoke run)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.steps:
        settings = {k: dataclasses.replace(v, steps=args.steps) for k, v in settings.items()}
    seeds = args.seeds or (2 if args.quick else 3)
    device = jax.devices()[0]
    started = time.perf_counter()
    results = {}  # (task, activation, kit) -> list of (losses, metric)
    for task in args.tasks:
        setting = settings[task]
        batches, evaluate = (mqar_task if task == "mqar" else charlm_task)(setting)
        for activation in ACTIVATIONS:
            for kit in (False, True):
                config = model_config(setting, activation, kit)
                if task == "charlm":
                    config = dataclasses.replace(config, vocab_size=train_charlm.VOCAB_SIZE)
                runs = fit(config, setting, seeds, batches, evaluate)
                results[task, activation, kit] = runs
                metrics = ", ".join(f"{m:.4f}" for _, m in runs)
                print(f"{task} {activation} kit={kit}: {metrics}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    write_report(args, settings, seeds, results, device, minutes)


def write_report(args, settings, seeds, results, device, minutes):
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_name(out.stem + ("_quick" if args.quick else "") + "_losses.png")
    tasks = sorted({task for task, *_ in results})
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, activation, kit), runs in results.items():
            if t != task:
                continue
            curve = np.mean([losses for losses, _ in runs], axis=0)
            smooth = np.convolve(curve, np.ones(10) / 10, mode="valid")
            ax.plot(smooth, label=f"{activation}{' + kit' if kit else ''}", ls="-" if kit else "--")
        ax.set(title=task, xlabel="step", ylabel="training loss (10-step mean)", yscale="log")
        ax.legend()
    figure.tight_layout()
    figure.savefig(plot, dpi=100)
    metric = {"mqar": "held-out accuracy", "charlm": "validation loss (nats/char)"}
    lines = [
        f"# Quality: activations and the stability kit ({'quick' if args.quick else 'full'} mode)",
        "",
        f"`python benchmarks/quality_study.py{' --quick' if args.quick else ''}` on "
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}; "
        f"{seeds} seeds; {minutes:.1f} minutes. Kit: "
        + ", ".join(f"`{k}={v}`" for k, v in KIT.items())
        + ", and `learned_sigmoid_bias=True` for sigmoid. Model: 2 blocks, 4 heads.",
        "",
    ]
    for task in tasks:
        s = settings[task]
        lines += [
            f"## {task}: {metric[task]}",
            "",
            f"{dataclasses.asdict(s)}",
            "",
            "| activation | without kit: mean (min-max) | with kit: mean (min-max) |",
            "|---|---|---|",
        ]
        for activation in ACTIVATIONS:
            cells = []
            for kit in (False, True):
                values = [m for _, m in results[task, activation, kit]]
                cells.append(f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
            lines.append(f"| {activation} | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines.append(f"![training loss]({plot.name})")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main()
