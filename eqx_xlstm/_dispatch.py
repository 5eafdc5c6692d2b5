"""Choosing and running an attention implementation.

- `"reference"`: S x S weights in float32, like the upstream; the ground truth.
- `"chunked"`: blockwise with a recomputing backward (memory linear in S); for 'none'
  with the causal mask, the chunkwise linear-attention form (O(S * D^2)).
- `"cudnn"`: `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`,
  for softmax, causal, fp16/bf16 on an NVIDIA GPU.
- `"pallas"`: flash-style Pallas kernels for causal softmax, sigmoid and 'none' (Triton;
  on Hopper a Mosaic GPU forward for sigmoid/'none'); fp16/bf16 on an NVIDIA GPU, Pallas
  interpret mode, slow but exact, elsewhere. Swish + RoPE run in front, or inside the
  Triton kernels with `_pallas.FUSE`.
- `None` picks: cudnn where it can serve; on a GPU, pallas for causal 16-bit sigmoid;
  else the linear form for causal 'none', else chunked for sequences longer than one
  block, else reference.
"""

import functools

import jax
import jax.numpy as jnp

from . import _pallas
from ._chunked import chunked_attention
from ._linear import linear_causal_attention
from ._options import check_option
from ._pallas import pallas_attention
from ._reference import reference_attention
from ._rope import rotate_pairs

IMPLEMENTATIONS = ("reference", "chunked", "cudnn", "pallas")
BLOCK = 512  # query/key block of the chunked path
LINEAR_CHUNK = {"gpu": 256}  # chunk of the linear 'none' path, by platform
LINEAR_CHUNK_DEFAULT = 64  # best on CPU
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # what the GPU kernels take


def linear_chunk() -> int:
    """Chunk length of the linear 'none' path on the default platform (measured best:
    64 on a 2-core CPU, 256 on an H200)."""
    return LINEAR_CHUNK.get(jax.default_backend(), LINEAR_CHUNK_DEFAULT)


def matmul_precision(dtype) -> jax.lax.Precision:
    """Full float32 matmuls for float32 (and wider) inputs: a GPU would otherwise use
    TF32 and lose about three digits. 16-bit inputs keep the fast default."""
    if jnp.dtype(dtype).itemsize >= 4:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def check_implementation(implementation: str | None) -> str | None:
    """`implementation` if it is None or a known name, else a ValueError."""
    if implementation is None:
        return None
    return check_option(implementation, IMPLEMENTATIONS, "implementation")


def cudnn_unsupported(activation, causal, dtype, dqk, dv) -> str | None:
    """Why cuDNN cannot serve these inputs, or None if it can."""
    if jax.default_backend() != "gpu":
        return f"it needs an NVIDIA GPU, and the default backend is {jax.default_backend()!r}"
    if activation != "softmax":
        return f"it computes softmax only, not activation_function={activation!r}"
    if not causal:
        return "it is used with the causal mask only (attention_mask=None)"
    if dtype not in HALF_DTYPES:
        return f"it needs float16 or bfloat16 inputs, got {dtype}"
    if dqk != dv or dqk % 8 or dqk > 128:
        return f"it needs equal q/k/v head dims, a multiple of 8 and <= 128, got {dqk}/{dv}"
    return None


def pallas_unsupported(activation, causal, dtype, dqk, dv) -> str | None:
    """Why the Pallas kernels cannot serve these inputs, or None if they can."""
    if not causal:
        return "they are used with the causal mask only (attention_mask=None)"
    if dqk % 16 or dv % 16 or max(dqk, dv) > 256:
        return f"they need head dims that are multiples of 16 and <= 256, got {dqk}/{dv}"
    if jax.default_backend() == "gpu":
        if dtype not in HALF_DTYPES:
            return f"on a GPU they need float16 or bfloat16 inputs, got {dtype}"
        if dqk & (dqk - 1) or dv & (dv - 1):
            return f"on a GPU they need power-of-two head dims, got {dqk}/{dv}"
    return None


def select_implementation(requested, *, activation, causal, dtype, seq_len, dqk, dv) -> str:
    """The implementation to run; a ValueError if a forced one cannot serve."""
    if check_implementation(requested) is not None:
        unsupported = {"cudnn": cudnn_unsupported, "pallas": pallas_unsupported}
        if requested in unsupported:
            reason = unsupported[requested](activation, causal, dtype, dqk, dv)
            if reason is not None:
                raise ValueError(
                    f"implementation={requested!r} cannot serve these inputs: {reason}."
                )
        return requested
    if cudnn_unsupported(activation, causal, dtype, dqk, dv) is None:
        return "cudnn"
    on_gpu = jax.default_backend() == "gpu"
    if (
        on_gpu
        and activation == "sigmoid"
        and pallas_unsupported(activation, causal, dtype, dqk, dv) is None
    ):
        return "pallas"  # 11-13x the chunked path forward on an H200 from S=8192 (docs)
    if activation == "none" and causal:
        return "chunked" if seq_len > 2 * linear_chunk() else "reference"
    return "chunked" if seq_len > BLOCK else "reference"


def cudnn_attention(q, k, v):
    """cuDNN fused causal softmax attention; heads ride in the batch axis.

    cuDNN's backward pass refuses odd sequence lengths, so an odd S is padded with one
    zero position at the end. That is exact under the causal mask: no real query sees
    the extra key, and the extra query's output is dropped.
    """
    seq_len, dqk = q.shape[-2:]
    padded = seq_len + seq_len % 2

    def as_btnh(x):
        x = x.reshape(-1, seq_len, x.shape[-1])
        x = jnp.pad(x, ((0, 0), (0, padded - seq_len), (0, 0)))
        return x[:, :, None, :]

    out = jax.nn.dot_product_attention(
        as_btnh(q),
        as_btnh(k),
        as_btnh(v),
        scale=dqk**-0.5,
        is_causal=True,
        implementation="cudnn",
    )
    return out[:, :seq_len, 0, :].reshape(v.shape)


def swish_and_rotate(x, pre_activation, sin, cos):
    """Swish (optional) then RoPE, in float32; XLA fuses it into one elementwise pass."""
    x = x.astype(jnp.float32)
    if pre_activation != "none":
        x = jax.nn.silu(x)
    return rotate_pairs(x, sin, cos)


def prepare_qk(q, k, pre_activation, sin, cos):
    """`swish_and_rotate` on queries and keys."""
    return (
        swish_and_rotate(q, pre_activation, sin, cos),
        swish_and_rotate(k, pre_activation, sin, cos),
    )


def run_implementation(
    name, q, k, v, mask, sin, cos, *, activation, pre_activation, sigmoid_bias, dtype
):
    """Swish, RoPE and attention by implementation `name`; returns `dtype`.

    Compiled as one unit (cached per shape and option), so eager calls are fast too.
    """
    return _run(
        q,
        k,
        v.astype(dtype),
        mask,
        sin,
        cos,
        name,
        activation,
        pre_activation,
        float(sigmoid_bias),
        jnp.dtype(dtype),
        BLOCK,
        linear_chunk(),
        _pallas.FUSE,
    )


@functools.partial(jax.jit, static_argnums=range(6, 14))
def _run(
    q,
    k,
    v,
    mask,
    sin,
    cos,
    name,
    activation,
    pre_activation,
    sigmoid_bias,
    dtype,
    block,
    linear_chunk,
    pallas_fuse,
):
    if name == "pallas" and pallas_fuse != "none":
        swish = pre_activation != "none"
        out = pallas_attention(
            q.astype(dtype),
            k.astype(dtype),
            v,
            activation,
            sigmoid_bias,
            swish=swish,
            sin=sin,
            cos=cos,
        )
        return out.astype(dtype)
    q, k = prepare_qk(q, k, pre_activation, sin, cos)
    precision = matmul_precision(dtype)
    if name == "cudnn":
        out = cudnn_attention(q.astype(dtype), k.astype(dtype), v)
    elif name == "pallas":
        out = pallas_attention(q.astype(dtype), k.astype(dtype), v, activation, sigmoid_bias)
    elif name == "chunked" and activation == "none" and mask is None:
        out = linear_causal_attention(q.astype(dtype), k.astype(dtype), v, linear_chunk, precision)
    elif name == "chunked":
        out = chunked_attention(q, k, v, mask, activation, sigmoid_bias, block, precision)
    else:
        out = reference_attention(q, k, v, mask, activation, sigmoid_bias, precision)
    return out.astype(dtype)
