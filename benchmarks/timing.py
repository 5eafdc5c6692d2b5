"""Timing and baselines shared by the benchmark scripts (run them from the repository
root)."""

import statistics
import time

import jax
import jax.numpy as jnp


def median_ms(fn, *xs, repeats=10, sample_ms=10.0):
    """Median time in ms of one call of `jax.jit(fn)(*xs)`, over `repeats` samples.

    Compiled and run once beforehand (twice for calls shorter than `sample_ms`), so
    neither compilation nor the first call is timed. A sample issues enough calls back
    to back to last about `sample_ms` (one for calls longer than that) and waits for
    the last, so that short calls are timed on the device, not by the host's round
    trip per call."""
    return compiled_median_ms(
        jax.jit(fn).lower(*xs).compile(), *xs, repeats=repeats, sample_ms=sample_ms
    )


def compiled_median_ms(compiled, *xs, repeats=10, sample_ms=10.0):
    """`median_ms` of an already compiled function."""
    start = time.perf_counter()
    jax.block_until_ready(compiled(*xs))
    elapsed = time.perf_counter() - start
    if elapsed * 1e3 < sample_ms:  # measure again without the first call's one-time costs
        start = time.perf_counter()
        jax.block_until_ready(compiled(*xs))
        elapsed = time.perf_counter() - start
    calls = max(1, min(100, round(sample_ms / (elapsed * 1e3))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = compiled(*xs)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


def sum_gradient(fn):
    """The gradient of `sum(fn(q, k, v))` (in float32) with respect to q, k and v."""
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def training_step(fn):
    """`fn`'s output and its gradients w.r.t. q, k and v for a given cotangent `dout`,
    as a training step runs a layer: `(q, k, v, dout) -> (out, (dq, dk, dv))`. Unlike
    `sum_gradient`, the forward pass always runs (XLA cannot drop it) and no cotangent
    is made inside the timed call."""

    def step(q, k, v, dout):
        out, pull_back = jax.vjp(fn, q, k, v)
        return out, pull_back(dout.astype(out.dtype))

    return step


def add_round_arguments(parser, sample_ms=100.0):
    """`--rounds`, `--repeats` and `--sample-ms`: how a script times its cases, in
    interleaved rounds of samples (`compiled_median_ms`)."""
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every case")
    parser.add_argument("--repeats", type=int, default=3, help="samples per case and round")
    parser.add_argument(
        "--sample-ms",
        type=float,
        default=sample_ms,
        help="calls issued back to back per sample (timing.median_ms); long samples keep "
        "the host's dispatch of the first call out of the device time",
    )


def print_table_header(header):
    """Print a markdown table's header row and its separator row."""
    print(header)
    print("|---" * (header.count("|") - 1) + "|")


def packed_ids(seq_len, documents):
    """Segment ids of `documents` packed documents of `seq_len / documents` positions
    each (the last shorter where it does not divide), `(seq_len,)` int32."""
    ids = jnp.repeat(jnp.arange(documents, dtype=jnp.int32), -(-seq_len // documents))
    return ids[:seq_len]


def random_qkv(shape, dtype, count=3):
    """`count` standard-normal arrays of `shape` and `dtype` (fixed seed)."""
    keys = jax.random.split(jax.random.key(0), count)
    return [jax.random.normal(key, shape, dtype) for key in keys]


def bare_causal_attention(q, k, v, implementation="cudnn"):
    """`jax.nn.dot_product_attention` (causal, no RoPE, no swish) on `(..., S, D)`, the
    leading axes folded into its batch with one head, as `attention` hands them to
    cuDNN; returns `q`'s shape."""

    def as_btnh(x):
        return x.reshape(-1, *x.shape[-2:])[:, :, None, :]

    out = jax.nn.dot_product_attention(
        as_btnh(q), as_btnh(k), as_btnh(v), is_causal=True, implementation=implementation
    )
    return out.reshape(q.shape)
