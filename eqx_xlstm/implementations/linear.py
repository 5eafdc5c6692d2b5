"""Causal attention without an activation as chunkwise linear attention.

With weights equal to the raw logits, h_i = scale * q_i^T sum_{j<=i} k_j v_j^T. Cutting
the sequence into chunks of C positions,

    h_c = scale * (q_c @ S_c + tril(q_c @ k_c^T) @ v_c),   S_c = sum_{c' < c} k_c'^T v_c',

where the states S_c (DQK x DV) are an exclusive cumulative sum over chunks. All chunks
are computed in parallel; cost O(S * C * D + S * D^2) instead of O(S^2 * D), memory
O(S * C + S * D^2 / C). Exact, not an approximation: only the summation order differs.
"""

import dataclasses
import functools

import jax.numpy as jnp

from .. import maths
from ..spec import AttentionSpec
from .base import Implementation, from_blocks, in_blocks
from .reference import matmul_precision


@dataclasses.dataclass(frozen=True)
class Linear(Implementation):
    """Causal 'none' attention in O(S * D^2): a state sum k v^T carried across chunks.

    Matmul operands stay bfloat16 for bfloat16 inputs; float16 and wider inputs are
    computed in `spec.accum_dtype` (float16's range cannot hold raw scores or state
    sums); sums are in `spec.accum_dtype`.
    """

    name = "linear"
    chunk: int | None = None
    """Chunk length; None takes the platform's measured best: 256 on a GPU (an H200),
    64 elsewhere (a 2-core CPU); docs/benchmarks.md."""

    def __post_init__(self):
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"`chunk` must be a positive int or None, got {self.chunk!r}.")

    def chunk_for(self, spec: AttentionSpec) -> int:
        """The chunk length used for `spec`."""
        if self.chunk is not None:
            return self.chunk
        return 256 if spec.platform == "gpu" else 64

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if spec.activation != "none":
            return f"it computes activation_function='none' only, not {spec.activation!r}"
        if not spec.causal:
            return "it is used with the causal mask only (attention_mask=None)"
        return None

    def __call__(self, q, k, v, spec, mask):
        seq_len = spec.seq_len
        chunk = max(1, min(self.chunk_for(spec), seq_len))
        # bf16 operands keep the fast matmuls (float32's range); float16 ones would
        # overflow on raw q . k and on the state sums, so float16 runs in float32.
        operand = spec.dtype if spec.dtype == jnp.bfloat16 else spec.accum_dtype
        chunks = lambda x: in_blocks(x.astype(operand), chunk)

        qc, kc, vc = chunks(q), chunks(k), chunks(v)
        einsum = functools.partial(
            jnp.einsum,
            precision=matmul_precision(spec.dtype),
            preferred_element_type=spec.accum_dtype,
        )
        kv = einsum("...ckd,...ckv->...cdv", kc, vc)
        # Exclusive cumulative sum: the state before each chunk.
        before = jnp.pad(kv[..., :-1, :, :], ((0, 0),) * (kv.ndim - 3) + ((1, 0), (0, 0), (0, 0)))
        states = jnp.cumsum(before, axis=-3)
        inter = einsum("...cqd,...cdv->...cqv", qc, states.astype(operand))
        scores = einsum("...cqd,...ckd->...cqk", qc, kc)
        positions = jnp.arange(chunk)
        scores = jnp.where(maths.visible(positions[:, None], positions[None, :]), scores, 0.0)
        intra = einsum("...cqk,...ckv->...cqv", scores.astype(operand), vc)
        return from_blocks((inter + intra) * spec.scale, seq_len)
