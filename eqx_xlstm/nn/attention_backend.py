"""The mLSTM *attention* backend: config and module."""

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, Shaped

from .. import dispatch
from ..implementations import Implementation
from ..spec import (
    ACTIVATIONS,
    PRE_ACTIVATIONS,
    build_spec,
    canonical_pre_activation,
    check_array_bias,
    check_kv_heads,
    check_option,
    check_segment_ids,
    check_window,
    resolve_dtype,
    whole_number,
)
from ..typecheck import typechecked
from .backend import mLSTMBackend
from .decoding import DecodingState, StateIdentity, check_state, decode, from_arrays, prompt_state
from .rope import check_even, check_theta, precompute_freqs, rope_tables

ArrayLike = Array | np.ndarray


@dataclasses.dataclass(frozen=True)
class mLSTMBackendAttentionConfig:  # noqa: N801 (upstream name)
    """Configuration of `mLSTMBackendAttention`.

    Frozen: `assign_model_config_params` returns a new config instead of patching
    this one in place. Numbers may be Python or NumPy scalars; they are stored as
    `int` and `float`.
    """

    context_length: numbers.Integral = -1
    """Longest sequence the backend serves; sizes the RoPE tables and fixes the
    sigmoid bias at -log(context_length). -1 means "take it from the model config"."""
    activation_function: str = "softmax"
    """Activation of the attention logits: "softmax", "sigmoid" or "none"."""
    qk_pre_activation_function: str = "none"
    """Activation of queries and keys before RoPE: "none", "swish" or "silu" (the
    same). Options are plain strings, checked with a ValueError listing valid names."""
    theta: numbers.Real = 1e4
    """RoPE wavelength base."""
    implementation: str | Implementation | None = None
    """Attention implementation, as `eqx_xlstm.attention`'s `implementation`: None
    (best for the inputs), a name, or an `Implementation` with its own tuning."""
    sliding_window: numbers.Integral | None = None
    """Sliding window w: key j is visible from query i when i - w < j <= i. Decoding
    then keeps a ring buffer of min(w, context_length) positions (for 'none' too), so
    the state does not grow with the context. None: the whole prefix."""

    def __post_init__(self):
        check_option(self.activation_function, ACTIVATIONS, "activation_function")
        check_option(self.qk_pre_activation_function, PRE_ACTIVATIONS, "qk_pre_activation_function")
        object.__setattr__(self, "theta", check_theta(self.theta))
        dispatch.check_implementation(self.implementation)
        object.__setattr__(self, "sliding_window", check_window(self.sliding_window, True))
        try:
            context_length = whole_number(self.context_length, "context_length")
        except TypeError:
            context_length = 0
        if not (context_length == -1 or context_length >= 1):
            raise ValueError(
                f"`context_length` must be a positive int (or -1, unassigned), got "
                f"{self.context_length!r}."
            )
        object.__setattr__(self, "context_length", context_length)

    def assign_model_config_params(self, model_config: Any) -> "mLSTMBackendAttentionConfig":
        """Return a copy whose `context_length` is `model_config.context_length`."""
        try:
            context_length = model_config.context_length
        except AttributeError as err:
            raise TypeError(
                "`model_config` must have a `context_length` attribute, got "
                f"{type(model_config).__name__}."
            ) from err
        return dataclasses.replace(self, context_length=context_length)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-serialisable data (`from_dict` rebuilds it)."""
        data = dataclasses.asdict(self)
        if isinstance(self.implementation, Implementation):
            data["implementation"] = self.implementation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "mLSTMBackendAttentionConfig":
        data = dict(data)
        implementation = data.get("implementation")
        if isinstance(implementation, dict):
            data["implementation"] = dispatch.implementation_from_dict(implementation)
        return cls(**data)


def _given_states(c_initial, n_initial, m_initial) -> bool:
    """Whether initial states were passed; a ValueError for a partial set."""
    given = [s is not None for s in (c_initial, n_initial, m_initial)]
    if any(given) and not all(given):
        raise ValueError(
            "Pass all of c_initial, n_initial and m_initial, or none of them; got "
            + ", ".join(
                f"{name}={'set' if g else 'None'}"
                for name, g in zip(("c_initial", "n_initial", "m_initial"), given)
            )
            + "."
        )
    return all(given)


class mLSTMBackendAttention(mLSTMBackend):  # noqa: N801 (upstream name)
    """Causal attention with rotary embeddings, as an mLSTM backend.

    Runs `eqx_xlstm.attention` with the config's options on sequences of any length
    S <= `context_length`, and decodes incrementally: with `return_last_states=True`
    it also returns a typed state (`KVCache` for softmax and sigmoid, the constant-size
    `LinearState` for 'none'); passing it back as `state=` continues the sequence, one
    position or a chunk at a time, with the same outputs as one parallel call. For
    code written against the mLSTM cell, the state also unpacks as `(c, n, m)`, and
    `c_initial, n_initial, m_initial` take those arrays back.

    The RoPE tables are precomputed buffers of shape `(context_length, qk_head_dim //
    2)`; they receive no gradient (keep them out of the optimizer with
    `eqx_xlstm.trainable_filter`). The sigmoid bias is fixed at -log(context_length),
    so the output on a prefix is the prefix of the output. The gates `i`, `f` are
    accepted for interface compatibility and ignored.
    """

    config: mLSTMBackendAttentionConfig = eqx.field(static=True)
    qk_head_dim: int = eqx.field(static=True)
    freqs_sin: Float[Array, "context half"]
    freqs_cos: Float[Array, "context half"]

    config_class: ClassVar[type] = mLSTMBackendAttentionConfig
    buffer_fields: ClassVar[tuple[str, ...]] = ("freqs_sin", "freqs_cos")

    def __init__(self, config: mLSTMBackendAttentionConfig, qk_head_dim: numbers.Integral):
        """**Arguments:**

        - `config`: an `mLSTMBackendAttentionConfig` with `context_length` assigned.
        - `qk_head_dim`: head dimension of queries and keys (even).
        """
        if not isinstance(config, mLSTMBackendAttentionConfig):
            raise TypeError(
                f"`config` must be an mLSTMBackendAttentionConfig, got {type(config).__name__}."
            )
        if config.context_length < 1:
            raise ValueError(
                "`config.context_length` was never assigned (it is "
                f"{config.context_length}). Set it, or call "
                "`config = config.assign_model_config_params(model_config)` first."
            )
        qk_head_dim = whole_number(qk_head_dim, "qk_head_dim")
        if qk_head_dim < 2:
            raise ValueError(f"`qk_head_dim` must be an int >= 2, got {qk_head_dim!r}.")
        check_even(qk_head_dim, "`qk_head_dim`")
        self.config = config
        self.qk_head_dim = qk_head_dim
        self.freqs_sin, self.freqs_cos = precompute_freqs(
            qk_head_dim, config.context_length, config.theta
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        return True

    @property
    def sigmoid_bias(self) -> float:
        """-log(context_length): fixed, so chunks and prefixes agree with the whole."""
        return -math.log(self.config.context_length)

    def state_identity(self, v_head_dim: int) -> StateIdentity:
        """What a decoding state of this backend carries to identify it."""
        return StateIdentity(
            activation=self.config.activation_function,
            pre_activation=canonical_pre_activation(self.config.qk_pre_activation_function),
            theta=self.config.theta,
            context_length=self.config.context_length,
            qk_head_dim=self.qk_head_dim,
            v_head_dim=v_head_dim,
            window=self.config.sliding_window,
        )

    @typechecked
    def __call__(
        self,
        q: Float[ArrayLike, "*batch seq dqk"],
        k: Float[ArrayLike, "*kv_batch seq dqk"],
        v: Float[ArrayLike, "*kv_batch seq dv"],
        i: Shaped[ArrayLike, "..."] | None = None,
        f: Shaped[ArrayLike, "..."] | None = None,
        c_initial: Shaped[ArrayLike, "..."] | None = None,
        n_initial: Shaped[ArrayLike, "..."] | None = None,
        m_initial: Shaped[ArrayLike, "..."] | None = None,
        return_last_states: bool = False,
        *,
        state: DecodingState | None = None,
        segment_ids: Integer[ArrayLike, "*segment_batch seq"] | None = None,
        sigmoid_bias: Float[ArrayLike, "..."] | None = None,
    ) -> Float[Array, "*batch seq dv"] | tuple[Float[Array, "*batch seq dv"], DecodingState]:
        """**Arguments:**

        - `q`, `k`: `(*batch, S, qk_head_dim)`; S plus the positions already in the
            state must not exceed `context_length`.
        - `v`: `(*batch, S, DV)`, same dtype as `q` and `k`.
            Grouped-query heads: `k` and `v` may have fewer heads (axis -3) than `q`,
            a divisor of q's; the state then holds only theirs.
        - `i`, `f`: gate pre-activations, ignored.
        - `c_initial`, `n_initial`, `m_initial`: the arrays of a state returned by this
            backend (`c, n, m = state`), to continue from (all three or none).
        - `return_last_states`: also return the state after these positions.
        - `state`: a state returned by this backend, to continue from (instead of
            `c_initial`, `n_initial`, `m_initial`).
        - `segment_ids`: packed sequences, as `eqx_xlstm.attention`'s (parallel calls
            only: not with a state or `return_last_states`).
        - `sigmoid_bias`: a float array broadcasting against the batch axes that
            replaces the fixed -log(context_length) ("sigmoid" only): a learnable bias
            (the layers' `ModelConfig(learned_sigmoid_bias=True)`).

        **Returns:**

        `h` of shape `(*batch, S, DV)` in the inputs' dtype, or `(h, state)`.
        """
        q, k, v = (jnp.asarray(x) for x in (q, k, v))
        *batch_shape, seq_len, head_dim = q.shape
        batch_shape = tuple(batch_shape)
        context_length = self.config.context_length
        if seq_len > context_length:
            raise ValueError(
                f"The sequence has {seq_len} positions, more than the backend's "
                f"context_length={context_length}."
            )
        if head_dim != self.qk_head_dim:
            raise ValueError(
                f"q and k have head dimension {head_dim}, but this backend was built "
                f"with qk_head_dim={self.qk_head_dim}."
            )
        kv_groups = check_kv_heads(q, k, v)
        kv_batch_shape = tuple(k.shape[:-2])  # the state's batch shape
        identity = self.state_identity(v.shape[-1])
        if _given_states(c_initial, n_initial, m_initial):
            if state is not None:
                raise ValueError("Pass `state` or c_initial/n_initial/m_initial, not both.")
            arrays = (jnp.asarray(x) for x in (c_initial, n_initial, m_initial))
            state = from_arrays(identity, kv_batch_shape, *arrays)  # checks the shapes
        elif state is not None:
            check_state(state, identity, kv_batch_shape)
        spec = build_spec(
            q,
            v,
            dtype=resolve_dtype(q, k, v, None),
            activation=self.config.activation_function,
            pre_activation=self.config.qk_pre_activation_function,
            causal=True,
            sigmoid_bias=self.sigmoid_bias if sigmoid_bias is None else 0.0,
            window=self.config.sliding_window,
            segmented=segment_ids is not None,
            kv_groups=kv_groups,
            array_bias=sigmoid_bias is not None,
        )
        if sigmoid_bias is not None:
            sigmoid_bias = check_array_bias(
                jnp.asarray(sigmoid_bias), batch_shape, self.config.activation_function
            )
        freqs_sin, freqs_cos = self._tables(spec.accum_dtype)
        if segment_ids is not None:
            if state is not None or return_last_states:
                raise ValueError(
                    "`segment_ids` go with parallel calls only, not with a decoding `state` "
                    "or `return_last_states`."
                )
            segment_ids = check_segment_ids(
                jnp.asarray(segment_ids), batch_shape, seq_len, kv_groups, True
            )
        if state is not None:
            h, state = decode(q, k, v, state, freqs_sin, freqs_cos, spec, sigmoid_bias)
            return (h, state) if return_last_states else h
        sin, cos = freqs_sin[:seq_len], freqs_cos[:seq_len]
        chosen = dispatch.plan(spec, self.config.implementation)
        h = dispatch.run(q, k, v, None, sin, cos, spec, chosen, segment_ids, sigmoid_bias)
        if not return_last_states:
            return h
        return h, prompt_state(k, v, sin, cos, identity, spec.accum_dtype)

    def _tables(self, accum):
        """The RoPE tables, without gradient: the float32 buffers, or float64 tables
        from `theta` for float64 inputs."""
        if accum == jnp.float32:
            return jax.lax.stop_gradient(self.freqs_sin), jax.lax.stop_gradient(self.freqs_cos)
        context, dim = self.config.context_length, self.qk_head_dim
        return rope_tables(context, dim, None, None, self.config.theta, dtype=accum)
