"""The quadratic reference: materializes the S x S weights, like the upstream; the
ground truth the other implementations are tested against."""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .. import maths
from ..spec import AttentionSpec
from .base import Implementation


def causal_mask(seq_len: int, first_key=None) -> Bool[Array, "*#batch seq seq"]:
    """True where query i attends to key j; with `first_key` `(..., S)`, each query's
    first visible key (a window's or segment's start), `(..., S, S)`."""
    positions = jnp.arange(seq_len)
    first = None if first_key is None else first_key[..., :, None]
    return maths.visible(positions[:, None], positions[None, :], first)


def masked_weights(
    scores: Float[Array, "*batch queries keys"],
    mask: Bool[Array, "*#batch queries keys"],
    spec: AttentionSpec,
) -> Float[Array, "*batch queries keys"]:
    """Attention weights from raw scores; masked entries are exactly 0.

    A fully masked row has all-zero weights for every activation (never NaN), and
    gradients through masked entries are exactly 0.
    """
    if spec.activation != "softmax":
        p = maths.weights(scores, spec.activation, spec.scale, spec.sigmoid_bias)
        return jnp.where(mask, p, 0.0)
    row_max = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1)
    # Softmax is shift invariant, so the shift carries no gradient.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    shift = row_max * (spec.scale * maths.LOG2E)
    p = maths.weights(jnp.where(mask, scores, 0.0), "softmax", spec.scale, row_stat=shift)
    p = jnp.where(mask, p, 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def matmul_precision(dtype) -> jax.lax.Precision:
    """Full-precision matmuls for float32 (and wider) inputs: a GPU would otherwise use
    TF32 and lose about three digits. 16-bit inputs keep the fast default."""
    if jnp.dtype(dtype).itemsize >= 4:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


@dataclasses.dataclass(frozen=True)
class Reference(Implementation):
    """S x S logits and weights in `spec.accum_dtype`, any mask, segments, windows and
    grouped heads, any platform."""

    name = "reference"

    def unsupported(self, spec: AttentionSpec) -> str | None:
        return None

    def __call__(self, q, k, v, spec, mask, first_key=None):
        if spec.mask == "full":
            mask = jnp.ones((spec.seq_len, spec.seq_len), bool)
        elif mask is None:
            mask = causal_mask(spec.seq_len, first_key)
        accum = spec.accum_dtype
        precision = matmul_precision(spec.dtype)
        scores = jnp.einsum(
            "...qd,...kd->...qk", q, k, preferred_element_type=accum, precision=precision
        )
        p = masked_weights(scores, mask, spec)
        return jnp.einsum("...qk,...kd->...qd", p, v.astype(accum), precision=precision)
