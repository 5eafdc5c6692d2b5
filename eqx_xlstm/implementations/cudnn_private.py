"""cuDNN's fused softmax attention kernels through JAX's private API, fenced here.

Context parallelism needs two things `jax.nn.dot_product_attention` does not give:
each row's log-sum-exp in float32 (its `return_residual` rounds it to the inputs'
16-bit dtype, too coarse to merge pieces), and the backward kernel run with the output
and log-sum-exp of the whole rows rather than the piece's own. JAX's cuDNN module has
both: `forward` and `backward` call it in the `BTNH` layout. `available()` says
whether this jax has them as this module expects (checked by signature); without
them the callers keep to the public API.
"""

import functools
import inspect

import jax.numpy as jnp

_BACKWARD_RULE = [
    "scale",
    "seed",
    "dropout_rate",
    "variadic_args",
    "mask_type",
    "layout",
    "sliding_window_length",
    "is_training",
    "return_residual",
    "res",
    "grad_output",
]


def _module():
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


@functools.cache
def available() -> bool:
    """Whether this jax's private cuDNN attention module has what `forward` and
    `backward` call, with the parameters they pass."""
    try:
        module = _module()
        forward = inspect.signature(module.dot_product_attention).parameters
        backward = list(inspect.signature(module._dot_product_attention_bwd_rule).parameters)
        _ = (module.MaskType.CAUSAL, module.MaskType.NO_MASK, module.AttentionLayout.BTNH)
    except (ImportError, AttributeError, ValueError, TypeError):
        return False
    return "return_residual" in forward and "qkv_layout" in forward and backward == _BACKWARD_RULE


def _mask_type(module, causal: bool):
    return module.MaskType.CAUSAL if causal else module.MaskType.NO_MASK


def forward(q, k, v, *, scale: float, causal: bool, window=None, layout="BTNH"):
    """`(out, lse)` for `(B, T, N, H)` inputs (`layout="BNTH"`: `(B, N, T, H)`; k and v
    may have fewer heads, grouped-query): the output, and each row's natural
    log-sum-exp of the scaled logits, `(B, N, T)` float32. `window`: key j visible
    from query i when `i - window < j <= i`."""
    module = _module()
    return module.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        mask_type=_mask_type(module, causal),
        qkv_layout=layout,
        sliding_window_length=window,
        return_residual=True,
    )


def backward(q, k, v, out, lse, d_out, *, scale: float, causal: bool, window=None, layout="BTNH"):
    """`(dq, dk, dv)` for `(B, T, N, H)` inputs (or `layout`'s, as `forward`), given
    the output `out` and natural log-sum-exp `lse` (`(B, N, T)` float32) of the whole
    rows, which may include keys these `k`, `v` do not hold."""
    module = _module()
    unused = jnp.zeros(0, q.dtype)
    # The residuals of JAX's rule: q, k, v, bias, q/kv lengths and offsets, the two
    # page tables, then the softmax statistics and the forward output.
    residuals = (q, k, v, *[unused] * 7, lse, out)
    grads = module._dot_product_attention_bwd_rule(
        scale,
        42,  # seed (no dropout)
        0.0,  # dropout rate
        (False, False),  # (bias, bias gradient)
        _mask_type(module, causal),
        module.AttentionLayout[layout].value,
        window,
        True,
        False,  # return_residual
        residuals,
        d_out,
    )
    return tuple(grads[:3])
