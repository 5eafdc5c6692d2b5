"""Causal attention through warp-specialized Pallas kernels on Mosaic GPU (Hopper)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ... import maths
from ...spec import AttentionSpec
from ..base import GROUPED, SEGMENTS, WINDOW, Implementation, as_rows, from_rows, untaken_features
from ..row_kernels import RowKernels, row_attention
from ..triton import Triton, TritonPieces
from .backward import mosaic_dkv
from .common import check_ctas
from .dq_kernel import mosaic_dq
from .forward import mosaic_forward
from .jax_private import interpret_available, mlir_available

PADDING = 128  # every kernel's sequence tile divides this


@dataclasses.dataclass(frozen=True)
class Mosaic(Implementation):
    """Mosaic GPU kernels: a forward kernel and a backward (dQ and dK/dV kernels, or
    for sigmoid and 'none' one kernel that forms both) for softmax, sigmoid and
    'none'. float16/bfloat16, equal q/k/v head dims of 64 or 128, on a Hopper GPU; on a
    machine without a GPU, in Mosaic GPU interpret mode where this jax has it.
    Segments and sliding windows skip the key tiles no query of a block sees (and the
    query tiles that see none of a key block's keys). Grouped-query heads (K/V with
    fewer heads) are read in place; the backward forms each query head's share of dK
    and dV and sums a group's shares after the kernel.

    Interpret mode runs a kernel's three warpgroups as threads on XLA's CPU client,
    whose thread pool has one thread per core: on a machine with few cores a jitted
    call can hang with every pool thread waiting. Set `PJRT_NPROC=8` (a larger pool)
    before JAX starts.
    """

    name = "mosaic"
    reads_inputs_dtype = True
    fused_backward_from: int | None = 4096
    """From this sequence length on, the backward pass is the one fused kernel rather
    than the dQ + dK/dV pair (None: never). The fused kernel won every measured round
    from S=4096 on, H100 and H200; below, the two tie (docs/benchmarks.md)."""
    ctas: int | None = None
    """A persistent schedule for the forward, dQ and unfused dK/dV kernels: that many
    CUDA blocks take the blocks of rows in turn (`forward.mosaic_forward`'s `ctas`; the
    fused backward keeps one CUDA block per block). None, the default: one CUDA block
    per block of rows, which the scheduler balances better (the persistent form
    measured slower on an H200 in all but the window's forward; docs/benchmarks.md)."""

    def __post_init__(self):
        check_ctas(self.ctas)

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if reason := untaken_features(spec, takes=(SEGMENTS, WINDOW, GROUPED)):
            return reason
        if not spec.causal:
            return "it is used with the causal mask only (attention_mask=None)"
        if not spec.half:
            return f"it needs float16 or bfloat16 inputs, got {spec.dtype}"
        if spec.dqk != spec.dv or spec.dqk not in (64, 128):
            return f"it needs q/k/v head dims of 64 or 128, got {spec.dqk}/{spec.dv}"
        if spec.platform == "gpu":
            if not str(spec.gpu_capability).startswith("9"):
                return (
                    f"it needs a Hopper GPU (compute capability 9.x), got {spec.gpu_capability!r}"
                )
            return None
        if spec.platform != "cpu" or not interpret_available():
            return (
                f"it needs a Hopper GPU, or Mosaic GPU interpret mode on a CPU, which this "
                f"jax {jax.__version__} on {spec.platform!r} does not offer"
            )
        return None

    def fused(self, spec: AttentionSpec) -> bool:
        """Whether the backward of `spec` is the one fused kernel: never for softmax
        (the fused kernel has no row statistics), nor with segments or windows, where
        blocks walk few tiles and the fused kernel measured slower than the pair
        (docs/benchmarks.md)."""
        if spec.activation == "softmax" or spec.bounded or self.fused_backward_from is None:
            return False
        return spec.seq_len >= self.fused_backward_from

    def takes_raw(self, spec: AttentionSpec) -> bool:
        """With segments or windows: there the dQ + dK/dV pair forms the raw rows'
        gradients as its blocks write them, faster than XLA's pass after the kernels.
        Not for plain causal calls, whose fused backward sums dQ across blocks, so XLA
        finishes it anyway and the raw path measured slower (docs/benchmarks.md,
        "Issue #10, sixth part"). Only where this jax's MLIR bindings are where the
        kernels' epilogue finds them (`jax_private.mlir_modules`)."""
        return spec.bounded and mlir_available()

    def ring_pieces(self) -> "MosaicPieces":
        return MosaicPieces(self)

    def __call__(self, q, k, v, spec, mask, first_key=None, rope=None):
        """`first_key`: each query's first visible key, for segments and windows.
        `rope`: `(sin, cos)` when q and k come raw (`takes_raw`): the backward kernels
        then return the raw rows' gradients, RoPE transposed and swish' applied as each
        block writes its rows (`prepared`)."""
        interpret = spec.platform != "gpu"
        backward = functools.partial(
            _backward_kernels,
            spec=spec,
            interpret=interpret,
            fused=self.fused(spec),
            ctas=self.ctas,
        )
        row_kernels = RowKernels(
            forward=functools.partial(
                _forward_kernel, spec=spec, interpret=interpret, ctas=self.ctas
            ),
            backward=backward,
            spec=spec,
            multiple=PADDING,
            partition=not interpret,
            sequence_pieces=self.ring_pieces(),
        )
        return row_attention(row_kernels, q, k, v, first_key, rope=rope)


@dataclasses.dataclass(frozen=True)
class MosaicPieces:
    """The pieces of context-parallel attention (`ring`) through these kernels: a chunk
    against itself (causal) or against an earlier chunk (full), every activation
    (softmax's lse, like the other pieces', each row's log2-sum-exp2). Pieces with
    first keys (segments, windows), grouped heads or an array bias run in
    `triton_pieces`, as do full softmax pieces whose length needs padding (every query
    of a full piece would see the zero keys padded on): the Mosaic kernels take first
    keys in causal pieces only and a number bias only (grouped heads in full pieces are
    not checked on a GPU yet)."""

    mosaic: Mosaic
    triton_pieces: TritonPieces = TritonPieces(Triton())
    takes_first_keys = True
    takes_grouped_heads = True
    takes_array_bias = True

    def _to_triton(self, spec, first_key):
        padded_full_softmax = (
            spec.activation == "softmax" and spec.mask == "full" and spec.seq_len % PADDING
        )
        return bool(
            padded_full_softmax or first_key is not None or spec.kv_groups > 1 or spec.array_bias
        )

    def forward(self, q, k, v, spec: AttentionSpec, first_key=None, bias=None):
        """`(out, lse)`: lse is zeros for sigmoid and 'none' (their pieces simply add)."""
        if self._to_triton(spec, first_key):
            return self.triton_pieces.forward(q, k, v, spec, first_key, bias)
        batch = q.shape[:-2]
        rows = [as_rows(x, spec, PADDING) for x in (q, k, v)]
        outs = _forward_kernel(*rows, spec=spec, interpret=spec.platform != "gpu")
        out = from_rows(outs[0], batch, spec)
        if spec.activation != "softmax":
            return out, jnp.zeros(out.shape[:-1], jnp.float32)
        return out, outs[1][:, : spec.seq_len].reshape(*batch, spec.seq_len)

    def backward(self, q, k, v, out, lse, d_out, spec: AttentionSpec, first_key=None, bias=None):
        """`(dq, dk, dv)` of a piece, given the whole rows' out and lse (which only
        softmax needs)."""
        if self._to_triton(spec, first_key):
            return self.triton_pieces.backward(q, k, v, out, lse, d_out, spec, first_key, bias)
        rows = [as_rows(x, spec, PADDING) for x in (q, k, v, d_out)]
        outs = ()
        if spec.activation == "softmax":  # padded rows: weights exp2(-inf) = 0
            padded = rows[0].shape[1]
            lse = lse.astype(jnp.float32).reshape(-1, spec.seq_len)
            lse = jnp.pad(lse, ((0, 0), (0, padded - spec.seq_len)), constant_values=jnp.inf)
            outs = (as_rows(out, spec, PADDING), lse)
        interpret = spec.platform != "gpu"
        fused = self.mosaic.fused(spec)
        grads = _backward_kernels(
            *rows[:3], *outs, rows[3], spec=spec, interpret=interpret, fused=fused
        )
        return tuple(from_rows(g, q.shape[:-2], spec) for g in grads)


def _bounds(spec, first_key):
    """The kernels' `first_key` and `window` for a call given `first_key` (a tuple:
    empty, or the first keys of whole sequences): a sliding window alone goes as
    `window`, whose first keys the kernels compute from the positions rather than
    read, so that a block's first tiles need not wait for them."""
    if not first_key:
        return {"first_key": None, "window": None}
    if spec.window is not None and not spec.segmented:
        return {"first_key": None, "window": spec.window}
    return {"first_key": first_key[0], "window": None}


def _forward_kernel(q, k, v, *first_key, spec, interpret, ctas=None):
    """`(out,)`; softmax: `(out, lse)`."""
    full = spec.mask == "full"
    args = (spec.activation, spec.sigmoid_bias, interpret, full, spec.kv_groups)
    outs = mosaic_forward(q, k, v, *args, ctas=ctas, **_bounds(spec, first_key))
    return outs if spec.activation == "softmax" else (outs,)


def _backward_kernels(
    q, k, v, *outs_and_d_out, spec, interpret, fused, first_key=(), prepared=None, ctas=None
):
    """`(dq, dk, dv)` from the forward's outputs (softmax: out and lse; otherwise
    none needed) and `d_out`; w.r.t. the raw q and k with `prepared`."""
    *outs, d_out = outs_and_d_out
    args = (q, k, v, d_out, spec.activation, spec.sigmoid_bias, interpret)
    options = {
        "full": spec.mask == "full",
        "groups": spec.kv_groups,
        "prepared": prepared,
        **_bounds(spec, first_key),
    }
    if spec.activation == "softmax":
        out, lse = outs
        options |= {"lse": lse, "delta": maths.row_delta(out, d_out)}
    if fused:
        return mosaic_dkv(*args, fused=True, **options)
    options["ctas"] = ctas
    return (mosaic_dq(*args, **options), *mosaic_dkv(*args, **options))
