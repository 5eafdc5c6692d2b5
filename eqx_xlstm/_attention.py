"""Causal attention with rotary embeddings: the maths of the mLSTM attention backend."""

import math

import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float

from ._dispatch import check_implementation, run_implementation, select_implementation
from ._options import ACTIVATIONS, PRE_ACTIVATIONS, check_option
from ._rope import rope_tables
from ._typecheck import typechecked


def resolve_dtype(queries: Array, keys: Array, values: Array, qkv_dtype) -> jnp.dtype:
    """The dtype q, k and v are computed in; a TypeError if it is ambiguous."""
    if qkv_dtype is not None:
        try:
            dtype = jnp.dtype(qkv_dtype)
        except TypeError as err:
            raise TypeError(f"`qkv_dtype` is not a dtype: {qkv_dtype!r}.") from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`qkv_dtype` must be a floating dtype, got {dtype}.")
        return dtype
    dtypes = {"queries": queries.dtype, "keys": keys.dtype, "values": values.dtype}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{name}={dt}" for name, dt in dtypes.items())
        raise TypeError(
            f"queries, keys and values must share a dtype, got {got}. Cast them, or "
            "pass qkv_dtype=... to compute in one dtype."
        )
    dtype = queries.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"queries, keys and values must be floating point, got {dtype}.")
    return dtype


def attention_core(
    queries: Array,
    keys: Array,
    values: Array,
    attention_mask: Array | None,
    *,
    dtype: jnp.dtype,
    activation_function: str,
    qk_pre_activation_function: str,
    sin: Array,
    cos: Array,
    sigmoid_bias: float,
    implementation: str | None,
) -> Array:
    """Shared by `attention` and the backend module, after validation."""
    name = select_implementation(
        implementation,
        activation=activation_function,
        causal=attention_mask is None,
        dtype=dtype,
        seq_len=queries.shape[-2],
        dqk=queries.shape[-1],
        dv=values.shape[-1],
    )
    return run_implementation(
        name,
        queries,
        keys,
        values,
        attention_mask,
        sin,
        cos,
        activation=activation_function,
        pre_activation=qk_pre_activation_function,
        sigmoid_bias=sigmoid_bias,
        dtype=dtype,
    )


@typechecked
def attention(
    queries: Float[Array, "*batch seq dqk"],
    keys: Float[Array, "*batch seq dqk"],
    values: Float[Array, "*batch seq dv"],
    attention_mask: Bool[Array, "seq seq"] | None = None,
    qkv_dtype: DTypeLike | None = None,
    activation_function: str = "softmax",
    qk_pre_activation_function: str = "none",
    theta: float = 1e4,
    *,
    sigmoid_bias: float | None = None,
    implementation: str | None = None,
) -> Float[Array, "*batch seq dv"]:
    r"""Attention with rotary embeddings, causal by default.

    For each batch index (every leading axis, heads included):

    1. optional swish on queries and keys: $q \leftarrow q\,\sigma(q)$;
    2. RoPE on queries and keys (interleaved pairs, wavelength base `theta`);
    3. logits $\ell_{ij} = q_i \cdot k_j / \sqrt{D_{qk}}$;
    4. weights: `"softmax"` over the allowed keys, `"sigmoid"`
       $\sigma(\ell_{ij} + b)$ with $b = -\log S$ by default, or `"none"` ($\ell_{ij}$);
    5. output $h_i = \sum_j w_{ij} v_j$.

    Masked positions get weight exactly 0 for every activation; a fully masked row
    gives a zero output. Softmax statistics are kept in float32.

    **Arguments:**

    - `queries`, `keys`: `(*batch, S, DQK)`, DQK even.
    - `values`: `(*batch, S, DV)`.
    - `attention_mask`: bool `(S, S)`, True = attend, shared by all leading axes.
        `None` (default) means causal.
    - `qkv_dtype`: dtype to cast q, k, v to. Without it they must share a dtype.
    - `activation_function`: `"softmax"`, `"sigmoid"` or `"none"`.
    - `qk_pre_activation_function`: `"none"`, `"swish"` or `"silu"` (the same).
    - `theta`: RoPE wavelength base, > 0.
    - `sigmoid_bias`: the bias $b$ of `"sigmoid"`; default $-\log S$.
    - `implementation`: `None` (the best path for platform, dtype and shape),
        `"reference"` (S x S weights, like the upstream), `"chunked"` (memory linear
        in S; for causal 'none' the chunkwise linear form), `"cudnn"` (causal
        softmax in fp16/bf16 on an NVIDIA GPU) or `"pallas"` (causal flash kernels
        for every activation with swish and RoPE fused in; fp16/bf16 on an NVIDIA
        GPU, interpret mode elsewhere). A forced path that cannot serve the
        inputs raises a ValueError saying why.

    **Returns:**

    `(*batch, S, DV)` in the qkv dtype.
    """
    check_option(activation_function, ACTIVATIONS, "activation_function")
    check_option(qk_pre_activation_function, PRE_ACTIVATIONS, "qk_pre_activation_function")
    implementation = check_implementation(implementation)
    dtype = resolve_dtype(queries, keys, values, qkv_dtype)
    seq_len, head_dim = queries.shape[-2:]
    sin, cos = rope_tables(seq_len, head_dim, None, None, theta)
    if sigmoid_bias is None:
        sigmoid_bias = -math.log(seq_len) if seq_len > 0 else 0.0
    return attention_core(
        queries,
        keys,
        values,
        attention_mask,
        dtype=dtype,
        activation_function=activation_function,
        qk_pre_activation_function=qk_pre_activation_function,
        sin=sin,
        cos=cos,
        sigmoid_bias=sigmoid_bias,
        implementation=implementation,
    )
