"""cuDNN's fused causal softmax attention: its kernels as ops of their own (JAX's
private cuDNN API, `cudnn_private`), or through `jax.nn.dot_product_attention`."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .. import maths
from ..spec import AttentionSpec
from . import cudnn_private
from .base import GROUPED, WINDOW, Implementation, as_rows, from_rows, untaken_features
from .row_kernels import RowKernels, row_attention
from .triton import Triton, TritonPieces


@dataclasses.dataclass(frozen=True)
class CuDNN(Implementation):
    """cuDNN's fused causal softmax in float16/bfloat16 on an NVIDIA GPU.

    By default (`ring`) its forward and backward kernels run as ops of their own, each
    row of q, k, v one cuDNN batch entry, through `row_kernels.row_attention` like the
    Pallas kernels: inputs sharded over leading axes stay so, and inputs sharded over
    the sequence run as a ring of cuDNN pieces. Otherwise it is
    `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`: with
    two or more leading axes the last (the heads) is cuDNN's head axis and the others
    its batch, so inputs sharded over batch or heads stay so (cuDNN's own
    partitioning); a sequence-sharded input is gathered.

    cuDNN's backward pass refuses odd sequence lengths, so an odd S is padded with one
    zero position at the end. That is exact under the causal mask: no real query sees
    the extra key, and the extra query's output is dropped.

    Sliding windows and grouped-query heads run in cuDNN's own kernels (its sliding
    window; K/V with fewer heads in the `BNTH` layout) through the private API; not
    segments, whose number per row cuDNN's packed layout needs to know statically.
    """

    name = "cudnn"
    reads_inputs_dtype = True
    ring: bool = True
    """Run cuDNN's forward and backward kernels as ops of their own (JAX's private
    cuDNN API, where this jax has it as expected), like the Pallas kernels: inputs
    sharded over the sequence then run as a ring of cuDNN pieces (context
    parallelism). False, or without that API: `jax.nn.dot_product_attention`, which
    gathers a sequence-sharded input onto every device."""

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if spec.platform != "gpu":
            return f"it needs an NVIDIA GPU, and the default backend is {spec.platform!r}"
        if reason := untaken_features(spec, takes=(WINDOW, GROUPED)):
            return reason
        if (spec.window or spec.kv_groups > 1) and self.ring_pieces() is None:
            return (
                "it runs sliding windows and grouped-query heads through JAX's private cuDNN "
                "API (ring=True), which this jax does not have as expected"
            )
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
            return row_attention(row_kernels, q, k, v)  # a window needs no first keys
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


def _cudnn_layout(spec: AttentionSpec):
    """`(queries, keys, back, layout)` for rows: `queries` and `keys` put q (and out,
    d_out) and k, v rows into cuDNN's layout, `back` brings q-shaped results back.
    One head per batch row (`BTNH`); with grouped heads (G > 1), each KV row a batch
    entry whose G query rows are its heads (`BNTH`, so that both are reshapes)."""
    groups = spec.kv_groups
    if groups == 1:
        return _btnh, _btnh, lambda x: x[:, :, 0], "BTNH"
    queries = lambda x: x.reshape(-1, groups, *x.shape[1:])
    return queries, lambda x: x[:, None], lambda x: x.reshape(-1, *x.shape[2:]), "BNTH"


def _options(spec: AttentionSpec):
    return dict(scale=spec.scale, causal=spec.causal, window=spec.window)


def _forward_rows(q, k, v, spec):
    """`(out, lse)` of rows (q with G rows per KV row); lse in log2 (as the Triton
    kernels and the ring keep it)."""
    queries, keys, back, layout = _cudnn_layout(spec)
    out, lse = cudnn_private.forward(queries(q), keys(k), keys(v), layout=layout, **_options(spec))
    return back(out), lse.reshape(q.shape[:2]) * maths.LOG2E


def _backward_rows(q, k, v, out, lse, d_out, spec):
    """`(dq, dk, dv)` of rows, given the whole rows' output and log2-sum-exp2."""
    queries, keys, back, layout = _cudnn_layout(spec)
    natural = (lse / maths.LOG2E).astype(jnp.float32)
    natural = natural.reshape(-1, spec.kv_groups, natural.shape[-1])
    dq, dk, dv = cudnn_private.backward(
        queries(q),
        keys(k),
        keys(v),
        queries(out),
        natural,
        queries(d_out),
        layout=layout,
        **_options(spec),
    )
    if layout == "BTNH":
        return back(dq), back(dk), back(dv)
    return back(dq), dk[:, 0], dv[:, 0]


@dataclasses.dataclass(frozen=True)
class CuDNNPieces:
    """The softmax pieces of context-parallel attention (`ring`) through cuDNN's
    kernels: a chunk against itself (causal) or an earlier chunk (full). Pieces that
    cuDNN cannot run go to `triton_pieces`: of odd length (which cuDNN's backward
    refuses and which zero padding would change without the causal mask), with first
    keys (segments, windows: cuDNN's window cannot start a piece's keys elsewhere than
    its diagonal) or with grouped-query heads (the pieces' layout)."""

    triton_pieces: TritonPieces = TritonPieces(Triton())
    takes_first_keys = True
    takes_grouped_heads = True

    def _to_triton(self, spec, first_key) -> bool:
        return bool(spec.seq_len % 2) or first_key is not None or spec.kv_groups > 1

    def forward(self, q, k, v, spec: AttentionSpec, first_key=None):
        """`(out, lse)`: the output and each row's log2-sum-exp2."""
        if self._to_triton(spec, first_key):
            return self.triton_pieces.forward(q, k, v, spec, first_key)
        batch = q.shape[:-2]
        out, lse = _forward_rows(*(as_rows(x, spec, 2) for x in (q, k, v)), spec)
        return from_rows(out, batch, spec), lse.reshape(*batch, spec.seq_len)

    def backward(self, q, k, v, out, lse, d_out, spec: AttentionSpec, first_key=None):
        """`(dq, dk, dv)`, given the output and lse of the whole rows."""
        if self._to_triton(spec, first_key):
            return self.triton_pieces.backward(q, k, v, out, lse, d_out, spec, first_key)
        batch = q.shape[:-2]
        rows = [as_rows(x, spec, 2) for x in (q, k, v, out, d_out)]
        lse = lse.reshape(-1, spec.seq_len)
        grads = _backward_rows(*rows[:4], lse, rows[4], spec)
        return tuple(from_rows(g, batch, spec) for g in grads)
