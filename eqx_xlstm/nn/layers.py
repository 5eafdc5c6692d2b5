"""Layers built around an mLSTM backend: a multi-head mixer, a block, a language model."""

import dataclasses
import math
import numbers
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import explicit_mode
from ..spec import real_number, whole_number
from ..typecheck import typechecked
from .backend import mLSTMBackend
from .decoding import DecodingState
from .registry import backend_class


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A small xLSTM-style causal language model.

    `backend_config` is the backend's config (for "attention", an
    `mLSTMBackendAttentionConfig`); its `context_length` is filled in from this config
    by `assign_model_config_params`. Omitted, the backend's defaults are used.
    """

    vocab_size: numbers.Integral
    context_length: numbers.Integral
    embedding_dim: numbers.Integral = 128
    num_heads: numbers.Integral = 4
    num_blocks: numbers.Integral = 2
    num_kv_heads: numbers.Integral | None = None
    """Key/value heads (grouped-query attention): a divisor of num_heads; each serves
    num_heads / num_kv_heads query heads, and the decoding state holds only these.
    Default: num_heads."""
    qk_head_dim: numbers.Integral | None = None
    """Per-head query/key size; default embedding_dim // num_heads."""
    v_head_dim: numbers.Integral | None = None
    """Per-head value size; default embedding_dim // num_heads."""
    ffn_factor: numbers.Integral = 4
    backend: str = "attention"
    backend_config: Any = None
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (a learnt scale per feature) before
    swish and RoPE: bounds the logits, which sigmoid attention needs to train stably
    at larger widths and learning rates (QK-norm)."""
    layer_scale: numbers.Real | None = None
    """Scale each residual branch by a learnt per-channel vector starting at this value
    (LayerScale; e.g. 0.1): the blocks start close to the identity. None: off."""
    post_norm: bool = False
    """Also LayerNorm each branch's output before it joins the residual stream (hybrid
    pre/post norm): keeps the stream's scale in check in deep stacks."""
    learned_sigmoid_bias: bool = False
    """A learnt sigmoid bias per head, starting at -log(context_length), instead of the
    fixed one (sigmoid attention only)."""

    def __post_init__(self):
        sizes = ("vocab_size", "context_length", "embedding_dim", "num_heads", "num_blocks")
        for name in (*sizes, "num_kv_heads", "qk_head_dim", "v_head_dim", "ffn_factor"):
            value = getattr(self, name)
            if value is None and name not in sizes:
                continue
            try:
                value = whole_number(value, name)
            except TypeError:
                value = 0
            if value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, value)
        if self.embedding_dim % self.num_heads and None in (self.qk_head_dim, self.v_head_dim):
            raise ValueError(
                f"embedding_dim={self.embedding_dim} is not divisible by num_heads="
                f"{self.num_heads}; set qk_head_dim and v_head_dim explicitly."
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_kv_heads`={self.num_kv_heads} must divide num_heads={self.num_heads}."
            )
        for name in ("qk_norm", "post_norm", "learned_sigmoid_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.layer_scale is not None:
            scale = real_number(self.layer_scale, "layer_scale")
            if scale <= 0:
                raise ValueError(f"`layer_scale` must be > 0 or None, got {scale}.")
            object.__setattr__(self, "layer_scale", scale)
        cls = backend_class(self.backend)
        if self.backend_config is not None and not isinstance(
            self.backend_config, cls.config_class
        ):
            raise TypeError(
                f"`backend_config` for backend {self.backend!r} must be a "
                f"{cls.config_class.__name__}, got {type(self.backend_config).__name__}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-serialisable data, from which `from_dict` rebuilds it
        (checkpoint headers hold it, so a checkpoint can rebuild its model)."""
        data = dataclasses.asdict(self)
        if self.backend_config is not None:
            data["backend_config"] = self.backend_config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        backend_config = data.get("backend_config")
        if backend_config is not None:
            config_class = backend_class(data.get("backend", "attention")).config_class
            data["backend_config"] = config_class.from_dict(backend_config)
        return cls(**data)

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_dims(self) -> tuple[int, int]:
        default = self.embedding_dim // self.num_heads
        return self.qk_head_dim or default, self.v_head_dim or default

    def make_backend(self) -> mLSTMBackend:
        """The configured backend, with context_length taken from this config."""
        cls = backend_class(self.backend)
        config = self.backend_config if self.backend_config is not None else cls.config_class()
        config = config.assign_model_config_params(self)
        return cls(config, qk_head_dim=self.head_dims[0])


def _linear_seq(layer: eqx.nn.Linear, x: Array) -> Array:
    return jax.vmap(layer)(x)


class MultiHeadMixer(eqx.Module):
    """Projects a sequence to per-head q, k, v and gates, mixes each head with the
    backend (vmapped over heads when the backend allows), and projects back."""

    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    gate_proj: eqx.nn.Linear
    out_proj: eqx.nn.Linear
    backend: mLSTMBackend
    q_norm: eqx.nn.RMSNorm | None
    k_norm: eqx.nn.RMSNorm | None
    sigmoid_bias: Float[Array, " heads"] | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        dqk, dv = config.head_dims
        nh, emb = config.num_heads, config.embedding_dim
        kq, kk, kv, kg, ko = jax.random.split(key, 5)
        self.q_proj = eqx.nn.Linear(emb, nh * dqk, use_bias=False, key=kq)
        nkv = config.kv_heads
        self.k_proj = eqx.nn.Linear(emb, nkv * dqk, use_bias=False, key=kk)
        self.v_proj = eqx.nn.Linear(emb, nkv * dv, use_bias=False, key=kv)
        self.gate_proj = eqx.nn.Linear(emb, 2 * nh, key=kg)
        self.out_proj = eqx.nn.Linear(nh * dv, emb, use_bias=False, key=ko)
        self.backend = config.make_backend()
        self.sigmoid_bias = None
        if config.learned_sigmoid_bias:
            self.sigmoid_bias = jnp.full(nh, -math.log(config.context_length))
        self.q_norm = eqx.nn.RMSNorm(dqk) if config.qk_norm else None
        self.k_norm = eqx.nn.RMSNorm(dqk) if config.qk_norm else None
        self.num_heads = nh
        self.num_kv_heads = nkv

    @typechecked
    def __call__(
        self, x: Float[Array, "seq embed"], segment_ids: Int[Array, " seq"] | None = None
    ) -> Float[Array, "seq embed"]:
        """`segment_ids`: packed sequences (each position sees only its own segment,
        a run of equal ids; RoPE positions restart at each)."""
        return self._mix(x, None, want_state=False, segment_ids=segment_ids)

    @typechecked
    def decode(
        self, x: Float[Array, "seq embed"], state: DecodingState | None = None
    ) -> tuple[Float[Array, "seq embed"], DecodingState]:
        """Like `__call__`, continuing from the backend `state` of every head (heads on
        its leading axis; None to start); returns the output and the new state."""
        return self._mix(x, state, want_state=True)

    def _mix(self, x, state, want_state, segment_ids=None):
        seq_len = x.shape[0]

        def heads(layer, count):  # (seq, count * d) -> (count, seq, d)
            return _linear_seq(layer, x).reshape(seq_len, count, -1).transpose(1, 0, 2)

        q = heads(self.q_proj, self.num_heads)
        k, v = heads(self.k_proj, self.num_kv_heads), heads(self.v_proj, self.num_kv_heads)
        if self.q_norm is not None:  # per head and position, over the features
            q, k = (jax.vmap(jax.vmap(n))(x) for n, x in ((self.q_norm, q), (self.k_norm, k)))
        i, f = jnp.moveaxis(_linear_seq(self.gate_proj, x).reshape(seq_len, 2, -1), 0, -1)

        def run(q, k, v, i, f, state, bias):
            # Options only when used, so that other backends need not know them.
            options = {} if bias is None else {"sigmoid_bias": bias}
            if segment_ids is not None:  # parallel calls only
                return self.backend(q, k, v, i, f, segment_ids=segment_ids, **options)
            return self.backend(
                q, k, v, i, f, return_last_states=want_state, state=state, **options
            )

        bias = self.sigmoid_bias
        groups = self.num_heads // self.num_kv_heads
        if self.backend.can_vmap_over_heads:
            if groups > 1:  # one call per key/value head: q (G, S, d), k and v (1, S, d)
                q, i, f = (x.reshape(self.num_kv_heads, groups, *x.shape[1:]) for x in (q, i, f))
                k, v = k[:, None], v[:, None]
                bias = None if bias is None else bias.reshape(self.num_kv_heads, groups)
            out = eqx.filter_vmap(run)(q, k, v, i, f, state, bias)
        else:
            out = run(q, k, v, i, f, state, bias)
        h, state = out if want_state else (out, None)
        h = h.reshape(self.num_heads, *h.shape[-2:])
        y = _linear_seq(self.out_proj, h.transpose(1, 0, 2).reshape(seq_len, -1))
        return (y, state) if want_state else y


class Block(eqx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)); with the
    config's `post_norm` each branch's output is normalised too, and with
    `layer_scale` scaled by a learnt per-channel vector."""

    mixer_norm: eqx.nn.LayerNorm
    mixer: MultiHeadMixer
    ffn_norm: eqx.nn.LayerNorm
    ffn_up: eqx.nn.Linear
    ffn_down: eqx.nn.Linear
    mixer_post_norm: eqx.nn.LayerNorm | None
    ffn_post_norm: eqx.nn.LayerNorm | None
    mixer_scale: Float[Array, " embed"] | None
    ffn_scale: Float[Array, " embed"] | None

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        km, ku, kd = jax.random.split(key, 3)
        emb = config.embedding_dim
        self.mixer_norm = eqx.nn.LayerNorm(emb)
        self.mixer = MultiHeadMixer(config, key=km)
        self.ffn_norm = eqx.nn.LayerNorm(emb)
        self.ffn_up = eqx.nn.Linear(emb, config.ffn_factor * emb, key=ku)
        self.ffn_down = eqx.nn.Linear(config.ffn_factor * emb, emb, key=kd)
        post = lambda: eqx.nn.LayerNorm(emb) if config.post_norm else None
        self.mixer_post_norm, self.ffn_post_norm = post(), post()
        scale = lambda: None if config.layer_scale is None else jnp.full(emb, config.layer_scale)
        self.mixer_scale, self.ffn_scale = scale(), scale()

    @typechecked
    def __call__(
        self, x: Float[Array, "seq embed"], segment_ids: Int[Array, " seq"] | None = None
    ) -> Float[Array, "seq embed"]:
        mixed = self.mixer(jax.vmap(self.mixer_norm)(x), segment_ids)
        return self._feed_forward(x + self._branch(mixed, self.mixer_post_norm, self.mixer_scale))

    @typechecked
    def decode(
        self, x: Float[Array, "seq embed"], state: DecodingState | None = None
    ) -> tuple[Float[Array, "seq embed"], DecodingState]:
        """`__call__` continuing from the mixer's `state`; returns `(y, new_state)`."""
        mixed, state = self.mixer.decode(jax.vmap(self.mixer_norm)(x), state)
        mixed = self._branch(mixed, self.mixer_post_norm, self.mixer_scale)
        return self._feed_forward(x + mixed), state

    @staticmethod
    def _branch(y, post_norm, scale):
        """A residual branch's output as it joins the stream."""
        if post_norm is not None:
            y = jax.vmap(post_norm)(y)
        return y if scale is None else y * scale.astype(y.dtype)

    def _feed_forward(self, x):
        hidden = jax.nn.gelu(_linear_seq(self.ffn_up, jax.vmap(self.ffn_norm)(x)))
        out = _linear_seq(self.ffn_down, hidden)
        return x + self._branch(out, self.ffn_post_norm, self.ffn_scale)


class LanguageModel(eqx.Module):
    """Embedding -> blocks -> norm -> vocabulary head, on one token sequence."""

    embedding: eqx.nn.Embedding
    blocks: tuple[Block, ...]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        ke, kh, *kb = jax.random.split(key, 2 + config.num_blocks)
        self.embedding = eqx.nn.Embedding(config.vocab_size, config.embedding_dim, key=ke)
        self.blocks = tuple(Block(config, key=k) for k in kb)
        self.norm = eqx.nn.LayerNorm(config.embedding_dim)
        self.head = eqx.nn.Linear(config.embedding_dim, config.vocab_size, use_bias=False, key=kh)
        self.config = config

    @typechecked
    def __call__(
        self, tokens: Int[Array, " seq"], segment_ids: Int[Array, " seq"] | None = None
    ) -> Float[Array, "seq vocab"]:
        """Next-token logits for every position of `tokens` (length <= context_length).
        `segment_ids`: packed documents, each position seeing only its own document
        (a run of equal ids), with RoPE positions restarting at each."""
        self._check_length(tokens.shape[0], "tokens")
        self._check_ids(tokens, "tokens")
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x, segment_ids)
        return self._logits(x)

    def _embed(self, tokens):
        """The embedding of each token. Tokens typed as sharded (JAX's explicit sharding
        mode) give embeddings sharded alike, which JAX asks the lookup to say."""
        typed = explicit_mode.typed_spec(tokens)
        if typed is None:
            return jax.vmap(self.embedding)(tokens)
        return self.embedding.weight.at[tokens].get(out_sharding=PartitionSpec(*typed, None))

    @typechecked
    def decode(
        self, tokens: Int[Array, " seq"], states: tuple[DecodingState, ...] | None = None
    ) -> tuple[Float[Array, "seq vocab"], tuple[DecodingState, ...]]:
        """Logits for `tokens` that continue the sequence held in `states` (one state
        per block, as returned by the previous call; None to start)."""
        self._check_ids(tokens, "tokens")
        x = self._embed(tokens)
        states = (None,) * len(self.blocks) if states is None else states
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block.decode(x, state)
            new_states.append(state)
        return self._logits(x), tuple(new_states)

    def generate(
        self,
        prompt: Int[Array, " prompt"],
        n_tokens: int,
        key: PRNGKeyArray,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> Int[Array, " n_tokens"]:
        """Sample `n_tokens` tokens after `prompt`, reusing the decoding state (each
        step costs one position, not the whole sequence). Jittable with `n_tokens`,
        `temperature` and `top_k` static (`eqx.filter_jit` does this).

        `temperature=0` is greedy; `top_k` keeps the k most likely tokens.
        """
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, numbers.Integral) or n_tokens < 1:
            raise ValueError(f"`n_tokens` must be a positive int, got {n_tokens!r}.")
        n_tokens = int(n_tokens)
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {temperature}.")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"`top_k` must be in 1..{self.config.vocab_size}, got {top_k}.")
        if prompt.shape[0] < 1:
            raise ValueError("`prompt` must hold at least one token to continue from.")
        self._check_length(prompt.shape[0] + n_tokens - 1, "prompt plus n_tokens - 1")

        def sample(logits, key):
            if temperature == 0:
                return jnp.argmax(logits).astype(prompt.dtype)
            logits = logits / temperature
            if top_k is not None:
                kth = jnp.sort(logits)[-top_k]
                logits = jnp.where(logits >= kth, logits, -jnp.inf)
            return jax.random.categorical(key, logits).astype(prompt.dtype)

        keys = jax.random.split(key, n_tokens)
        logits, states = self.decode(prompt)
        first = sample(logits[-1], keys[0])

        def step(carry, key):
            token, states = carry
            logits, states = self.decode(token[None], states)
            return (sample(logits[0], key), states), token

        (last, _), tokens = jax.lax.scan(step, (first, states), keys[1:])
        return jnp.concatenate([tokens, last[None]])

    def _check_ids(self, tokens, what: str) -> None:
        """A ValueError for token ids outside the vocabulary, when they are concrete
        (eager calls). Under `jax.jit` they are not known while tracing; there JAX's
        indexing clamps them to the vocabulary (README, "Layers and models")."""
        if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
            return
        values = np.asarray(tokens)  # NumPy: inside a trace a jnp reduction would stage
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"`{what}` holds ids from {low} to {high}, outside the vocabulary "
                f"0..{self.config.vocab_size - 1}."
            )

    def _check_length(self, length: int, what: str) -> None:
        if length > self.config.context_length:
            raise ValueError(
                f"{what} has {length} positions, more than the model's "
                f"context_length={self.config.context_length}."
            )

    def _logits(self, x):
        return _linear_seq(self.head, jax.vmap(self.norm)(x))
