"""`context_parallel_attention`: `attention` for a sequence split over the devices of a
mesh axis, called inside `shard_map` on each device's shard."""

import math
import numbers

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike
from jaxtyping import Array, Float

from . import maths
from .implementations.base import SequenceLayout
from .implementations.linear import Linear
from .implementations.ring import BlockwisePieces, linear_prefix, ring_attention
from .implementations.triton import Triton, TritonPieces
from .nn.rope import check_even, check_theta
from .spec import (
    ACTIVATIONS,
    PRE_ACTIVATIONS,
    AttentionSpec,
    accumulation_dtype,
    canonical_pre_activation,
    check_option,
    default_device,
    real_number,
    resolve_dtype,
    whole_number,
)
from .typecheck import typechecked

LAYOUTS = ("contiguous", "zigzag")


def _device_count(axis_name) -> int:
    try:
        return lax.axis_size(axis_name)
    except (NameError, KeyError, ValueError) as err:
        raise ValueError(
            f"`axis_name`={axis_name!r} is not a mesh axis bound here: call "
            "context_parallel_attention inside `jax.shard_map` over that axis."
        ) from err


def _rope(x, starts, chunk_count, pre_activation, theta, accum):
    """Swish and RoPE on each chunk of `x` (equal parts, one per entry of `starts`, the
    chunks' traced global indices among `chunk_count`). The angle of position
    `start + i` is that of `start` plus that of `i`, each rounded once from float64,
    joined by the angle-sum identities: within a few float32 roundings at any length."""
    parts = len(starts)
    size, dim = x.shape[-2] // parts, x.shape[-1]
    inv_wavelength = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    tables = lambda positions: [
        jnp.asarray(f(np.outer(positions, inv_wavelength)), accum) for f in (np.sin, np.cos)
    ]
    sin_i, cos_i = tables(np.arange(size, dtype=np.float64))
    sin_starts, cos_starts = tables(np.arange(chunk_count, dtype=np.float64) * size)
    out = []
    for chunk, index in zip(jnp.split(x, parts, axis=-2), starts):
        sin_s, cos_s = sin_starts[index], cos_starts[index]
        sin = sin_s * cos_i + cos_s * sin_i
        cos = cos_s * cos_i - sin_s * sin_i
        out.append(maths.prepare(chunk, pre_activation, sin, cos, accum))
    return jnp.concatenate(out, axis=-2)


def _pieces(spec: AttentionSpec, block: int):
    """The Triton kernels on a GPU where they serve the call; else blockwise XLA."""
    if spec.platform == "gpu" and Triton().unsupported(spec) is None:
        return TritonPieces(Triton())
    return BlockwisePieces(block)


@typechecked
def context_parallel_attention(
    queries: Float[Array, "*batch shard dqk"],
    keys: Float[Array, "*batch shard dqk"],
    values: Float[Array, "*batch shard dv"],
    *,
    axis_name: str | tuple[str, ...],
    layout: str = "contiguous",
    qkv_dtype: DTypeLike | None = None,
    activation_function: str = "softmax",
    qk_pre_activation_function: str = "none",
    theta: numbers.Real = 1e4,
    sigmoid_bias: numbers.Real | None = None,
    block: int = 512,
) -> Float[Array, "*batch shard dv"]:
    r"""Causal `attention` of a sequence split over the devices of mesh axis
    `axis_name`, for use inside `jax.shard_map`: each device passes its shard and gets
    its shard of the output, equal to the one-device result (up to summation order).

    Softmax and sigmoid pass key/value shards around the devices in a ring, each
    transfer overlapping a step of work; 'none' exchanges only one D x DV state per
    chunk. Per-device memory is that of the device's shard. The pieces run in the
    Triton kernels on a GPU (float16/bfloat16), blockwise in XLA otherwise
    (as `implementations.Chunked`, `block` positions per block).

    **Arguments:**

    - `queries`, `keys`, `values`: this device's shard, `(*batch, L, D)`; the whole
        sequence is `S = n L` for `n` devices on `axis_name`.
    - `axis_name`: the mesh axis (or axes) the sequence is sharded over.
    - `layout`: `"contiguous"`: device d holds positions `[d L, (d + 1) L)`;
        `"zigzag"`: the sequence is cut in `2n` chunks and device d holds chunks d and
        `2n - 1 - d` (in that order), which gives every device the same causal work.
        Under "contiguous" device n - 1 does n times the work of device 0.
    - `qkv_dtype`, `activation_function`, `qk_pre_activation_function`, `theta`: as in
        `attention`. RoPE uses each position's place in the whole sequence.
    - `sigmoid_bias`: default $-\log S$ of the whole sequence, as one device would use.
    - `block`: the blockwise pieces' block length (when they run in XLA).

    **Returns:**

    This device's shard of the output, `(*batch, L, DV)` in the qkv dtype.
    """
    check_option(activation_function, ACTIVATIONS, "activation_function")
    check_option(qk_pre_activation_function, PRE_ACTIVATIONS, "qk_pre_activation_function")
    check_option(layout, LAYOUTS, "layout")
    block = whole_number(block, "block")
    if block < 1:
        raise ValueError(f"`block` must be >= 1, got {block}.")
    theta = check_theta(theta)
    devices = _device_count(axis_name)
    dtype = resolve_dtype(queries, keys, values, qkv_dtype)
    *batch, shard_len, dqk = queries.shape
    check_even(dqk, "The head dimension (last axis of queries and keys)")
    sequence = SequenceLayout(axis_name, devices, zigzag=layout == "zigzag")
    if shard_len % sequence.chunks:
        raise ValueError(
            f'layout="zigzag" needs an even shard length (two chunks), got {shard_len}.'
        )
    seq_len = devices * shard_len
    if sigmoid_bias is None:
        sigmoid_bias = -math.log(seq_len) if seq_len > 0 else 0.0
    platform, capability = default_device()
    spec = AttentionSpec(
        activation=activation_function,
        pre_activation=canonical_pre_activation(qk_pre_activation_function),
        mask="causal",
        dtype=dtype,
        batch_shape=tuple(batch),
        seq_len=seq_len,
        dqk=dqk,
        dv=values.shape[-1],
        sigmoid_bias=real_number(sigmoid_bias, "sigmoid_bias"),
        platform=platform,
        gpu_capability=capability,
    )
    if queries.size == 0 or values.size == 0:
        return jnp.zeros(values.shape, dtype)
    accum = accumulation_dtype(dtype)
    device = lax.axis_index(axis_name)
    starts = [sequence.global_chunk(device, j) for j in range(sequence.chunks)]
    count = devices * sequence.chunks
    q = _rope(queries, starts, count, spec.pre_activation, theta, accum)
    k = _rope(keys, starts, count, spec.pre_activation, theta, accum)
    v = values.astype(dtype)
    if activation_function == "none":
        out = linear_prefix(q, k, v, spec, sequence, lambda *xs: Linear()(*xs, None))
    else:
        out = ring_attention(q, k, v, spec, sequence, _pieces(spec, block))
    return out.astype(dtype)
