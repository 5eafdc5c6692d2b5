"""cuDNN's fused causal softmax attention: its kernels as ops of their own (JAX's
private cuDNN API, `cudnn_private`), or through `jax.nn.dot_product_attention`."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .. import maths
from ..spec import AttentionSpec
from . import cudnn_private
from .base import Implementation, as_rows, from_rows, plain_causal_only
from .per_shard import RowKernels, row_attention
from .triton import Triton, TritonPieces


@dataclasses.dataclass(frozen=True)
class CuDNN(Implementation):
    """cuDNN's fused causal softmax in float16/bfloat16 on an NVIDIA GPU.

    By default (`ring`) its forward and backward kernels run as ops of their own, each
    row of q, k, v one cuDNN batch entry, through `per_shard.row_attention` like the
    Pallas kernels: inputs sharded over leading axes stay so, and inputs sharded over
    the sequence run as a ring of cuDNN pieces. Otherwise it is
    `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`: with
    two or more leading axes the last (the heads) is cuDNN's head axis and the others
    its batch, so inputs sharded over batch or heads stay so (cuDNN's own
    partitioning); a sequence-sharded input is gathered.

    cuDNN's backward pass refuses odd sequence lengths, so an odd S is padded with one
    zero position at the end. That is exact under the causal mask: no real query sees
    the extra key, and the extra query's output is dropped.
    """

    name = "cudnn"
    ring: bool = True
    """Run cuDNN's forward and backward kernels as ops of their own (JAX's private
    cuDNN API, where this jax has it as expected), like the Pallas kernels: inputs
    sharded over the sequence then run as a ring of cuDNN pieces (context
    parallelism). False, or without that API: `jax.nn.dot_product_attention`, which
    gathers a sequence-sharded input onto every device."""

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if spec.platform != "gpu":
            return f"it needs an NVIDIA GPU, and the default backend is {spec.platform!r}"
        if reason := plain_causal_only(spec):
            return reason
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

    def ring_pieces(self) -> "CuDNNPieces | None":
        """cuDNN's own pieces where its kernels run as ops (`ring` and the private API);
        otherwise None (blockwise XLA)."""
        return CuDNNPieces() if self.ring and cudnn_private.available() else None

    def __call__(self, q, k, v, spec, mask, first_key=None):
        pieces = self.ring_pieces()
        if pieces is not None:
            row_kernels = RowKernels(
                forward=functools.partial(_forward_rows, spec=spec),
                backward=functools.partial(_backward_rows, spec=spec),
                spec=spec,
                multiple=2,
                sequence_pieces=pieces,
            )
            return row_attention(row_kernels, q, k, v)
        return _public_attention(q, k, v, spec)


def _public_attention(q, k, v, spec):
    """Through `jax.nn.dot_product_attention` (see `CuDNN`)."""
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


def _btnh(x):
    """Rows `(N, S, D)` as cuDNN's `(B, T, N, H)`, one head per batch row."""
    return x[:, :, None, :]


def _forward_rows(q, k, v, spec):
    """`(out, lse)` of rows; lse in log2 (as the Triton kernels and the ring keep it)."""
    out, lse = cudnn_private.forward(
        *(_btnh(x) for x in (q, k, v)), scale=spec.scale, causal=spec.causal
    )
    return out[:, :, 0], lse[:, 0] * maths.LOG2E


def _backward_rows(q, k, v, out, lse, d_out, spec):
    """`(dq, dk, dv)` of rows, given the whole rows' output and log2-sum-exp2."""
    natural = (lse / maths.LOG2E).astype(jnp.float32)[:, None, :]
    arrays = [_btnh(x) for x in (q, k, v, out)]
    grads = cudnn_private.backward(
        *arrays, natural, _btnh(d_out), scale=spec.scale, causal=spec.causal
    )
    return tuple(g[:, :, 0] for g in grads)


@dataclasses.dataclass(frozen=True)
class CuDNNPieces:
    """The softmax pieces of context-parallel attention (`ring`) through cuDNN's
    kernels: a chunk against itself (causal) or an earlier chunk (full). A piece of odd
    length, which cuDNN's backward refuses and which zero padding would change without
    the causal mask, runs in `odd_pieces`."""

    odd_pieces: TritonPieces = TritonPieces(Triton())

    def forward(self, q, k, v, spec: AttentionSpec):
        """`(out, lse)`: the output and each row's log2-sum-exp2."""
        if spec.seq_len % 2:
            return self.odd_pieces.forward(q, k, v, spec)
        batch = q.shape[:-2]
        out, lse = _forward_rows(*(as_rows(x, spec, 2) for x in (q, k, v)), spec)
        return from_rows(out, batch, spec), lse.reshape(*batch, spec.seq_len)

    def backward(self, q, k, v, out, lse, d_out, spec: AttentionSpec):
        """`(dq, dk, dv)`, given the output and lse of the whole rows."""
        if spec.seq_len % 2:
            return self.odd_pieces.backward(q, k, v, out, lse, d_out, spec)
        batch = q.shape[:-2]
        rows = [as_rows(x, spec, 2) for x in (q, k, v, out, d_out)]
        lse = lse.reshape(-1, spec.seq_len)
        grads = _backward_rows(*rows[:4], lse, rows[4], spec)
        return tuple(from_rows(g, batch, spec) for g in grads)
