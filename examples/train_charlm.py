"""Train a character-level language model on the Python standard library's own source.

The text is on every machine without a download: a fixed list of modules from the
running interpreter's standard library, as ASCII characters. The last 10% is held out
for validation; the script reports validation loss and ends with a generated sample.

The text is a sequence of documents, one per top-level definition (a line starting
with "def " or "class ", or a module's header), packed into the training windows: each
window position carries its document's id (`segment_ids`), so attention stays within
a document and RoPE positions restart at each, and a position whose target starts the
next document is not scored.

    python examples/train_charlm.py               # about a minute on a 2-core CPU
    python examples/train_charlm.py --activation sigmoid --steps 1000 --out runs/sig

From Python: `main(CharLMConfig(...))` returns the final values.
"""

import argparse
import dataclasses
import math
import pathlib
import sysconfig

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import training

import eqx_xlstm as ex

STDLIB_MODULES = (
    "textwrap.py",
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "statistics.py",
)
VOCAB_SIZE = 128  # ASCII


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
    """The data, the model, how to train it and how to sample from it."""

    train: training.TrainConfig = training.TrainConfig(
        steps=400, out="runs/charlm", batch_size=32, lr=2e-3, checkpoint_every=100
    )
    modules: tuple[str, ...] = STDLIB_MODULES
    context_length: int = 128
    embedding_dim: int = 128
    num_heads: int = 4
    num_blocks: int = 2
    validation_windows: int = 64
    sample_prompt: str = "def "
    sample_length: int = 120
    temperature: float = 0.8
    top_k: int | None = None

    def check(self) -> None:
        # Sampling settings first: they would otherwise fail only after training.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise training.UsageError(
                f"--temperature must be a finite number >= 0, got {self.temperature}"
            )
        if self.top_k is not None and not 1 <= self.top_k <= VOCAB_SIZE:
            raise training.UsageError(f"--top-k must be in 1..{VOCAB_SIZE}, got {self.top_k}")
        training.check(self.train)

    def model_config(self) -> ex.ModelConfig:
        return training.model_config(
            self.train,
            vocab_size=VOCAB_SIZE,
            context_length=self.context_length,
            embedding_dim=self.embedding_dim,
            num_heads=self.num_heads,
            num_blocks=self.num_blocks,
        )


def load_text(modules) -> tuple[np.ndarray, np.ndarray]:
    """The modules' source as int32 ASCII codes, and each character's document number
    (a new document at each top-level "def " or "class " line and each module)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    codes, documents, count = [], [], 0
    for name in modules:
        if not (stdlib / name).is_file():
            continue
        lines = (stdlib / name).read_text(encoding="utf-8").splitlines(keepends=True)
        for number, line in enumerate(lines):
            if number == 0 or line.startswith(("def ", "class ")):
                count += 1
            encoded = line.encode("ascii", errors="replace")
            codes.append(np.frombuffer(encoded, np.uint8))
            documents.append(np.full(len(encoded), count, np.int32))
    return np.concatenate(codes).astype(np.int32), np.concatenate(documents)


def windows(source, documents, starts, length):
    """(tokens, targets, weights, segment_ids) for windows of `length` + 1 characters;
    a target in another document than its token has weight 0."""
    index = starts[:, None] + jnp.arange(length + 1)[None, :]
    chunk, ids = source[index], documents[index]
    weights = (ids[:, 1:] == ids[:, :-1]).astype(jnp.float32)
    return chunk[:, :-1], chunk[:, 1:], weights, ids[:, :-1]


def main(config: CharLMConfig) -> dict:
    """Train, report validation loss and a sample, print and return the final values."""
    config.check()
    data, documents = load_text(config.modules)
    split = int(0.9 * len(data))
    train_data, val_data = jnp.asarray(data[:split]), jnp.asarray(data[split:])
    train_docs, val_docs = jnp.asarray(documents[:split]), jnp.asarray(documents[split:])
    print(
        f"text: {len(data):,} characters in {documents[-1]:,} documents from "
        f"{len(config.modules)} stdlib modules; train {split:,}, validation {len(data) - split:,}"
    )
    length, batch_size = config.context_length, config.train.batch_size

    @jax.jit
    def make_batch(key, step):
        """The batch of a step: random windows of the training text."""
        limit = len(train_data) - length - 1
        starts = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, limit)
        return windows(train_data, train_docs, starts, length)

    settings = {"modules": list(config.modules), "chars": len(data)}
    run, model = training.train(
        config.train, config.model_config(), make_batch, data_settings=settings
    )

    val_starts = jnp.linspace(0, len(val_data) - length - 1, config.validation_windows).astype(int)

    def loss(model, tokens, targets, weights, segment_ids):
        logits = jax.vmap(model)(tokens, segment_ids)
        return training.masked_cross_entropy(logits, targets, weights)

    val_batch = windows(val_data, val_docs, val_starts, length)
    val_loss = float(jax.jit(loss)(model, *val_batch))
    print(f"validation loss: {val_loss:.4f} nats/char")

    prompt = jnp.asarray(list(config.sample_prompt.encode()), jnp.int32)
    generate = eqx.filter_jit(model.generate)  # decodes with the attention key/value cache
    generated = generate(
        prompt,
        config.sample_length,
        jax.random.key(config.train.seed + 7),
        temperature=config.temperature,
        top_k=config.top_k,
    )
    sample = bytes(np.asarray(generated, np.uint8)).decode("ascii", errors="replace")
    print("sample:\n" + config.sample_prompt + sample)
    return training.print_final(
        step=run.step, loss=run.losses[-1], val_loss=val_loss, out=config.train.out
    )


def parse_args(argv=None) -> CharLMConfig:
    defaults = CharLMConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training.add_arguments(parser, defaults.train)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
    args = parser.parse_args(argv)
    return dataclasses.replace(
        defaults,
        train=training.from_arguments(args),
        temperature=args.temperature,
        top_k=args.top_k,
    )


if __name__ == "__main__":
    training.run_main(main, parse_args())
