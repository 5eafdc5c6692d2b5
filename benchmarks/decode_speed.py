"""Generation speed: the decoding state versus recomputing the whole sequence per token.

Generates --new tokens after a --prompt-token prompt with a small LanguageModel, greedy,
for each activation: (a) `model.generate`, which carries the backend state (a key/value
cache for softmax/sigmoid, the constant-size sum k v^T for 'none'); (b) a loop that runs
the model over the whole (fixed-size) sequence buffer for every new token. Both are
jitted; times are the median of --repeats calls after a warm-up. Prints a table.

    python benchmarks/decode_speed.py [--prompt 1024 --new 256]
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_xlstm as ex

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--prompt", type=int, default=1024)
parser.add_argument("--new", type=int, default=256)
parser.add_argument("--embedding-dim", type=int, default=128)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--blocks", type=int, default=2)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--activations", default="softmax,sigmoid,none")
args = parser.parse_args()

total = args.prompt + args.new
prompt = jax.random.randint(jax.random.key(1), (args.prompt,), 0, 128)


def recompute_generate(model, prompt):
    """Greedy generation that reruns the model on the whole buffer for every token."""
    buffer = jnp.zeros(total, prompt.dtype).at[: args.prompt].set(prompt)

    def step(position, buffer):
        logits = model(buffer)[position - 1]  # causal: later (empty) slots do not matter
        return buffer.at[position].set(jnp.argmax(logits).astype(buffer.dtype))

    return jax.lax.fori_loop(args.prompt, total, step, buffer)[args.prompt :]


def timed(fn, *xs):
    jax.block_until_ready(fn(*xs))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*xs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


print(
    f"device: {jax.devices()[0].device_kind}; LanguageModel width {args.embedding_dim}, "
    f"{args.blocks} blocks, {args.heads} heads; prompt {args.prompt}, {args.new} new "
    f"tokens, greedy; jax {jax.__version__}"
)
print(
    f"{'activation':>10} | {'with state tok/s':>16} | {'recompute tok/s':>15} | "
    f"{'speed-up':>8} | same tokens"
)
for activation in args.activations.split(","):
    config = ex.ModelConfig(
        vocab_size=128,
        context_length=total,
        embedding_dim=args.embedding_dim,
        num_heads=args.heads,
        num_blocks=args.blocks,
        backend_config=ex.mLSTMBackendAttentionConfig(activation_function=activation),
    )
    model = ex.LanguageModel(config, key=jax.random.key(0))
    with_state = eqx.filter_jit(
        lambda m, p: m.generate(p, args.new, jax.random.key(0), temperature=0.0)
    )
    t_state, a = timed(with_state, model, prompt)
    t_full, b = timed(eqx.filter_jit(recompute_generate), model, prompt)
    same = bool((a == b).all())
    print(
        f"{activation:>10} | {args.new / t_state:16.1f} | {args.new / t_full:15.1f} | "
        f"{t_full / t_state:7.1f}x | {same}"
    )
