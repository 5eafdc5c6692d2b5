"""Train a character-level language model on the Python standard library's own source.

The text is on every machine without a download: a fixed list of modules from the
running interpreter's standard library, as ASCII characters. The last 10% is held out
for validation; the script reports validation loss and ends with a generated sample.

    python examples/train_charlm.py               # about a minute on a 2-core CPU
    python examples/train_charlm.py --activation sigmoid --steps 1000 --out runs/sig
"""

import argparse
import pathlib
import sys
import sysconfig

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

import eqx_xlstm as ex  # noqa: E402

# Settings: data and model.
STDLIB_MODULES = [
    "textwrap.py",
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "statistics.py",
]
VOCAB_SIZE = 128  # ASCII
CONTEXT_LENGTH = 128
EMBEDDING_DIM = 128
NUM_HEADS = 4
NUM_BLOCKS = 2
VALIDATION_WINDOWS = 64
SAMPLE_PROMPT = "def "
SAMPLE_LENGTH = 120

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
common.add_training_args(parser, steps=400, out="runs/charlm", batch_size=32, lr=2e-3)
parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
args = parser.parse_args()
common.check_args(args)

stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
text = "\n".join(
    (stdlib / name).read_text(encoding="utf-8")
    for name in STDLIB_MODULES
    if (stdlib / name).is_file()
)
data = np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).astype(np.int32)
split = int(0.9 * len(data))
train_data, val_data = jnp.asarray(data[:split]), jnp.asarray(data[split:])
print(
    f"text: {len(data):,} characters from {len(STDLIB_MODULES)} stdlib modules; "
    f"train {split:,}, validation {len(data) - split:,}"
)


def windows(source, starts):
    """(tokens, targets, weights) for windows of CONTEXT_LENGTH + 1 characters."""
    index = starts[:, None] + jnp.arange(CONTEXT_LENGTH + 1)[None, :]
    chunk = source[index]
    return chunk[:, :-1], chunk[:, 1:], jnp.ones(chunk[:, 1:].shape, jnp.float32)


@jax.jit
def make_batch(key, step):
    """The batch of a step: random windows of the training text."""
    limit = len(train_data) - CONTEXT_LENGTH - 1
    starts = jax.random.randint(jax.random.fold_in(key, step), (args.batch_size,), 0, limit)
    return windows(train_data, starts)


config = ex.ModelConfig(
    vocab_size=VOCAB_SIZE,
    context_length=CONTEXT_LENGTH,
    embedding_dim=EMBEDDING_DIM,
    num_heads=NUM_HEADS,
    num_blocks=NUM_BLOCKS,
    backend=args.backend,
    backend_config=ex.BACKENDS[args.backend].config_class(activation_function=args.activation),
)
run, model = common.train(
    args, config, make_batch, data_settings={"modules": STDLIB_MODULES, "chars": len(data)}
)

val_starts = jnp.linspace(0, len(val_data) - CONTEXT_LENGTH - 1, VALIDATION_WINDOWS).astype(int)
val_loss = float(
    jax.jit(lambda m, *b: common.masked_cross_entropy(jax.vmap(m)(b[0]), *b[1:]))(
        model, *windows(val_data, val_starts)
    )
)
print(f"validation loss: {val_loss:.4f} nats/char")


prompt = jnp.asarray(list(SAMPLE_PROMPT.encode()), jnp.int32)
generate = eqx.filter_jit(model.generate)  # decodes with the attention key/value cache
generated = generate(
    prompt,
    SAMPLE_LENGTH,
    jax.random.key(args.seed + 7),
    temperature=args.temperature,
    top_k=args.top_k,
)
sample_text = SAMPLE_PROMPT + bytes(np.asarray(generated, np.uint8)).decode(
    "ascii", errors="replace"
)
print("sample:\n" + sample_text)
common.print_final(step=run.step, loss=run.losses[-1], val_loss=val_loss, out=args.out)
