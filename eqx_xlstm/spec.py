"""What one attention call computes, as a frozen, hashable record; and the checks
that turn user input into it."""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

ACTIVATIONS = ("softmax", "sigmoid", "none")
PRE_ACTIVATIONS = ("none", "swish", "silu")
MASKS = ("causal", "explicit", "full")
HALF_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def check_option(value: object, valid: tuple[str, ...], name: str) -> str:
    """Return `value` if it is one of `valid`, else raise a ValueError listing them."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(
            f"Unknown {name} {value!r}; valid values are " + ", ".join(repr(v) for v in valid) + "."
        )
    return value


def canonical_pre_activation(name: str) -> str:
    """A valid pre-activation name as the spec holds it: "silu" is "swish"."""
    return "swish" if name == "silu" else name


def real_number(value: object, name: str) -> float:
    """`value` (a Python or NumPy real number, not a bool) as a finite float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return value


def whole_number(value: object, name: str) -> int:
    """`value` (a Python or NumPy integer, not a bool) as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    return int(value)


def resolve_dtype(queries, keys, values, qkv_dtype) -> np.dtype:
    """The dtype q, k and v are computed in; a TypeError if it is ambiguous."""
    if qkv_dtype is not None:
        try:
            dtype = np.dtype(qkv_dtype)
        except TypeError as err:
            raise TypeError(f"`qkv_dtype` is not a dtype: {qkv_dtype!r}.") from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`qkv_dtype` must be a floating dtype, got {dtype}.")
        return jax.dtypes.canonicalize_dtype(dtype)
    dtypes = {"queries": queries.dtype, "keys": keys.dtype, "values": values.dtype}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{name}={dt}" for name, dt in dtypes.items())
        raise TypeError(
            f"queries, keys and values must share a dtype, got {got}. Cast them, or "
            "pass qkv_dtype=... to compute in one dtype."
        )
    dtype = np.dtype(queries.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"queries, keys and values must be floating point, got {dtype}.")
    return dtype


def accumulation_dtype(*dtypes) -> np.dtype:
    """Float32 for 16-bit and float32 inputs, float64 if any input is float64 (x64 on):
    the dtype RoPE, logits, weights and sums are computed in."""
    wide = any(np.dtype(dt).itemsize > 4 for dt in dtypes)
    return np.dtype(np.float64) if wide else np.dtype(np.float32)


def default_device() -> tuple[str, str | None]:
    """`(platform, GPU compute capability or None)` of JAX's default device."""
    platform = jax.default_backend()
    capability = None
    if platform == "gpu":
        capability = str(getattr(jax.devices()[0], "compute_capability", "")) or None
    return platform, capability


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Everything about one attention call except the arrays: built once by
    `attention` or the backend, read by dispatch and by every implementation.
    Hashable, so it can be a static argument of `jax.jit`."""

    activation: str
    """`"softmax"`, `"sigmoid"` or `"none"`."""
    pre_activation: str
    """`"none"` or `"swish"` (`"silu"` arrives as `"swish"`)."""
    mask: str
    """`"causal"`, `"explicit"` for a bool `(S, S)` mask array, or `"full"` (every key
    visible: the off-diagonal pieces of context-parallel attention)."""
    dtype: DTypeLike
    """The dtype q, k, v are computed in and the output is returned in (stored as a
    `numpy.dtype`)."""
    batch_shape: tuple[int, ...]
    seq_len: int
    dqk: int
    dv: int
    sigmoid_bias: float
    """The bias added to the logits before `"sigmoid"`."""
    platform: str = "cpu"
    """Where the call runs: `"cpu"`, `"gpu"` or `"tpu"`."""
    gpu_capability: str | None = None
    """The GPU's compute capability (`"9.0"` on Hopper), when `platform == "gpu"`."""
    window: int | None = None
    """Sliding window w (causal only): key j is visible from query i when
    `i - w < j <= i`; None: no window."""
    segmented: bool = False
    """Packed sequences (causal only): a query sees only keys of its own segment, a
    run of equal segment ids, and RoPE positions restart at each segment's start."""
    kv_groups: int = 1
    """Grouped-query heads: query heads per key/value head. With G > 1, dispatch hands
    implementations q of batch shape `(*b, Hkv, G)` and k, v of `(*b, Hkv, 1)`."""
    array_bias: bool = False
    """The sigmoid bias is an array (learnable, per head or row), not `sigmoid_bias`:
    implementations that take it (`Implementation.takes_bias`) get it as `bias=`;
    for the others dispatch appends it to each query as one more feature, and a 1 to
    each key, so `q . k * scale` gains it; `dqk` (and the scale) stay those of the
    inputs."""

    def __post_init__(self):
        check_option(self.activation, ACTIVATIONS, "activation")
        check_option(self.pre_activation, ("none", "swish"), "pre_activation")
        check_option(self.mask, MASKS, "mask")
        if (self.window is not None or self.segmented) and self.mask != "causal":
            raise ValueError("sliding windows and segments go with the causal mask only")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "batch_shape", tuple(int(n) for n in self.batch_shape))
        object.__setattr__(self, "sigmoid_bias", float(self.sigmoid_bias))

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @property
    def bounded(self) -> bool:
        """Whether queries see a bounded range of the earlier keys (a sliding window or
        segments): then implementations get each query's first visible key."""
        return self.window is not None or self.segmented

    @property
    def scale(self) -> float:
        """1 / sqrt(DQK), the logits' scale."""
        return self.dqk**-0.5

    @property
    def accum_dtype(self) -> np.dtype:
        """The dtype of RoPE, logits, weights and sums (`accumulation_dtype`)."""
        return accumulation_dtype(self.dtype)

    @property
    def half(self) -> bool:
        """Whether q, k, v are float16 or bfloat16."""
        return self.dtype in HALF_DTYPES

    @property
    def rows(self) -> int:
        """The number of independent (query, key, value) sequences: prod(batch_shape)."""
        return math.prod(self.batch_shape)

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)


def build_spec(
    queries,
    values,
    *,
    dtype,
    activation: str,
    pre_activation: str,
    causal: bool,
    sigmoid_bias: float,
    window: int | None = None,
    segmented: bool = False,
    kv_groups: int = 1,
    array_bias: bool = False,
) -> AttentionSpec:
    """The spec of a call on these (validated) inputs, on the default device."""
    *batch_shape, seq_len, dqk = queries.shape
    platform, capability = default_device()
    return AttentionSpec(
        activation=activation,
        pre_activation=canonical_pre_activation(pre_activation),
        mask="causal" if causal else "explicit",
        dtype=dtype,
        batch_shape=tuple(batch_shape),
        seq_len=seq_len,
        dqk=dqk,
        dv=values.shape[-1],
        sigmoid_bias=sigmoid_bias,
        platform=platform,
        gpu_capability=capability,
        window=window,
        segmented=segmented,
        kv_groups=kv_groups,
        array_bias=array_bias,
    )


def check_kv_heads(queries, keys, values) -> int:
    """How many query heads share each key/value head (1 unless keys and values have
    fewer heads, axis -3, than queries); a ValueError naming the argument otherwise."""
    for name, x in (("keys", keys), ("values", values)):
        if x.ndim != queries.ndim or x.shape[-2] != queries.shape[-2]:
            raise ValueError(
                f"`{name}` {x.shape} must have the rank and sequence length of `queries` "
                f"{queries.shape}."
            )
    if keys.shape[:-1] != values.shape[:-1]:
        raise ValueError(
            f"`keys` {keys.shape} and `values` {values.shape} must agree on every axis but "
            "the last."
        )
    if keys.shape[:-3] != queries.shape[:-3] or keys.shape[-1] != queries.shape[-1]:
        raise ValueError(
            f"`keys` {keys.shape} must match `queries` {queries.shape} on every axis but "
            "the heads axis (-3)."
        )
    if keys.shape[:-2] == queries.shape[:-2]:
        return 1
    heads, kv_heads = queries.shape[-3], keys.shape[-3]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"Grouped-query heads: `keys` and `values` have {kv_heads} heads (axis -3), which "
            f"must divide the {heads} heads of `queries`."
        )
    return heads // kv_heads


def check_window(sliding_window: object, causal: bool) -> int | None:
    """`sliding_window` as an int >= 1 or None; a TypeError/ValueError naming it."""
    if sliding_window is None:
        return None
    window = whole_number(sliding_window, "sliding_window")
    if window < 1:
        raise ValueError(f"`sliding_window` must be >= 1, got {window}.")
    if not causal:
        raise ValueError(
            "`sliding_window` goes with the causal mask (attention_mask=None); with an "
            "explicit mask, put the window into the mask."
        )
    return window


def check_segment_ids(segment_ids, batch_shape: tuple, seq_len: int, kv_groups: int, causal: bool):
    """`segment_ids` validated: integers of shape `(S,)` or `(*batch, S)` (each leading
    axis q's size or 1; the heads axis 1 with grouped-query heads); a TypeError or
    ValueError naming it otherwise."""
    if segment_ids is None:
        return None
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"`segment_ids` must be integers, got {segment_ids.dtype}.")
    shape = segment_ids.shape
    wanted = f"(S,) or (*batch, S) = {(*batch_shape, seq_len)} with 1 for any axis shared"
    if not shape or shape[-1] != seq_len:
        raise ValueError(f"`segment_ids` {shape} must be {wanted}.")
    leading = shape[:-1]
    if leading and (
        len(leading) != len(batch_shape)
        or any(n not in (1, b) for n, b in zip(leading, batch_shape))
    ):
        raise ValueError(
            f"`segment_ids` {shape} must be {wanted} (for example `ids[:, None, :]` for "
            "ids of shape (batch, S) and queries of (batch, heads, S, D))."
        )
    if leading and kv_groups > 1 and leading[-1] != 1:
        raise ValueError(
            f"`segment_ids` {shape}: with grouped-query heads its heads axis (-2) must be 1."
        )
    if not causal:
        raise ValueError(
            "`segment_ids` go with the causal mask (attention_mask=None); with an explicit "
            "mask, put the segments into the mask."
        )
    return segment_ids


def check_array_bias(bias, batch_shape: tuple, activation: str):
    """A sigmoid bias given as an array: float, broadcasting against the batch axes
    (e.g. `(heads,)` for one per head); a TypeError/ValueError naming it otherwise."""
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"`sigmoid_bias` as an array must be floating point, got {bias.dtype}.")
    try:
        shape = np.broadcast_shapes(bias.shape, tuple(batch_shape))
    except ValueError:
        shape = None
    if shape != tuple(batch_shape):
        raise ValueError(
            f"`sigmoid_bias` of shape {bias.shape} must broadcast against the batch axes "
            f"{tuple(batch_shape)} (for example `(heads,)`)."
        )
    if activation != "sigmoid":
        raise ValueError("`sigmoid_bias` as an array goes with activation_function='sigmoid'.")
    return bias
