"""cuDNN's fused causal softmax attention, through `jax.nn.dot_product_attention`."""

import dataclasses

import jax
import jax.numpy as jnp

from ..spec import AttentionSpec
from .base import Implementation, as_rows, from_rows


@dataclasses.dataclass(frozen=True)
class CuDNN(Implementation):
    """`jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`:
    causal softmax in float16/bfloat16 on an NVIDIA GPU. With two or more leading
    axes the last (the heads) is cuDNN's head axis and the others its batch, so inputs
    sharded over batch or heads stay so (cuDNN's own partitioning); a single leading
    axis rides in cuDNN's batch.

    cuDNN's backward pass refuses odd sequence lengths, so an odd S is padded with one
    zero position at the end. That is exact under the causal mask: no real query sees
    the extra key, and the extra query's output is dropped.
    """

    name = "cudnn"

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if spec.platform != "gpu":
            return f"it needs an NVIDIA GPU, and the default backend is {spec.platform!r}"
        if spec.activation != "softmax":
            return f"it computes softmax only, not activation_function={spec.activation!r}"
        if not spec.causal:
            return "it is used with the causal mask only (attention_mask=None)"
        if not spec.half:
            return f"it needs float16 or bfloat16 inputs, got {spec.dtype}"
        if spec.dqk != spec.dv or spec.dqk % 8 or spec.dqk > 128:
            return (
                "it needs equal q/k/v head dims, a multiple of 8 and <= 128, got "
                f"{spec.dqk}/{spec.dv}"
            )
        return None

    def __call__(self, q, k, v, spec, mask):
        batch = q.shape[:-2]
        if len(batch) < 2:  # rows of cuDNN's batch, one head each: (B, T, N=1, H)
            bthn = [as_rows(x, spec, 2)[:, :, None, :] for x in (q, k, v)]
            out = jax.nn.dot_product_attention(
                *bthn, scale=spec.scale, is_causal=True, implementation="cudnn"
            )
            return from_rows(out[:, :, 0, :], batch, spec)
        # The last leading axis (the heads) is cuDNN's N, the others its B: cuDNN's own
        # partitioning rule then keeps inputs sharded over either shard-local.
        padded = -(-spec.seq_len // 2) * 2

        def to_bthn(x):
            x = x.astype(spec.dtype).reshape(-1, *x.shape[-3:])  # (B, N, T, H)
            x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - spec.seq_len), (0, 0)))
            return jnp.swapaxes(x, 1, 2)

        out = jax.nn.dot_product_attention(
            *(to_bthn(x) for x in (q, k, v)),
            scale=spec.scale,
            is_causal=True,
            implementation="cudnn",
        )
        out = jnp.swapaxes(out, 1, 2)[:, :, : spec.seq_len]
        return out.reshape(*batch, spec.seq_len, out.shape[-1])
