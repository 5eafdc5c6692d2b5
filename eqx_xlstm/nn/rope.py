"""Rotary position embeddings (RoPE) on interleaved pairs.

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
Feature pairs ``(2i, 2i + 1)`` of the last axis are rotated by the angle
``pos * theta ** (-2i / D)``, ``pos = 0 .. S - 1`` along axis ``-2``. This is the
upstream (xlstm_jax / LLaMA) convention, not the rotate-half pairing of
`equinox.nn.RotaryPositionalEmbedding`.
"""

import math
import numbers

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..maths import rotate_pairs
from ..spec import accumulation_dtype, real_number, whole_number
from ..typecheck import typechecked


def check_theta(theta: object, name: str = "theta") -> float:
    """`theta` as a float; a ValueError unless it is a finite number > 0."""
    try:
        value = real_number(theta, name)
    except (TypeError, ValueError):
        value = None
    if value is None or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {theta!r}.")
    return value


def check_even(dim: int, name: str) -> None:
    if dim % 2:
        raise ValueError(
            f"{name} must be even for rotary embeddings (pairs 2i, 2i+1 are "
            f"rotated together), got {dim}."
        )


def rope_angles(feat_dim: int, max_length: int, theta: float) -> np.ndarray:
    """`(max_length, feat_dim // 2)` float64 angles `p * theta ** (-2i / feat_dim)`."""
    exponents = np.arange(0, feat_dim, 2, dtype=np.float64)[: feat_dim // 2] / feat_dim
    inv_wavelength = 1.0 / (float(theta) ** exponents)
    return np.outer(np.arange(max_length, dtype=np.float64), inv_wavelength)


HOST_TABLES_UP_TO = 4096
"""Longest sequence whose fresh tables are built whole on the host. Beyond, they are
composed on the device from two short host tables (`_composed_tables`): whole tables
made while a function is traced become constants of the compiled program (268 MB of
program text at S = 262,144 and D = 128, minutes of compilation at 1M)."""


def _composed_tables(seq_len: int, dim: int, theta: float, dtype):
    """`(sin, cos)` of `(seq_len, dim // 2)` from the angle-addition formulas: position
    p = c F + f with F about sqrt(seq_len), so that only the angles of c F and of f are
    tabled (float64 on the host, rounded once) and the products are formed on the
    device; within a few float32 rounding errors (about 3e-7) of the whole tables."""
    fine = 1 << max(1, math.ceil(math.log2(seq_len) / 2))
    coarse = -(-seq_len // fine)
    fine_angles = rope_angles(dim, fine, theta)  # positions 0 .. F - 1
    coarse_angles = np.outer(np.arange(coarse, dtype=np.float64) * fine, fine_angles[1])
    table = lambda fn, angles: jnp.asarray(fn(angles), dtype)
    sin_c, cos_c = (table(fn, coarse_angles)[:, None, :] for fn in (np.sin, np.cos))
    sin_f, cos_f = (table(fn, fine_angles)[None] for fn in (np.sin, np.cos))
    sin = (sin_c * cos_f + cos_c * sin_f).reshape(coarse * fine, -1)[:seq_len]
    cos = (cos_c * cos_f - sin_c * sin_f).reshape(coarse * fine, -1)[:seq_len]
    return sin, cos


@typechecked
def precompute_freqs(
    feat_dim: numbers.Integral, max_length: numbers.Integral, theta: numbers.Real = 1e4
) -> tuple[Float[Array, "length half"], Float[Array, "length half"]]:
    """Sine and cosine tables for rotary embeddings.

    Angles are computed in float64 on the host and rounded once to float32.

    **Arguments:**

    - `feat_dim`: feature dimension D that will be rotated (an int).
    - `max_length`: number of positions in the tables (an int).
    - `theta`: base of the wavelengths, a number > 0.

    **Returns:**

    `(sin, cos)`, each float32 of shape `(max_length, feat_dim // 2)`, with
    `sin[p, i] = sin(p * theta ** (-2i / feat_dim))`.
    """
    feat_dim, max_length = (
        whole_number(feat_dim, "feat_dim"),
        whole_number(max_length, "max_length"),
    )
    if feat_dim < 1:
        raise ValueError(f"`feat_dim` must be >= 1, got {feat_dim}.")
    if max_length < 0:
        raise ValueError(f"`max_length` must be >= 0, got {max_length}.")
    angles = rope_angles(feat_dim, max_length, check_theta(theta))
    return (
        jnp.asarray(np.sin(angles), dtype=jnp.float32),
        jnp.asarray(np.cos(angles), dtype=jnp.float32),
    )


def rope_tables(
    seq_len: int,
    dim: int,
    freqs_sin: Array | None,
    freqs_cos: Array | None,
    theta: numbers.Real,
    *,
    dtype=np.float32,
    table_name: str = "freqs_sin/freqs_cos",
) -> tuple[Array, Array]:
    """Return `(sin, cos)` of shape `(seq_len, dim // 2)`: the given tables' first
    rows, or fresh tables from `theta` in `dtype` (float64 angles rounded once).
    Raises a ValueError naming what is wrong."""
    check_even(dim, "The head dimension (last axis of queries and keys)")
    if dim < 2:
        raise ValueError(
            f"The head dimension (last axis of queries and keys) must be >= 2, got {dim}."
        )
    if (freqs_sin is None) != (freqs_cos is None):
        raise ValueError("Pass both `freqs_sin` and `freqs_cos`, or neither.")
    if freqs_sin is None:
        if seq_len > HOST_TABLES_UP_TO:
            return _composed_tables(seq_len, dim, check_theta(theta), dtype)
        angles = rope_angles(dim, seq_len, check_theta(theta))
        return jnp.asarray(np.sin(angles), dtype), jnp.asarray(np.cos(angles), dtype)
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
    xq: Float[Array | np.ndarray, "*batch_q seq dim"],
    xk: Float[Array | np.ndarray, "*batch_k seq dim"],
    freqs_sin: Float[Array | np.ndarray, "length half"] | None = None,
    freqs_cos: Float[Array | np.ndarray, "length half"] | None = None,
    theta: numbers.Real = 1e4,
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

    `(xq, xk)` rotated, each in its input dtype (the rotation runs in float32, or in
    float64 for float64 inputs).
    """
    xq, xk = jnp.asarray(xq), jnp.asarray(xk)
    if freqs_sin is not None:
        freqs_sin = jnp.asarray(freqs_sin)
    if freqs_cos is not None:
        freqs_cos = jnp.asarray(freqs_cos)
    accum = accumulation_dtype(xq.dtype, xk.dtype)
    sin, cos = rope_tables(xq.shape[-2], xq.shape[-1], freqs_sin, freqs_cos, theta, dtype=accum)
    return (
        rotate_pairs(xq.astype(accum), sin, cos).astype(xq.dtype),
        rotate_pairs(xk.astype(accum), sin, cos).astype(xk.dtype),
    )
