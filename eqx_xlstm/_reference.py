"""The quadratic reference: materializes the S x S weights, like the upstream."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def causal_mask(seq_len: int) -> Bool[Array, "seq seq"]:
    """Lower-triangular mask, True where query i may attend to key j <= i."""
    return jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))


def masked_weights(
    logits: Float[Array, "*batch queries keys"],
    mask: Bool[Array, "queries keys"],
    activation: str,
    sigmoid_bias: float,
) -> Float[Array, "*batch queries keys"]:
    """Attention weights from float32 logits; masked entries are exactly 0.

    A fully masked row has all-zero weights for every activation (never NaN), and
    gradients through masked entries are exactly 0.
    """
    if activation == "softmax":
        row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
        # Softmax is shift invariant, so the shift carries no gradient.
        row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        unnormalized = jnp.where(mask, jnp.exp(jnp.where(mask, logits, 0.0) - row_max), 0.0)
        total = jnp.sum(unnormalized, axis=-1, keepdims=True)
        return unnormalized / jnp.where(total > 0, total, 1.0)
    if activation == "sigmoid":
        return jnp.where(mask, jax.nn.sigmoid(logits + sigmoid_bias), 0.0)
    return jnp.where(mask, logits, 0.0)


def reference_attention(
    q: Float[Array, "*batch seq dqk"],
    k: Float[Array, "*batch seq dqk"],
    v: Float[Array, "*batch seq dv"],
    mask: Bool[Array, "seq seq"] | None,
    activation: str,
    sigmoid_bias: float,
    precision=None,
) -> Float[Array, "*batch seq dv"]:
    """Attention with S x S logits in float32; returns float32."""
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    if mask is None:
        mask = causal_mask(seq_len)
    logits = jnp.einsum(
        "...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32, precision=precision
    ) / jnp.sqrt(jnp.float32(head_dim))
    weights = masked_weights(logits, mask, activation, sigmoid_bias)
    return jnp.einsum("...qk,...kd->...qd", weights, v.astype(jnp.float32), precision=precision)
