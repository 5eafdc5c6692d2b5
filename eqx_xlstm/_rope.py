"""Rotary position embeddings (RoPE) on interleaved pairs.

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
Feature pairs ``(2i, 2i + 1)`` of the last axis are rotated by the angle
``pos * theta ** (-2i / D)``, ``pos = 0 .. S - 1`` along axis ``-2``. This is the
upstream (xlstm_jax / LLaMA) convention, not the rotate-half pairing of
`equinox.nn.RotaryPositionalEmbedding`.
"""

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._typecheck import typechecked


def check_theta(theta: float, name: str = "theta") -> None:
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {theta!r}.")


def check_even(dim: int, name: str) -> None:
    if dim % 2:
        raise ValueError(
            f"{name} must be even for rotary embeddings (pairs 2i, 2i+1 are "
            f"rotated together), got {dim}."
        )


@typechecked
def precompute_freqs(
    feat_dim: int, max_length: int, theta: float = 1e4
) -> tuple[Float[Array, "length half"], Float[Array, "length half"]]:
    """Sine and cosine tables for rotary embeddings.

    Angles are computed in float64 on the host and rounded once to float32.

    **Arguments:**

    - `feat_dim`: feature dimension D that will be rotated.
    - `max_length`: number of positions in the tables.
    - `theta`: base of the wavelengths, > 0.

    **Returns:**

    `(sin, cos)`, each float32 of shape `(max_length, feat_dim // 2)`, with
    `sin[p, i] = sin(p * theta ** (-2i / feat_dim))`.
    """
    if feat_dim < 1:
        raise ValueError(f"`feat_dim` must be >= 1, got {feat_dim}.")
    if max_length < 0:
        raise ValueError(f"`max_length` must be >= 0, got {max_length}.")
    check_theta(theta)
    exponents = np.arange(0, feat_dim, 2, dtype=np.float64)[: feat_dim // 2] / feat_dim
    inv_wavelength = 1.0 / (float(theta) ** exponents)
    angles = np.outer(np.arange(max_length, dtype=np.float64), inv_wavelength)
    return (
        jnp.asarray(np.sin(angles), dtype=jnp.float32),
        jnp.asarray(np.cos(angles), dtype=jnp.float32),
    )


def rotate_pairs(
    x: Float[Array, "*batch seq dim"],
    sin: Float[Array, "seq half"],
    cos: Float[Array, "seq half"],
) -> Float[Array, "*batch seq dim"]:
    """Rotate interleaved pairs of `x` by per-position angles, in float32.

    Written as `x * cos2 + swap(x) * sin2` (`swap` exchanges each pair, the tables are
    interleaved to full width) so XLA fuses it with neighbouring elementwise work into
    one pass. Unchecked internal helper: returns float32 and expects `sin`/`cos`
    already cut to the sequence length.
    """
    x = x.astype(jnp.float32)
    seq_len, dim = x.shape[-2:]
    cos2 = jnp.repeat(cos, 2, axis=-1)  # c0 c0 c1 c1 ...
    sin2 = jnp.stack((-sin, sin), axis=-1).reshape(seq_len, dim)  # -s0 s0 -s1 s1 ...
    swapped = x.reshape(*x.shape[:-1], dim // 2, 2)[..., ::-1].reshape(x.shape)
    return x * cos2 + swapped * sin2


def rope_tables(
    seq_len: int,
    dim: int,
    freqs_sin: Array | None,
    freqs_cos: Array | None,
    theta: float,
    *,
    table_name: str = "freqs_sin/freqs_cos",
) -> tuple[Array, Array]:
    """Return `(sin, cos)` of shape `(seq_len, dim // 2)`: the given tables' first
    rows, or fresh tables from `theta`. Raises a ValueError naming what is wrong."""
    check_even(dim, "The head dimension (last axis of queries and keys)")
    if (freqs_sin is None) != (freqs_cos is None):
        raise ValueError("Pass both `freqs_sin` and `freqs_cos`, or neither.")
    if freqs_sin is None:
        check_theta(theta)
        return precompute_freqs(dim, seq_len, theta)
    if freqs_sin.shape != freqs_cos.shape:
        raise ValueError(
            f"`freqs_sin` and `freqs_cos` must have the same shape, got "
            f"{freqs_sin.shape} and {freqs_cos.shape}."
        )
    length, half = freqs_sin.shape
    if half != dim // 2:
        raise ValueError(
            f"{table_name} have {half} frequencies per position, but the head "
            f"dimension {dim} needs {dim // 2}."
        )
    if length < seq_len:
        raise ValueError(
            f"{table_name} cover {length} positions, shorter than the sequence "
            f"length {seq_len}; build them with max_length >= {seq_len}."
        )
    return freqs_sin[:seq_len], freqs_cos[:seq_len]


@typechecked
def apply_rotary_emb(
    xq: Float[Array, "*batch_q seq dim"],
    xk: Float[Array, "*batch_k seq dim"],
    freqs_sin: Float[Array, "length half"] | None = None,
    freqs_cos: Float[Array, "length half"] | None = None,
    theta: float = 1e4,
) -> tuple[Float[Array, "*batch_q seq dim"], Float[Array, "*batch_k seq dim"]]:
    """Apply rotary embeddings to queries and keys.

    The sequence axis is `-2`; every leading axis is a batch axis, so `(S, D)`,
    `(B, S, D)` and `(B, NH, S, D)` all work.

    **Arguments:**

    - `xq`, `xk`: queries and keys, `(*batch, S, D)` with D even.
    - `freqs_sin`, `freqs_cos`: optional tables from `precompute_freqs`, shape
        `(L, D // 2)` with `L >= S`; the first S rows are used. When given they take
        precedence over `theta`.
    - `theta`: wavelength base for tables computed on the fly.

    **Returns:**

    `(xq, xk)` rotated, each in its input dtype (the rotation runs in float32).
    """
    sin, cos = rope_tables(xq.shape[-2], xq.shape[-1], freqs_sin, freqs_cos, theta)
    return (
        rotate_pairs(xq, sin, cos).astype(xq.dtype),
        rotate_pairs(xk, sin, cos).astype(xk.dtype),
    )
