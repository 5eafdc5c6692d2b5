"""Causal attention without an activation as chunkwise linear attention.

With weights equal to the raw logits, h_i = scale * q_i^T sum_{j<=i} k_j v_j^T. Cutting
the sequence into chunks of C positions,

    h_c = scale * (q_c @ S_c + tril(q_c @ k_c^T) @ v_c),   S_c = sum_{c' < c} k_c'^T v_c',

where the states S_c (DQK x DV) are an exclusive cumulative sum over chunks. All chunks
are computed in parallel; cost O(S * C * D + S * D^2) instead of O(S^2 * D), memory
O(S * C + S * D^2 / C). Exact, not an approximation: only the summation order differs.

The one step that crosses chunks, the exclusive prefix sum of the states, is an op of
its own (`_states_before`): sharded over the sequence, each device adds the sum of the
devices before it (one D x DV all-gather, whatever S is); its gradient, the suffix sum,
likewise. Everything else is chunk-local XLA that partitions by itself. With a single
device the op is plain XLA (as an op it cost 5% of fwd+bwd on an H200 at S=8192).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import maths
from ..spec import AttentionSpec
from .base import Implementation, SequenceLayout, from_blocks, in_blocks
from .per_shard import per_shard
from .reference import matmul_precision


def _shift(x, forward: bool):
    """Exclusive cumulative sum over the chunk axis (-3): of the chunks before each one
    (`forward`), or of those after it."""
    pad = ((0, 0),) * (x.ndim - 3)
    if forward:
        return jnp.cumsum(jnp.pad(x[..., :-1, :, :], (*pad, (1, 0), (0, 0), (0, 0))), axis=-3)
    after = jnp.pad(x[..., 1:, :, :], (*pad, (0, 1), (0, 0), (0, 0)))
    return lax.cumsum(after, axis=x.ndim - 3, reverse=True)


def _from_devices(total, layout: SequenceLayout, before: bool):
    """The sum of `total` over the devices before this one (or after it) on the
    sequence axis."""
    every = lax.all_gather(total, layout.axis_name)
    me = lax.axis_index(layout.axis_name)
    index = jnp.arange(layout.devices).reshape((-1,) + (1,) * total.ndim)
    keep = index < me if before else index > me
    return jnp.sum(jnp.where(keep, every, 0.0), axis=0)


def _exclusive(x, forward: bool):
    """`_shift` as an op per device's shard: of the leading axes, or of the chunks."""

    def over_sequence(layout):
        def shard(x):
            carried = _from_devices(jnp.sum(x, axis=-3), layout, before=forward)
            return (_shift(x, forward) + carried[..., None, :, :],)

        return shard

    if jax.device_count() == 1:  # nothing to partition: keep XLA's fusions
        return _shift(x, forward)
    fn = lambda x: (_shift(x, forward),)
    return per_shard(fn, x, batch_ndim=x.ndim - 3, over_sequence=over_sequence)[0]


@jax.custom_vjp
def _states_before(kv):
    """`(*batch, chunks, D, DV)` -> for each chunk, the sum of those before it."""
    return _exclusive(kv, forward=True)


_states_before.defvjp(
    lambda kv: (_exclusive(kv, forward=True), None),
    lambda _, g: (_exclusive(g, forward=False),),
)


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
        if spec.window is not None:
            return "it carries whole prefixes, not sliding windows (the chunked path skips blocks)"
        return None

    def __call__(self, q, k, v, spec, mask, first_key=None):
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
        positions = jnp.arange(chunk)
        if first_key is None:
            kv = einsum("...ckd,...ckv->...cdv", kc, vc)
            states = _states_before(kv)
            inter = einsum("...cqd,...cdv->...cqv", qc, states.astype(operand))
            seen = maths.visible(positions[:, None], positions[None, :])
        else:
            inter, seen = _segmented(qc, kc, vc, first_key, chunk, einsum, operand)
        scores = einsum("...cqd,...ckd->...cqk", qc, kc)
        intra = einsum("...cqk,...ckv->...cqv", jnp.where(seen, scores, 0.0).astype(operand), vc)
        return from_blocks((inter + intra) * spec.scale, seq_len)


def _segmented(qc, kc, vc, first_key, chunk, einsum, operand):
    """Packed sequences: the part of each query's output from earlier chunks, and which
    keys of its own chunk it sees. `first_key` `(..., S)`: each query's segment start.

    The state entering chunk c sums k v^T over the keys from the start of the segment
    that covers c's first position; a query uses it only when its own segment started
    at or before its chunk (otherwise everything it sees lies in its chunk). The states
    follow `S_{c+1} = a_c S_c + b_c`: `a_c` is 1 unless a segment starts inside chunk
    c, `b_c` the sum over c's keys from the last segment start on (an associative scan
    over chunks)."""
    n_chunks = qc.shape[-3]
    # (..., c, t); padded queries (zero rows, outputs cut) get 0, each chunk's first
    # query, which sets the carries, is a real one.
    first = in_blocks(first_key[..., None], chunk)[..., 0]
    starts = jnp.arange(n_chunks) * chunk  # each chunk's first position
    positions = starts[:, None] + jnp.arange(chunk)  # (c, t)
    # The segment start of the next chunk's first position, seen from chunk c's keys.
    next_first = jnp.concatenate([first[..., 1:, 0], first[..., -1:, 0]], axis=-1)  # (..., c)
    keep = (next_first <= starts)[..., None, None]  # no segment starts inside chunk c
    tail = (positions >= next_first[..., None])[..., None]  # c's keys from it on
    kv = einsum("...ckd,...ckv->...cdv", jnp.where(tail, kc, 0).astype(kc.dtype), vc)

    def combine(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return a1 * a2, a2 * b1 + b2

    keep = jnp.broadcast_to(keep, jnp.broadcast_shapes(keep.shape, kv.shape)).astype(kv.dtype)
    _, through = lax.associative_scan(combine, (keep, kv), axis=kv.ndim - 3)
    states = jnp.concatenate([jnp.zeros_like(through[..., :1, :, :]), through[..., :-1, :, :]], -3)
    carried = (first <= starts[:, None])[..., None]  # the query's segment covers its chunk start
    inter = einsum(
        "...cqd,...cdv->...cqv", jnp.where(carried, qc, 0).astype(qc.dtype), states.astype(operand)
    )
    local = first - starts[:, None]  # first visible key, as an offset in the chunk
    offsets = jnp.arange(chunk)
    seen = maths.visible(offsets[:, None], offsets[None, :], local[..., None])
    return inter, seen
