"""Incremental decoding for the attention backend: states in, states out.

The state is a triple `(c, n, m)` like the mLSTM cell's, per batch row:

- softmax and sigmoid, a key/value cache preallocated to `context_length` positions:
  `c`: `(*batch, context_length, DQK)` float32, the keys after swish and RoPE (rotated
  at their absolute positions), zero past the filled positions;
  `n`: `(*batch, context_length, DV)`, the values, in the values' dtype;
  `m`: `(*batch,)` int32, the number of positions filled.
- 'none', the constant-size linear-attention state:
  `c`: `(*batch, DQK, DV)` float32, the sum of k v^T over all positions seen (k after
  swish and RoPE); `n`: `(*batch, DQK)` float32, the sum of those keys (the mLSTM
  normalizer's analogue; the 'none' output does not use it); `m`: `(*batch,)` int32,
  the number of positions seen (RoPE needs the absolute position).

A step takes T >= 1 new positions. Shapes never depend on how many positions are
filled, so one compiled step serves every position.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.core import Tracer

from ._dispatch import matmul_precision, prepare_qk, swish_and_rotate
from ._reference import masked_weights


def _uses_cache(activation: str) -> bool:
    return activation != "none"


def check_state(state, batch_shape, activation, context_length, dqk, dv):
    """A ValueError if `state` does not belong to a backend with these settings."""
    c, n, m = state
    if _uses_cache(activation):
        expected = {
            "c_initial": (*batch_shape, context_length, dqk),
            "n_initial": (*batch_shape, context_length, dv),
        }
        kind = f"a key/value cache for activation_function={activation!r}"
    else:
        expected = {"c_initial": (*batch_shape, dqk, dv), "n_initial": (*batch_shape, dqk)}
        kind = "the linear-attention state for activation_function='none'"
    expected["m_initial"] = batch_shape
    for name, array in zip(("c_initial", "n_initial", "m_initial"), (c, n, m)):
        if tuple(array.shape) != expected[name]:
            raise ValueError(
                f"`{name}` has shape {tuple(array.shape)}, but this backend (context_length="
                f"{context_length}, qk_head_dim={dqk}, value dim {dv}, batch shape "
                f"{tuple(batch_shape)}) expects {expected[name]} for {kind}. Pass the state "
                "returned by this backend for this batch."
            )
    if not jnp.issubdtype(m.dtype, jnp.integer):
        raise ValueError(f"`m_initial` must hold integer positions, got dtype {m.dtype}.")


def _check_room(m, new, context_length):
    """Decoding past context_length: a ValueError when `m` is concrete, else a runtime
    error raised by the compiled step (`equinox.error_if`)."""
    message = (
        f"decoding past context_length={context_length}: the state is full or "
        f"{new} new position(s) do not fit"
    )
    if not isinstance(m, Tracer):
        filled = int(jnp.max(m)) if m.size else 0
        if filled + new > context_length:
            raise ValueError(f"{message} ({filled} filled).")
        return m
    return eqx.error_if(m, jnp.any(m + new > context_length), message + ".")


def prompt_state(k, v, *, sin, cos, activation, pre_activation, context_length):
    """The state after the positions of a parallel call (k: `(*batch, S, DQK)`)."""
    k = swish_and_rotate(k, pre_activation, sin, cos)
    seq_len = k.shape[-2]
    m = jnp.full(k.shape[:-2], seq_len, jnp.int32)
    if _uses_cache(activation):
        pad = [(0, 0)] * (k.ndim - 2) + [(0, context_length - seq_len), (0, 0)]
        return jnp.pad(k, pad), jnp.pad(v, pad), m
    kv = jnp.einsum(
        "...sd,...sv->...dv", k, v.astype(jnp.float32), precision=matmul_precision(v.dtype)
    )
    return kv, jnp.sum(k, axis=-2), m


def decode(
    q, k, v, state, *, freqs_sin, freqs_cos, activation, pre_activation, sigmoid_bias, dtype
):
    """Continue from `state` with T new positions; returns `(h, new_state)`.

    q, k: `(*batch, T, DQK)`; v: `(*batch, T, DV)`; state as described above.
    """
    *batch_shape, new, dqk = q.shape
    context_length = freqs_sin.shape[0]
    c, n, m = state
    m = _check_room(m, new, context_length)
    mm = functools.partial(jnp.matmul, precision=matmul_precision(dtype))
    flat = lambda x: x.reshape(-1, *x.shape[len(batch_shape) :])  # noqa: E731

    def one_row(q, k, v, c, n, m):
        positions = m + jnp.arange(new)
        sin = jnp.take(freqs_sin, positions, axis=0)
        cos = jnp.take(freqs_cos, positions, axis=0)
        q, k = prepare_qk(q, k, pre_activation, sin, cos)
        scale = 1.0 / math.sqrt(dqk)
        if not _uses_cache(activation):
            causal = jnp.tril(jnp.ones((new, new), bool))
            v = v.astype(jnp.float32)
            intra = mm(jnp.where(causal, mm(q, k.T), 0.0), v)
            h = scale * (mm(q, c) + intra)
            return h, (c + mm(k.T, v), n + jnp.sum(k, 0), m + new)
        c = jax.lax.dynamic_update_slice(c, k, (m, 0))
        n = jax.lax.dynamic_update_slice(n, v.astype(n.dtype), (m, 0))
        visible = jnp.arange(context_length)[None, :] <= positions[:, None]
        weights = masked_weights(scale * mm(q, c.T), visible, activation, sigmoid_bias)
        return mm(weights, n.astype(jnp.float32)), (c, n, m + new)

    h, (c, n, m) = jax.vmap(one_row)(*map(flat, (q, k, v, c, n, m)))
    unflat = lambda x: x.reshape(*batch_shape, *x.shape[1:])  # noqa: E731
    return unflat(h).astype(dtype), (unflat(c), unflat(n), unflat(m))
