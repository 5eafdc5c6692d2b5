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

    def __post_init__(self):
        check_option(self.activation, ACTIVATIONS, "activation")
        check_option(self.pre_activation, ("none", "swish"), "pre_activation")
        check_option(self.mask, MASKS, "mask")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "batch_shape", tuple(int(n) for n in self.batch_shape))
        object.__setattr__(self, "sigmoid_bias", float(self.sigmoid_bias))

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

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
    )
