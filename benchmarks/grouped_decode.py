"""Grouped-query decoding: the key/value cache and generation speed of a LanguageModel
with fewer key/value heads than query heads, against the same model with one per query
head (issue #10: KV cache 1/8, decode tokens/s >= the 1:1 model's).

    python benchmarks/grouped_decode.py                       # a GPU
    python benchmarks/grouped_decode.py --prompt 256 --new 64 --embedding-dim 128 --heads 8

Greedy `model.generate` of --new tokens after a --prompt-token prompt, jitted; tokens/s
is the median of --repeats calls after a warm-up. "cache MiB" is the size of the
decoding states after the prompt (every block's), from `model.decode`.
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from timing import print_table_header

import eqx_xlstm as ex


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--embedding-dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8, help="query heads per key/value head")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--activations", nargs="+", default=["softmax", "sigmoid"])
    args = parser.parse_args()
    total = args.prompt + args.new
    prompt = jax.random.randint(jax.random.key(1), (args.prompt,), 0, 256)
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; LanguageModel width "
        f"{args.embedding_dim}, {args.blocks} blocks, {args.heads} heads, bfloat16 weights; "
        f"prompt {args.prompt}, {args.new} new tokens, greedy"
    )
    print_table_header("| activation | kv heads | cache MiB | tokens/s | vs 1:1 tokens/s |")
    for activation in args.activations:
        base = None
        for kv_heads in (args.heads, args.heads // args.groups):
            config = ex.ModelConfig(
                vocab_size=256,
                context_length=total,
                embedding_dim=args.embedding_dim,
                num_heads=args.heads,
                num_kv_heads=kv_heads,
                num_blocks=args.blocks,
                backend_config=ex.mLSTMBackendAttentionConfig(activation_function=activation),
            )
            model = ex.LanguageModel(config, key=jax.random.key(0))
            model = jax.tree.map(
                lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, model
            )
            _, states = eqx.filter_jit(lambda m, p: m.decode(p))(model, prompt)
            cache = sum(x.nbytes for x in jax.tree.leaves(states)) / 2**20
            generate = eqx.filter_jit(
                lambda m, p: m.generate(p, args.new, jax.random.key(0), temperature=0.0)
            )
            jax.block_until_ready(generate(model, prompt))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(generate(model, prompt))
                times.append(time.perf_counter() - start)
            rate = args.new / statistics.median(times)
            base = base or rate
            print(
                f"| {activation} | {kv_heads} | {cache:.1f} | {rate:.1f} | {rate / base:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
