"""Build the attention backend, run it jitted and vmapped over heads, print what it did.

python examples/quickstart.py [--help]
"""

import argparse
import dataclasses
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_xlstm as ex


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    batch: int = 4
    heads: int = 8
    seq: int = 256
    """The sequence length S."""
    context_length: int = 512
    head_dim: int = 64
    activation: str = "softmax"
    pre_activation: str = "none"


def parse_args(argv=None) -> QuickstartConfig:
    defaults = QuickstartConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--seq", type=int, default=defaults.seq, help="sequence length S")
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--activation", default="softmax", choices=["softmax", "sigmoid", "none"])
    parser.add_argument("--pre-activation", default="none", choices=["none", "swish", "silu"])
    return QuickstartConfig(**vars(parser.parse_args(argv)))


def main(args: QuickstartConfig) -> None:
    config = ex.mLSTMBackendAttentionConfig(
        context_length=args.context_length,
        activation_function=args.activation,
        qk_pre_activation_function=args.pre_activation,
    )
    backend = ex.mLSTMBackendAttention(config, qk_head_dim=args.head_dim)
    print(f"backend: {config}")
    print(f"buffers: freqs_sin {backend.freqs_sin.shape}, freqs_cos {backend.freqs_cos.shape}")

    shape = (args.batch, args.heads, args.seq, args.head_dim)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))

    @eqx.filter_jit
    def mix(backend, q, k, v):
        # One head at a time: vmap over the heads axis (1); the backend is closed over.
        return eqx.filter_vmap(lambda q, k, v: backend(q, k, v), in_axes=1, out_axes=1)(q, k, v)

    start = time.perf_counter()
    out = mix(backend, q, k, v).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = mix(backend, q, k, v).block_until_ready()
    run_s = time.perf_counter() - start

    # The same result from the plain function, heads as a batch axis.
    expected = ex.attention(
        q,
        k,
        v,
        activation_function=args.activation,
        qk_pre_activation_function=args.pre_activation,
        sigmoid_bias=-jnp.log(args.context_length).item(),
    )
    print(f"input  q, k, v: {shape} {q.dtype} on {jax.devices()[0].platform}")
    print(f"output h:       {out.shape} {out.dtype}")
    print(
        f"first call (trace + compile): {compile_s * 1e3:.1f} ms, jitted call: {run_s * 1e3:.2f} ms"
    )
    print(f"max |vmapped backend - attention()| = {jnp.max(jnp.abs(out - expected)):.2e}")
    try:
        backend(
            jnp.ones((1, args.context_length + 1, args.head_dim)),
            jnp.ones((1, args.context_length + 1, args.head_dim)),
            jnp.ones((1, args.context_length + 1, args.head_dim)),
        )
    except ValueError as err:
        print(f"too-long input is refused: {err}")


if __name__ == "__main__":
    main(parse_args())
