"""Raw queries and keys beside prepared ones: what a kernel needs to return the
gradients w.r.t. the rows before swish and RoPE (`maths.prepare`) itself, and that
gradient's maths in array form."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What the backward kernels need to return gradients w.r.t. the raw queries and
    keys: `q` and `k`, the rows before swish and RoPE (the kernels' q and k rows,
    `(N, S, D)` and `(N_kv, S, D)`), `table`, the RoPE angles (`rope_pair_table`,
    `(T, S, D)`, query row n and its K/V row reading row `n // (N / T)`), and whether
    swish comes first."""

    q: jax.Array
    k: jax.Array
    table: jax.Array
    swish: bool

    def arrays(self, dtype):
        """The raw rows, and the table as the kernels take it (`as_bits`)."""
        return self.q, self.k, as_bits(self.table, dtype)


def rope_pair_table(sin, cos):
    """`(..., S, D/2)` sine and cosine tables -> `(..., S, D)` float16 with each pair
    `(cos, sin)` of an angle where RoPE rotates a feature pair: what `raw_gradient`
    reads, one row per position. (float16: relative error 2^-11, a quarter of a
    bfloat16 gradient's rounding, in half the bytes of float32, and in the rows' own
    16 bits, `as_bits`.)"""
    table = jnp.stack((cos, sin), axis=-1).reshape(*cos.shape[:-1], 2 * cos.shape[-1])
    return table.astype(jnp.float16)


def as_bits(table, dtype):
    """The float16 `table` as `dtype` (16 bits) bit patterns: how the kernels copy it,
    beside rows of that dtype."""
    return jax.lax.bitcast_convert_type(table, dtype)


def from_bits(bits):
    """`as_bits` undone, in float32 (inside a kernel too)."""
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _pairs(x, order):
    """`x` with each pair of its last axis `(2i, 2i + 1)` rearranged as `order` says
    ((1, 0) swaps, (0, 0) and (1, 1) repeat one entry)."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.stack([pairs[..., i] for i in order], axis=-1).reshape(x.shape)


def raw_gradient(grad, raw, table, swish):
    """The gradient w.r.t. `raw` (x, `(..., D)`) of rows whose gradient w.r.t.
    `rope(swish(x))` is `grad` (float32), RoPE's angles given as `table` rows
    (`rope_pair_table`, any float dtype); `swish` False where the rows skip it. The
    array form (XLA, and the kernels in interpret mode)."""
    table = table.astype(jnp.float32)
    cos, sin = _pairs(table, (0, 0)), _pairs(table, (1, 1))
    # RoPE^T on a pair (a, b): (a cos + b sin, b cos - a sin).
    signs = jnp.where(jnp.arange(grad.shape[-1]) % 2 == 0, 1.0, -1.0)
    out = grad * cos + _pairs(grad, (1, 0)) * sin * signs
    if not swish:
        return out
    x = raw.astype(jnp.float32)
    gate = 0.5 * jnp.tanh(0.5 * x) + 0.5  # sigmoid(x)
    return out * (gate + x * gate * (1.0 - gate))  # swish'(x)
