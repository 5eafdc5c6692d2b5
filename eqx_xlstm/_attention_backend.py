"""The mLSTM *attention* backend: config and module."""

import dataclasses
import math
from typing import Any, ClassVar

import equinox as eqx
import jax
from jaxtyping import Array, Float, Shaped

from ._attention import attention_core, resolve_dtype
from ._backend import mLSTMBackend
from ._decoding import check_state, decode, prompt_state
from ._dispatch import check_implementation
from ._options import ACTIVATIONS, PRE_ACTIVATIONS, check_option
from ._rope import check_even, check_theta, precompute_freqs
from ._typecheck import typechecked


@dataclasses.dataclass(frozen=True)
class mLSTMBackendAttentionConfig:  # noqa: N801 (upstream name)
    """Configuration of `mLSTMBackendAttention`.

    Frozen: `assign_model_config_params` returns a new config instead of patching
    this one in place.
    """

    context_length: int = -1
    """Longest sequence the backend serves; sizes the RoPE tables and fixes the
    sigmoid bias at -log(context_length). -1 means "take it from the model config"."""
    activation_function: str = "softmax"
    """Activation of the attention logits: "softmax", "sigmoid" or "none"."""
    qk_pre_activation_function: str = "none"
    """Activation of queries and keys before RoPE: "none", "swish" or "silu" (the
    same). Options are plain strings, checked with a ValueError listing valid names."""
    theta: float = 1e4
    """RoPE wavelength base."""
    implementation: str | None = None
    """Attention implementation, as `eqx_xlstm.attention`'s `implementation`: None
    (best for the inputs), "reference", "chunked", "cudnn" or "pallas"."""

    def __post_init__(self):
        check_option(self.activation_function, ACTIVATIONS, "activation_function")
        check_option(self.qk_pre_activation_function, PRE_ACTIVATIONS, "qk_pre_activation_function")
        check_theta(self.theta)
        check_implementation(self.implementation)
        if not isinstance(self.context_length, int) or not (
            self.context_length == -1 or self.context_length >= 1
        ):
            raise ValueError(
                f"`context_length` must be a positive int (or -1, unassigned), got "
                f"{self.context_length!r}."
            )

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
    it also returns a state `(c, n, m)`; passing it back as `c_initial, n_initial,
    m_initial` continues the sequence, one position or a chunk at a time, with the
    same outputs as one parallel call (see `eqx_xlstm._decoding` for what the arrays
    hold: a key/value cache for softmax and sigmoid, the constant-size state sum k v^T
    for 'none'). The RoPE tables are precomputed buffers of shape
    `(context_length, qk_head_dim // 2)`; they receive no gradient (keep them out of
    the optimizer with `eqx_xlstm.trainable_filter`). The sigmoid bias is fixed at
    -log(context_length), so the output on a prefix is the prefix of the output.
    The gates `i`, `f` are accepted for interface compatibility and ignored.
    """

    config: mLSTMBackendAttentionConfig = eqx.field(static=True)
    qk_head_dim: int = eqx.field(static=True)
    freqs_sin: Float[Array, "context half"]
    freqs_cos: Float[Array, "context half"]

    config_class: ClassVar[type] = mLSTMBackendAttentionConfig
    buffer_fields: ClassVar[tuple[str, ...]] = ("freqs_sin", "freqs_cos")

    def __init__(self, config: mLSTMBackendAttentionConfig, qk_head_dim: int):
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
        if not isinstance(qk_head_dim, int) or qk_head_dim < 2:
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

    @typechecked
    def __call__(
        self,
        q: Float[Array, "*batch seq dqk"],
        k: Float[Array, "*batch seq dqk"],
        v: Float[Array, "*batch seq dv"],
        i: Shaped[Array, "..."] | None = None,
        f: Shaped[Array, "..."] | None = None,
        c_initial: Shaped[Array, "..."] | None = None,
        n_initial: Shaped[Array, "..."] | None = None,
        m_initial: Shaped[Array, "..."] | None = None,
        return_last_states: bool = False,
    ) -> (
        Float[Array, "*batch seq dv"]
        | tuple[Float[Array, "*batch seq dv"], tuple[Array, Array, Array]]
    ):
        """**Arguments:**

        - `q`, `k`: `(*batch, S, qk_head_dim)`; S plus the positions already in the
            state must not exceed `context_length`.
        - `v`: `(*batch, S, DV)`, same dtype as `q` and `k`.
        - `i`, `f`: gate pre-activations, ignored.
        - `c_initial`, `n_initial`, `m_initial`: a state returned by this backend, to
            continue from (all three or none).
        - `return_last_states`: also return the state after these positions.

        **Returns:**

        `h` of shape `(*batch, S, DV)` in the inputs' dtype, or `(h, (c, n, m))`.
        """
        decoding = _given_states(c_initial, n_initial, m_initial)
        *batch_shape, seq_len, head_dim = q.shape
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
        dtype = resolve_dtype(q, k, v, None)
        options = dict(
            activation=self.config.activation_function,
            pre_activation=self.config.qk_pre_activation_function,
        )
        freqs_sin = jax.lax.stop_gradient(self.freqs_sin)
        freqs_cos = jax.lax.stop_gradient(self.freqs_cos)
        if decoding:
            state = (c_initial, n_initial, m_initial)
            check_state(
                state,
                tuple(batch_shape),
                options["activation"],
                context_length,
                head_dim,
                v.shape[-1],
            )
            h, state = decode(
                q,
                k,
                v,
                state,
                freqs_sin=freqs_sin,
                freqs_cos=freqs_cos,
                sigmoid_bias=self.sigmoid_bias,
                dtype=dtype,
                **options,
            )
            return (h, state) if return_last_states else h
        sin, cos = freqs_sin[:seq_len], freqs_cos[:seq_len]
        h = attention_core(
            q,
            k,
            v,
            None,
            dtype=dtype,
            activation_function=options["activation"],
            qk_pre_activation_function=options["pre_activation"],
            sin=sin,
            cos=cos,
            sigmoid_bias=self.sigmoid_bias,
            implementation=self.config.implementation,
        )
        if not return_last_states:
            return h
        return h, prompt_state(k, v, sin=sin, cos=cos, context_length=context_length, **options)

    @property
    def sigmoid_bias(self) -> float:
        """-log(context_length): fixed, so chunks and prefixes agree with the whole."""
        return -math.log(self.config.context_length)
