"""Causal attention through flash-style Pallas kernels lowered by Triton."""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp

from ...spec import AttentionSpec
from ..base import Implementation, as_rows, from_rows
from ..row_kernels import RowKernels, bias_rows, first_key_rows, row_attention
from . import kernels
from .kernels import Blocks, Launch


@dataclasses.dataclass(frozen=True)
class Triton(Implementation):
    """Flash-style Pallas kernels (Triton lowering) for causal softmax, sigmoid and
    'none': a forward kernel and two backward ones (dQ; dK and dV). float16/bfloat16 on
    an NVIDIA GPU; elsewhere Pallas interpret mode (slow, exact; how CI tests them).
    Segments and sliding windows skip the key blocks no query of a block sees; grouped
    KV heads are read in place by every query head of their group; an array sigmoid
    bias (one per head, say) is read per row.

    Defaults: the fastest blocks of a sweep on an H200 (benchmarks/pallas_config_sweep.py,
    docs/benchmarks.md).
    """

    name = "triton"
    reads_inputs_dtype = True
    takes_bias = True
    forward: Sequence[int] = Blocks(block_q=128, block_k=64, warps=8, stages=3)
    """The forward kernel's `Blocks` (block_q, block_k, warps, stages); a plain tuple
    or list of four ints is taken as one."""
    backward: Sequence[int] = Blocks(block_q=64, block_k=64, warps=4, stages=2)
    """The same for the two backward kernels."""

    def __post_init__(self):
        for field in ("forward", "backward"):
            blocks = Blocks(*getattr(self, field))  # from a list too (checkpoint headers)
            if any(not isinstance(b, int) or b < 16 or b & (b - 1) for b in blocks[:2]):
                raise ValueError(
                    f"`{field}` block lengths must be powers of two >= 16, got {blocks[:2]}."
                )
            object.__setattr__(self, field, blocks)

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if spec.mask == "explicit":
            return "it is used with the causal mask only (attention_mask=None)"
        if spec.dqk % 16 or spec.dv % 16 or max(spec.dqk, spec.dv) > 256:
            return (
                f"it needs head dims that are multiples of 16 and <= 256, got {spec.dqk}/{spec.dv}"
            )
        if spec.platform == "gpu":
            if not spec.half:
                return f"on a GPU it needs float16 or bfloat16 inputs, got {spec.dtype}"
            if spec.dqk & (spec.dqk - 1) or spec.dv & (spec.dv - 1):
                return f"on a GPU it needs power-of-two head dims, got {spec.dqk}/{spec.dv}"
        elif spec.dtype.itemsize > 4:
            return f"its kernels accumulate in float32, so they do not take {spec.dtype}"
        return None

    def _launch(self, spec: AttentionSpec, pieces_first_keys=False) -> tuple[Launch, int]:
        """The kernels' settings for `spec`, and the multiple rows are padded to."""
        step = math.lcm(*self.forward[:2], *self.backward[:2])
        interpret = spec.platform != "gpu"
        return Launch(spec, self.forward, self.backward, interpret, pieces_first_keys), step

    def ring_pieces(self) -> "TritonPieces":
        return TritonPieces(self)

    def __call__(self, q, k, v, spec, mask, first_key=None, bias=None):
        launch, step = self._launch(spec)
        row_kernels = RowKernels(
            forward=functools.partial(kernels.forward, launch=launch),
            backward=functools.partial(kernels.backward, launch=launch),
            spec=spec,
            multiple=step,
            sequence_pieces=self.ring_pieces(),
        )
        return row_attention(row_kernels, q, k, v, first_key, bias)


@dataclasses.dataclass(frozen=True)
class TritonPieces:
    """The pieces of context-parallel attention (`ring`) through these kernels: a
    chunk against itself (causal) or against an earlier chunk (full); with segments or
    windows, each query's first visible key relative to the piece's keys (`first_key`,
    `(*batch, L)`; L: none of them); grouped-query heads read in place (q
    `(*batch, Hkv, G, L, D)`, k and v `(*batch, Hkv, 1, L, D)`); an array sigmoid
    bias, each query's (`bias`, `(*batch, L)` float32, `spec.array_bias`)."""

    triton: Triton
    takes_first_keys = True
    takes_grouped_heads = True
    takes_array_bias = True

    def _rows(self, arrays, first_key, bias, spec):
        """The kernels' settings, rows of `arrays`, of `first_key` (a tuple) and the
        `bias=` keyword."""
        launch, step = self.triton._launch(spec, pieces_first_keys=first_key is not None)
        rows = [as_rows(x, spec, step) for x in arrays]
        padded = rows[0].shape[1]
        options = bias_rows(() if bias is None else (bias,), padded)
        if first_key is None:
            return launch, rows, (), options
        first = jnp.broadcast_to(first_key, arrays[1].shape[:-1])
        return launch, rows, first_key_rows((first,), padded), options

    def forward(self, q, k, v, spec: AttentionSpec, first_key=None, bias=None):
        """`(out, lse)`: the output and each row's log2-sum-exp2 (zeros unless
        softmax; -inf where a row sees none of the keys)."""
        launch, rows, first, options = self._rows((q, k, v), first_key, bias, spec)
        batch = q.shape[:-2]
        outs = kernels.forward(*rows, *first, launch=launch, **options)
        out = from_rows(outs[0], batch, spec)
        if spec.activation != "softmax":
            return out, jnp.zeros_like(out[..., 0], dtype=jnp.float32)
        return out, outs[1][:, : spec.seq_len].reshape(*batch, spec.seq_len)

    def backward(self, q, k, v, out, lse, d_out, spec: AttentionSpec, first_key=None, bias=None):
        """`(dq, dk, dv)`, given the output and lse of the whole rows; with `bias`,
        its gradient at each position too."""
        launch, rows, first, options = self._rows((q, k, v, out, d_out), first_key, bias, spec)
        outs = rows[3:4]
        if spec.activation == "softmax":
            padded = rows[0].shape[1]
            lse = lse.astype(jnp.float32).reshape(-1, spec.seq_len)
            outs.append(jnp.pad(lse, ((0, 0), (0, padded - spec.seq_len))))
        grads = kernels.backward(
            *rows[:3], *outs, rows[4], first_key=first, launch=launch, **options
        )
        grads_qkv = tuple(from_rows(g, x.shape[:-2], spec) for g, x in zip(grads, (q, k, v)))
        d_bias = tuple(g[:, : spec.seq_len].reshape(bias.shape) for g in grads[3:])
        return grads_qkv + d_bias
