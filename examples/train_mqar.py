"""Train a small attention model on Multi-Query Associative Recall (MQAR).

MQAR (Arora et al. 2023, "Zoology"; used in the xLSTM paper): a sequence first lists
key-value pairs `k1 v1 k2 v2 ...`, then asks keys again `q1 a1 q2 a2 ...`; at each
queried key the model must output the value stored with it. Keys come from the lower
half of the vocabulary, values from the upper half; data is generated on the fly from
the seed, and accuracy is measured on held-out sequences.

    python examples/train_mqar.py                 # about 2 minutes on a 2-core CPU
    python examples/train_mqar.py --steps 200 --stop-after 100 --out runs/a
    python examples/train_mqar.py --steps 200 --resume --out runs/a

From Python: `main(MQARConfig(...))` returns the final values.
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import training

import eqx_xlstm as ex


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """The task, the model and how to train it."""

    train: training.TrainConfig = training.TrainConfig(
        steps=2000, out="runs/mqar", batch_size=64, lr=1e-3
    )
    num_pairs: int = 8
    vocab_size: int = 64
    seq_len: int = 64
    """2 * num_pairs tokens of pairs, the rest queries and answers."""
    embedding_dim: int = 64
    num_heads: int = 4
    num_blocks: int = 2
    eval_sequences: int = 1024

    def check(self) -> None:
        training.check(self.train)
        if self.num_pairs < 1:
            raise training.UsageError(f"--num-pairs must be >= 1, got {self.num_pairs}")
        if self.vocab_size < 4 or self.vocab_size // 2 - 1 < self.num_pairs:
            raise training.UsageError(
                f"--vocab-size {self.vocab_size} leaves too few keys for --num-pairs "
                f"{self.num_pairs}"
            )
        if self.seq_len < 2 * self.num_pairs + 2 or self.seq_len % 2:
            raise training.UsageError(
                "--seq-len must be even and leave room for at least one query"
            )
        try:
            self.model_config()
        except ValueError as err:  # sizes the model refuses, e.g. heads not dividing width
            raise training.UsageError(str(err)) from None

    def model_config(self) -> ex.ModelConfig:
        return training.model_config(
            self.train,
            vocab_size=self.vocab_size,
            context_length=self.seq_len,
            embedding_dim=self.embedding_dim,
            num_heads=self.num_heads,
            num_blocks=self.num_blocks,
        )


def mqar_batch(config: MQARConfig, key, batch_size):
    """(tokens, targets, weights), each (batch, seq_len); weight 1 at queried keys."""
    n, half, seq_len = config.num_pairs, config.vocab_size // 2, config.seq_len
    n_queries = (seq_len - 2 * n) // 2
    k_keys, k_vals, k_query = jax.random.split(key, 3)
    # n distinct keys from 1 .. half-1 (0 is never used), values from the upper half.
    keys = jax.vmap(lambda k: jax.random.permutation(k, jnp.arange(1, half))[:n])(
        jax.random.split(k_keys, batch_size)
    )
    values = jax.random.randint(k_vals, (batch_size, n), half, config.vocab_size)
    which = jax.random.randint(k_query, (batch_size, n_queries), 0, n)
    queries = jnp.take_along_axis(keys, which, axis=1)
    answers = jnp.take_along_axis(values, which, axis=1)
    interleave = lambda a, b: jnp.stack([a, b], axis=-1).reshape(batch_size, -1)
    tokens = jnp.concatenate([interleave(keys, values), interleave(queries, answers)], 1)
    targets = jnp.roll(tokens, -1, axis=1)  # next token
    is_query = jnp.arange(seq_len) >= 2 * n
    weights = (is_query & (jnp.arange(seq_len) % 2 == 0)).astype(jnp.float32)
    return tokens, targets, jnp.broadcast_to(weights, tokens.shape)


@jax.jit
def _accuracy(model, tokens, targets, weights):
    predictions = jnp.argmax(jax.vmap(model)(tokens), axis=-1)
    return jnp.sum((predictions == targets) * weights) / jnp.sum(weights)


def held_out_accuracy(config: MQARConfig, model: ex.LanguageModel) -> float:
    """Accuracy at the queried keys of `config.eval_sequences` sequences that training
    never sees (drawn from another fold of the seed)."""
    held_out_key = jax.random.fold_in(jax.random.key(config.train.seed), 2)
    return float(_accuracy(model, *mqar_batch(config, held_out_key, config.eval_sequences)))


def main(config: MQARConfig) -> dict:
    """Train, evaluate on held-out sequences, print and return the final values."""
    config.check()
    batch_size = config.train.batch_size
    # The batch of a step: a function of the run's key and the step.
    make_batch = jax.jit(
        lambda key, step: mqar_batch(config, jax.random.fold_in(key, step), batch_size)
    )
    run, model = training.train(
        config.train,
        config.model_config(),
        make_batch,
        data_settings={"num_pairs": config.num_pairs},
    )

    acc = held_out_accuracy(config, model)
    print(f"held-out accuracy on {config.eval_sequences} sequences: {acc:.4f}")
    return training.print_final(
        step=run.step, loss=run.losses[-1], accuracy=acc, out=config.train.out
    )


def parse_args(argv=None) -> MQARConfig:
    defaults = MQARConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training.add_arguments(parser, defaults.train)
    parser.add_argument("--num-pairs", type=int, default=defaults.num_pairs)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--num-blocks", type=int, default=defaults.num_blocks)
    args = parser.parse_args(argv)
    return dataclasses.replace(
        defaults,
        train=training.from_arguments(args),
        num_pairs=args.num_pairs,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        embedding_dim=args.embedding_dim,
        num_heads=args.num_heads,
        num_blocks=args.num_blocks,
    )


if __name__ == "__main__":
    training.run_main(main, parse_args())
