"""`attention`: causal attention with rotary embeddings, the maths of the mLSTM
attention backend. Validates the inputs, builds the call's spec, and hands it to
dispatch."""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Integer

from . import dispatch
from .implementations import Implementation
from .nn.rope import rope_tables
from .spec import (
    ACTIVATIONS,
    PRE_ACTIVATIONS,
    build_spec,
    check_array_bias,
    check_kv_heads,
    check_option,
    check_segment_ids,
    check_window,
    real_number,
    resolve_dtype,
)
from .typecheck import typechecked

ArrayLike = Array | np.ndarray


@typechecked
def attention(
    queries: Float[ArrayLike, "*batch seq dqk"],
    keys: Float[ArrayLike, "*kv_batch seq dqk"],
    values: Float[ArrayLike, "*kv_batch seq dv"],
    attention_mask: Bool[ArrayLike, "seq seq"] | None = None,
    qkv_dtype: DTypeLike | None = None,
    activation_function: str = "softmax",
    qk_pre_activation_function: str = "none",
    theta: numbers.Real = 1e4,
    *,
    sigmoid_bias: numbers.Real | Float[ArrayLike, "..."] | None = None,
    implementation: str | Implementation | None = None,
    segment_ids: Integer[ArrayLike, "*segment_batch seq"] | None = None,
    sliding_window: numbers.Integral | None = None,
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
    gives a zero output. Softmax statistics are kept in float32 (float64 for float64
    inputs).

    **Arguments:**

    - `queries`: `(*batch, S, DQK)`, DQK even; JAX or NumPy arrays.
    - `keys`, `values`: `(*batch, S, DQK)` and `(*batch, S, DV)`; for grouped-query
        (or multi-query) heads, with fewer heads on axis -3 than `queries` (a divisor
        of their count): query head h reads key/value head `h // (H / Hkv)`.
    - `attention_mask`: bool `(S, S)`, True = attend, shared by all leading axes.
        `None` (default) means causal.
    - `qkv_dtype`: dtype to cast q, k, v to. Without it they must share a dtype.
    - `activation_function`: `"softmax"`, `"sigmoid"` or `"none"`.
    - `qk_pre_activation_function`: `"none"`, `"swish"` or `"silu"` (the same).
    - `theta`: RoPE wavelength base, a number > 0.
    - `sigmoid_bias`: the bias $b$ of `"sigmoid"`; default $-\log S$. A float array
        broadcasting against the batch axes (e.g. `(heads,)`) is a learnable bias: it
        receives a gradient (the reference, chunked and Triton paths; Mosaic and cuDNN
        take numbers).
    - `segment_ids`: int `(S,)` or `(*batch, S)` (size 1 on shared axes): packed
        sequences. A query sees only keys of its own segment, a run of equal ids,
        and RoPE positions restart at each segment's start, so each packed document's
        output equals that document alone (with a fixed `sigmoid_bias`). Causal only.
    - `sliding_window`: w >= 1: key j is visible from query i when i - w < j <= i.
        Causal only; combines with `segment_ids`.
    - `implementation`: `None` picks the best path for platform, dtype and shape
        (`eqx_xlstm.dispatch.DEFAULTS`); a name forces one: `"reference"` (S x S
        weights, like the upstream), `"chunked"` (blockwise, memory linear in S),
        `"linear"` (causal 'none' as linear attention, O(S D^2)), `"cudnn"` (causal
        softmax in fp16/bf16 on an NVIDIA GPU), `"triton"` (Pallas flash kernels for
        causal attention; fp16/bf16 on a GPU, interpret mode elsewhere), `"mosaic"`
        (Mosaic GPU kernels on Hopper; interpret mode on a CPU), `"tiles_or_linear"`
        (causal 'none' with `segment_ids`: the Mosaic kernels where the documents are
        short, the linear form where long, chosen at run time), or `"pallas"` (the
        first of "mosaic" and "triton" that serves). An
        `eqx_xlstm.implementations.Implementation` instance runs with its own tuning.
        A forced path that cannot serve the inputs raises a ValueError saying why.

    **Returns:**

    `(*batch, S, DV)` in the qkv dtype.
    """
    check_option(activation_function, ACTIVATIONS, "activation_function")
    check_option(qk_pre_activation_function, PRE_ACTIVATIONS, "qk_pre_activation_function")
    implementation = dispatch.check_implementation(implementation)
    queries, keys, values = (jnp.asarray(x) for x in (queries, keys, values))
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
    dtype = resolve_dtype(queries, keys, values, qkv_dtype)
    seq_len, head_dim = queries.shape[-2:]
    kv_groups = check_kv_heads(queries, keys, values)
    causal = attention_mask is None
    window = check_window(sliding_window, causal)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
    segment_ids = check_segment_ids(segment_ids, queries.shape[:-2], seq_len, kv_groups, causal)
    bias = None
    if isinstance(sigmoid_bias, (jax.Array, np.ndarray)):
        bias = check_array_bias(jnp.asarray(sigmoid_bias), queries.shape[:-2], activation_function)
        sigmoid_bias = 0.0  # the array is added to the logits instead
    if sigmoid_bias is None:
        sigmoid_bias = -math.log(seq_len) if seq_len > 0 else 0.0
    spec = build_spec(
        queries,
        values,
        dtype=dtype,
        activation=activation_function,
        pre_activation=qk_pre_activation_function,
        causal=causal,
        sigmoid_bias=real_number(sigmoid_bias, "sigmoid_bias"),
        window=window,
        segmented=segment_ids is not None,
        kv_groups=kv_groups,
        array_bias=bias is not None,
    )
    sin, cos = rope_tables(seq_len, head_dim, None, None, theta, dtype=spec.accum_dtype)
    chosen = dispatch.plan(spec, implementation)
    return dispatch.run(
        queries, keys, values, attention_mask, sin, cos, spec, chosen, segment_ids, bias
    )
