"""Incremental decoding for the attention backend: typed states in, states out.

A state is an `eqx.Module` that says what produced it (`StateIdentity`: activation,
pre-activation, RoPE theta, context length, head dims), so a backend refuses a state
from another configuration with a ValueError instead of silently computing something
else:

- `KVCache` (softmax and sigmoid): the keys after swish and RoPE (rotated at their
  absolute positions) and the values, preallocated to `context_length` positions, and
  the number of positions filled;
- `LinearState` ('none'): the constant-size linear-attention state: the sum of
  k v^T and of k over all positions seen (k after swish and RoPE), and their count.

Per batch row: leading axes of the arrays are the batch axes. For code written against
the mLSTM cell's interface, a state unpacks into three arrays, `c, n, m = state`, and
`from_arrays` rebuilds one from them (arrays alone carry no identity: only their
shapes are checked). A step takes T >= 1 new positions. Shapes never depend on how
many positions are filled, so one compiled step serves every position.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.core import Tracer
from jaxtyping import Array, Float, Int

from .. import maths
from ..implementations.reference import masked_weights, matmul_precision


@dataclasses.dataclass(frozen=True)
class StateIdentity:
    """What a decoding state depends on besides its arrays."""

    activation: str
    pre_activation: str
    theta: float
    context_length: int
    qk_head_dim: int
    v_head_dim: int
    window: int | None = None
    """The sliding window; the cache is then a ring buffer of `cache_length` slots."""

    @property
    def cache_length(self) -> int:
        """Positions a key/value cache holds: the context, or the window if shorter."""
        if self.window is None:
            return self.context_length
        return min(self.window, self.context_length)

    @property
    def state_class(self) -> "type[KVCache] | type[LinearState]":
        """The linear state for 'none' over the whole prefix; a key/value cache
        otherwise (a window's keys leave it, which a sum cannot undo)."""
        if self.activation == "none" and self.window is None:
            return LinearState
        return KVCache

    def check(self, state_identity: "StateIdentity") -> None:
        """A ValueError naming every setting in which `state_identity` differs."""
        if state_identity == self:
            return
        diffs = [
            f"{field.name}={getattr(state_identity, field.name)!r} (expected "
            f"{getattr(self, field.name)!r})"
            for field in dataclasses.fields(self)
            if getattr(state_identity, field.name) != getattr(self, field.name)
        ]
        raise ValueError(
            "This decoding state comes from a backend with other settings: "
            + ", ".join(diffs)
            + ". Pass the state returned by this backend."
        )


class KVCache(eqx.Module):
    """The key/value cache of softmax and sigmoid attention (`c, n, m = cache`)."""

    keys: Float[Array, "*batch context dqk"]
    """The keys after swish and RoPE, in float32 (float64 for float64 inputs), zero
    past the filled positions."""
    values: Float[Array, "*batch context dv"]
    """The values, in the values' dtype."""
    length: Int[Array, "*batch"]
    """The number of positions filled."""
    identity: StateIdentity = eqx.field(static=True)

    def __iter__(self):
        return iter((self.keys, self.values, self.length))


class LinearState(eqx.Module):
    """The linear-attention state of 'none' attention (`c, n, m = state`)."""

    kv: Float[Array, "*batch dqk dv"]
    """Sum of k v^T over the positions seen, in float32 (float64 for float64 inputs)."""
    key_sum: Float[Array, "*batch dqk"]
    """Sum of k (the mLSTM normalizer's analogue; the 'none' output does not use it)."""
    length: Int[Array, "*batch"]
    """The number of positions seen (RoPE needs the absolute position)."""
    identity: StateIdentity = eqx.field(static=True)

    def __iter__(self):
        return iter((self.kv, self.key_sum, self.length))


DecodingState = KVCache | LinearState


def from_arrays(identity: StateIdentity, batch_shape: tuple[int, ...], c, n, m) -> DecodingState:
    """The state `(c, n, m)` unpacked from a state of a backend with `identity`; a
    ValueError if the shapes do not fit it."""
    context, dqk, dv = identity.context_length, identity.qk_head_dim, identity.v_head_dim
    if identity.state_class is KVCache:
        expected = {
            "c_initial": (*batch_shape, identity.cache_length, dqk),
            "n_initial": (*batch_shape, identity.cache_length, dv),
        }
        kind = f"a key/value cache for activation_function={identity.activation!r}"
    else:
        expected = {"c_initial": (*batch_shape, dqk, dv), "n_initial": (*batch_shape, dqk)}
        kind = "the linear-attention state for activation_function='none'"
    expected["m_initial"] = tuple(batch_shape)
    for name, array in zip(("c_initial", "n_initial", "m_initial"), (c, n, m), strict=True):
        if tuple(array.shape) != expected[name]:
            raise ValueError(
                f"`{name}` has shape {tuple(array.shape)}, but this backend (context_length="
                f"{context}, qk_head_dim={dqk}, value dim {dv}, batch shape "
                f"{tuple(batch_shape)}) expects {expected[name]} for {kind}. Pass the state "
                "returned by this backend for this batch."
            )
    if not jnp.issubdtype(m.dtype, jnp.integer):
        raise ValueError(f"`m_initial` must hold integer positions, got dtype {m.dtype}.")
    return identity.state_class(c, n, m.astype(jnp.int32), identity)


def check_state(state: object, identity: StateIdentity, batch_shape: tuple[int, ...]) -> None:
    """A TypeError/ValueError unless `state` is a state of this backend for this batch."""
    if not isinstance(state, (KVCache, LinearState)):
        raise TypeError(
            f"`state` must be a KVCache or LinearState returned by the backend, got "
            f"{type(state).__name__}."
        )
    identity.check(state.identity)
    if tuple(state.length.shape) != tuple(batch_shape):
        raise ValueError(
            f"The state holds batch shape {tuple(state.length.shape)}, but the inputs have "
            f"batch shape {tuple(batch_shape)}. Pass the state returned for this batch."
        )


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


def prompt_state(k, v, sin, cos, identity: StateIdentity, accum) -> DecodingState:
    """The state after the positions of a parallel call (k: `(*batch, S, DQK)`)."""
    k = maths.prepare(k, identity.pre_activation, sin, cos, accum)
    seq_len = k.shape[-2]
    m = jnp.full(k.shape[:-2], seq_len, jnp.int32)
    if identity.window is not None:  # the last positions, each in its ring slot
        kept = min(seq_len, identity.cache_length)
        slots = jnp.arange(seq_len - kept, seq_len) % identity.cache_length
        ring = lambda x: (
            jnp.zeros((*x.shape[:-2], identity.cache_length, x.shape[-1]), x.dtype)
            .at[..., slots, :]
            .set(x[..., seq_len - kept :, :])
        )
        return KVCache(ring(k), ring(v), m, identity)
    if identity.activation != "none":
        pad = [(0, 0)] * (k.ndim - 2) + [(0, identity.context_length - seq_len), (0, 0)]
        return KVCache(jnp.pad(k, pad), jnp.pad(v, pad), m, identity)
    kv = jnp.einsum("...sd,...sv->...dv", k, v.astype(accum), precision=matmul_precision(v.dtype))
    return LinearState(kv, jnp.sum(k, axis=-2), m, identity)


def decode(q, k, v, state: DecodingState, freqs_sin, freqs_cos, spec, bias=None):
    """Continue from `state` with T new positions; returns `(h, new_state)`.

    q, k: `(*batch, T, DQK)`; v: `(*batch, T, DV)`; `spec` the call's AttentionSpec.
    With grouped-query heads k and v (and the state) have `spec.kv_groups` times fewer
    heads than q: each row of the state serves a group of query heads. `bias`: the
    sigmoid bias as an array broadcasting against q's batch axes (`spec.array_bias`).
    """
    identity = state.identity
    *q_batch, new, dqk = q.shape
    batch_shape = k.shape[:-2]  # the state's; with grouped heads q's rows hold a group
    if bias is not None:
        bias = jnp.broadcast_to(bias, tuple(q_batch)).astype(spec.accum_dtype)
    if spec.kv_groups > 1:
        q = q.reshape(*batch_shape, spec.kv_groups, new, dqk)
        if bias is not None:
            bias = bias.reshape(*batch_shape, spec.kv_groups)
    context_length = identity.context_length
    c, n, m = state
    if q.size == 0 or v.size == 0:  # no new positions or no rows: nothing changes
        return jnp.zeros(v.shape, spec.dtype), state
    m = _check_room(m, new, context_length)
    accum = spec.accum_dtype
    mm = lambda a, b: jnp.matmul(a, b, precision=matmul_precision(spec.dtype))
    scale = 1.0 / math.sqrt(dqk)

    def one_row(q, k, v, c, n, m, bias):
        # The array bias over the scale, added to the scores (None: the spec's bias).
        offset = None if bias is None else (bias / scale)[..., None, None]
        positions = m + jnp.arange(new, dtype=m.dtype)
        sin = jnp.take(freqs_sin, positions, axis=0)
        cos = jnp.take(freqs_cos, positions, axis=0)
        q = maths.prepare(q, identity.pre_activation, sin, cos, accum)
        k = maths.prepare(k, identity.pre_activation, sin, cos, accum)
        if identity.window is not None:
            return _ring_step(q, k, v, c, n, m, positions, identity, spec, mm, offset)
        if identity.activation == "none":
            steps = jnp.arange(new)
            causal = maths.visible(steps[:, None], steps[None, :])
            v = v.astype(accum)
            intra = mm(jnp.where(causal, mm(q, k.T), 0.0), v)
            h = scale * (mm(q, c) + intra)
            return h, (c + mm(k.T, v), n + jnp.sum(k, 0), m + new)
        start = (m, jnp.zeros_like(m))
        c = jax.lax.dynamic_update_slice(c, k.astype(c.dtype), start)
        n = jax.lax.dynamic_update_slice(n, v.astype(n.dtype), start)
        cached = jnp.arange(context_length, dtype=m.dtype)
        visible = maths.visible(positions[:, None], cached[None, :])
        weights = masked_weights(_biased(mm(q, c.T), offset), visible, spec)
        return mm(weights, n.astype(accum)), (c, n, m + new)

    # One vmap per leading axis rather than a reshape merging them: inputs and states
    # sharded over any leading axis then stay sharded.
    rows = one_row
    for _ in batch_shape:
        rows = jax.vmap(rows)
    h, (c, n, m) = rows(q, k, v, c, n, m, bias)
    h = h.reshape(*q_batch, new, h.shape[-1])
    return h.astype(spec.dtype), type(state)(c, n, m, identity)


def _biased(scores, offset):
    return scores if offset is None else scores + offset


def _ring_step(q, k, v, c, n, m, positions, identity: StateIdentity, spec, mm, offset):
    """One row's step with a sliding window: attend to the ring buffer's keys and the
    new ones, by absolute position; then keep the newest in the ring."""
    slots = identity.cache_length
    ring = jnp.arange(slots, dtype=m.dtype)
    held = m - 1 - (m - 1 - ring) % slots  # the newest position in each slot (< 0: empty)
    keys = jnp.concatenate([c, k.astype(c.dtype)], axis=-2)
    values = jnp.concatenate([n, v.astype(n.dtype)], axis=-2)
    key_pos = jnp.concatenate([held, positions])
    window_start = positions[:, None] - (identity.window - 1)
    visible = maths.visible(positions[:, None], key_pos[None, :], window_start) & (
        key_pos[None, :] >= 0
    )
    weights = masked_weights(_biased(mm(q, keys.T), offset), visible, spec)
    h = mm(weights, values.astype(weights.dtype))
    kept = min(k.shape[-2], slots)  # static: the newest positions that stay
    where = positions[-kept:] % slots
    c = c.at[where].set(k[-kept:].astype(c.dtype))
    n = n.at[where].set(v[-kept:].astype(n.dtype))
    return h, (c, n, m + k.shape[-2])
