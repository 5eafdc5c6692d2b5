"""Train a small attention model on Multi-Query Associative Recall (MQAR).

MQAR (Arora et al. 2023, "Zoology"; used in the xLSTM paper): a sequence first lists
key-value pairs `k1 v1 k2 v2 ...`, then asks keys again `q1 a1 q2 a2 ...`; at each
queried key the model must output the value stored with it. Keys come from the lower
half of the vocabulary, values from the upper half; data is generated on the fly from
the seed, and accuracy is measured on held-out sequences.

    python examples/train_mqar.py                 # about 2 minutes on a 2-core CPU
    python examples/train_mqar.py --steps 200 --stop-after 100 --out runs/a
    python examples/train_mqar.py --steps 200 --resume --out runs/a
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

import eqx_xlstm as ex  # noqa: E402

# Settings: the task and the model.
VOCAB_SIZE = 64
NUM_PAIRS = 8
SEQ_LEN = 64  # 2 * NUM_PAIRS tokens of pairs, the rest queries and answers
EMBEDDING_DIM = 64
NUM_HEADS = 4
NUM_BLOCKS = 2
EVAL_SEQUENCES = 1024

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
common.add_training_args(parser, steps=2000, out="runs/mqar", batch_size=64, lr=1e-3)
parser.add_argument("--num-pairs", type=int, default=NUM_PAIRS)
parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
args = parser.parse_args()
common.check_args(args)
if args.vocab_size < 4 or args.vocab_size // 2 - 1 < args.num_pairs:
    common.fail(
        f"--vocab-size {args.vocab_size} leaves too few keys for --num-pairs {args.num_pairs}"
    )
if args.seq_len < 2 * args.num_pairs + 2 or args.seq_len % 2:
    common.fail("--seq-len must be even and leave room for at least one query")


def mqar_batch(key, batch_size):
    """(tokens, targets, weights), each (batch, seq_len); weight 1 at queried keys."""
    n, half = args.num_pairs, args.vocab_size // 2
    n_queries = (args.seq_len - 2 * n) // 2
    k_keys, k_vals, k_query = jax.random.split(key, 3)
    # n distinct keys from 1 .. half-1 (0 is never used), values from the upper half.
    keys = jax.vmap(lambda k: jax.random.permutation(k, jnp.arange(1, half))[:n])(
        jax.random.split(k_keys, batch_size)
    )
    values = jax.random.randint(k_vals, (batch_size, n), half, args.vocab_size)
    which = jax.random.randint(k_query, (batch_size, n_queries), 0, n)
    queries = jnp.take_along_axis(keys, which, axis=1)
    answers = jnp.take_along_axis(values, which, axis=1)
    interleave = lambda a, b: jnp.stack([a, b], axis=-1).reshape(batch_size, -1)
    tokens = jnp.concatenate([interleave(keys, values), interleave(queries, answers)], 1)
    targets = jnp.roll(tokens, -1, axis=1)  # next token
    is_query = jnp.arange(args.seq_len) >= 2 * n
    weights = (is_query & (jnp.arange(args.seq_len) % 2 == 0)).astype(jnp.float32)
    return tokens, targets, jnp.broadcast_to(weights, tokens.shape)


make_batch = jax.jit(  # the batch of a step: a function of the run's key and the step
    lambda key, step: mqar_batch(jax.random.fold_in(key, step), args.batch_size)
)

config = ex.ModelConfig(
    vocab_size=args.vocab_size,
    context_length=args.seq_len,
    embedding_dim=EMBEDDING_DIM,
    num_heads=NUM_HEADS,
    num_blocks=NUM_BLOCKS,
    backend=args.backend,
    backend_config=ex.BACKENDS[args.backend].config_class(activation_function=args.activation),
)
run, model = common.train(args, config, make_batch, data_settings={"num_pairs": args.num_pairs})


@jax.jit
def accuracy(model, tokens, targets, weights):
    predictions = jnp.argmax(jax.vmap(model)(tokens), axis=-1)
    return jnp.sum((predictions == targets) * weights) / jnp.sum(weights)


held_out = mqar_batch(jax.random.fold_in(jax.random.key(args.seed), 2), EVAL_SEQUENCES)
acc = float(accuracy(model, *held_out))
print(f"held-out accuracy on {EVAL_SEQUENCES} sequences: {acc:.4f}")
common.print_final(step=run.step, loss=run.losses[-1], accuracy=acc, out=args.out)
