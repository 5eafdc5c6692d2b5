"""Tile-level pieces of the Pallas attention kernels.

Everything here works on values already loaded from refs: swish and RoPE on a q/k tile
(and the transpose of both, for gradients), the causal mask of one (query, key) block
pair, attention weights and their score gradients, and a matmul with float32
accumulation. Written with operations that Pallas lowers to Triton (`lax.unstack` and
`lax.stack` on a trailing axis of two become Triton's split and join) and that run
unchanged in interpret mode.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)


class KernelOptions(NamedTuple):
    """Static settings of one kernel family call (hashable: a `custom_vjp` static arg)."""

    activation: str  # "softmax", "sigmoid" or "none"
    bias: float  # added to the scaled scores before sigmoid
    scale: float  # 1 / sqrt(D)
    seq_len: int  # real (unpadded) sequence length
    swish: bool  # swish on q and k inside the kernels
    rope: bool  # RoPE on q and k inside the kernels (tables are kernel inputs)
    inner_fused: bool  # also on the tiles streamed in the inner loop (else pre-rotated)
    mosaic: bool  # forward and backward by Mosaic GPU kernels (sigmoid/'none', RoPE in front)
    fast: bool  # sigmoid through the GPU's approximate tanh (GPU only)
    fwd: tuple[int, int, int, int]  # (query block, key block, warps, stages): forward
    bwd: tuple[int, int, int, int]  # the same for the two backward kernels
    interpret: bool


def sigmoid(x, fast):
    if fast:
        from jax.experimental.pallas import triton as plgpu

        return 0.5 + 0.5 * plgpu.approx_tanh(0.5 * x)
    return jax.nn.sigmoid(x)


def dot(a, b, trans_b=False):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def rotate(x, sin, cos, inverse=False):
    """Rotate the interleaved pairs of a float32 `(..., rows, D)` array by per-row
    angles (`sin`, `cos`: `(rows, D // 2)`); `inverse` rotates back (the transpose)."""
    *lead, dim = x.shape
    even, odd = jax.lax.unstack(x.reshape(*lead, dim // 2, 2), axis=x.ndim)
    if inverse:
        sin = -sin
    pair = (even * cos - odd * sin, even * sin + odd * cos)
    return jax.lax.stack(pair, axis=x.ndim).reshape(x.shape)


def prepare(x, angles, o: KernelOptions, fast=None):
    """Swish (if `o.swish`) then RoPE (if `angles` is a `(sin, cos)` pair) on raw
    queries or keys, computed in float32 and returned in their dtype. Serves tiles
    inside a kernel and, with `fast=False`, whole arrays outside one."""
    if angles is None and not o.swish:
        return x
    y = x.astype(jnp.float32)
    if o.swish:
        y = y * sigmoid(y, o.fast if fast is None else fast)
    if angles is not None:
        y = rotate(y, *angles)
    return y.astype(x.dtype)


def prepare_grad(grad, x, angles, o: KernelOptions):
    """Gradient w.r.t. the raw tile `x`, given `grad` (float32) w.r.t. `prepare(x)`."""
    if angles is not None:
        grad = rotate(grad, *angles, inverse=True)
    if o.swish:
        y = x.astype(jnp.float32)
        s = sigmoid(y, o.fast)
        grad = grad * s * (1.0 + y * (1.0 - s))
    return grad


def allowed(q_start, k_start, shape, seq_len):
    """Causal mask of one block pair, also hiding padded keys."""
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (k_pos <= q_pos) & (k_pos < seq_len)


def weights(q, k, mask, o: KernelOptions, lse=None):
    """Attention weights of a query tile against a key tile (float32).

    Softmax needs `lse`, the rows' log2-sum-exp2 of the scores in log2 units, saved by
    the forward kernel."""
    scores = dot(q, k, trans_b=True) * o.scale
    if o.activation == "softmax":
        p = jnp.exp2(scores * LOG2E - lse[:, None])
    elif o.activation == "sigmoid":
        p = sigmoid(scores + o.bias, o.fast)
    else:
        p = scores
    return p if mask is None else jnp.where(mask, p, 0.0)


def score_grad(dp, p, mask, o: KernelOptions, delta=None):
    """Gradient w.r.t. the scaled scores from `dp`, the gradient w.r.t. the weights.

    Softmax needs `delta`, the rows' sum of dO * O. Masked entries come out zero: `p`
    is zero there for softmax and sigmoid, and 'none' masks explicitly."""
    if o.activation == "softmax":
        return p * (dp - delta[:, None])
    if o.activation == "sigmoid":
        return dp * p * (1.0 - p)
    return dp if mask is None else jnp.where(mask, dp, 0.0)


def masked_then_full(lo_masked, hi_masked, lo_full, hi_full, body, init):
    """Run `body(j, carry, masked)` over two index ranges: first unmasked, then masked."""
    carry = jax.lax.fori_loop(lo_full, hi_full, lambda j, c: body(j, c, False), init)
    return jax.lax.fori_loop(lo_masked, hi_masked, lambda j, c: body(j, c, True), carry)
