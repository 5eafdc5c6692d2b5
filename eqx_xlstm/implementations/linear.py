"""Causal attention without an activation as chunkwise linear attention.

With weights equal to the raw logits, h_i = scale * q_i^T sum_{j<=i} k_j v_j^T. Cutting
the sequence into chunks of C positions,

    h_c = scale * (q_c @ S_c + tril(q_c @ k_c^T) @ v_c),   S_c = sum_{c' < c} k_c'^T v_c',

where the states S_c (DQK x DV) are an exclusive cumulative sum over chunks. All chunks
are computed in parallel; cost O(S * C * D + S * D^2) instead of O(S^2 * D), memory
O(S * C + S * D^2 / C). Exact, not an approximation: only the summation order differs.

The backward pass is written out (`jax.custom_vjp`) in the same form: with
dS_c = scale * q_c^T dO_c and G_c = sum_{c' > c} dS_c' (an exclusive suffix sum),

    dq_c = scale * (dO_c S_c^T + tril(dO_c v_c^T) k_c)
    dk_c = v_c G_c^T + scale * tril(dO_c v_c^T)^T q_c
    dv_c = k_c G_c + scale * tril(q_c k_c^T)^T dO_c.

Sharded over the sequence, a device's S_c also holds the k^T v sum of the devices
before it, and its G_c the dS sum of those after it: one D x DV all-gather each way,
whatever S is.
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


@dataclasses.dataclass(frozen=True)
class _Form:
    """The chunked layout and matmuls of one call."""

    spec: AttentionSpec
    chunk: int

    @property
    def operand(self):
        """bf16 operands keep the fast matmuls (float32's range); float16 ones would
        overflow on raw q . k and on the state sums, so float16 runs in float32."""
        spec = self.spec
        return spec.dtype if spec.dtype == jnp.bfloat16 else spec.accum_dtype

    def einsum(self, *args):
        return jnp.einsum(
            *args,
            precision=matmul_precision(self.spec.dtype),
            preferred_element_type=self.spec.accum_dtype,
        )

    def chunks(self, x):
        return in_blocks(x.astype(self.operand), self.chunk)

    def op(self, x):
        return x.astype(self.operand)

    def scores(self, a, b):
        """tril(a_c b_c^T) per chunk, in the operand dtype."""
        positions = jnp.arange(self.chunk)
        tril = maths.visible(positions[:, None], positions[None, :])
        s = self.einsum("...cqd,...ckd->...cqk", a, b)
        return jnp.where(tril, s, 0.0).astype(self.operand)


def _shift(x, forward: bool):
    """Exclusive cumulative sum over the chunk axis (-3): of those before each chunk
    (`forward`), or of those after it."""
    pad = ((0, 0),) * (x.ndim - 3)
    if forward:
        return jnp.cumsum(jnp.pad(x[..., :-1, :, :], (*pad, (1, 0), (0, 0), (0, 0))), axis=-3)
    after = jnp.pad(x[..., 1:, :, :], (*pad, (0, 1), (0, 0), (0, 0)))
    return jnp.flip(jnp.cumsum(jnp.flip(after, -3), axis=-3), -3)


def _from_devices(total, layout: SequenceLayout | None, before: bool):
    """The sum of `total` over the devices before this one (or after it) on the
    sequence axis; zero unsharded."""
    if layout is None:
        return jnp.zeros_like(total)
    every = lax.all_gather(total, layout.axis_name)
    me = lax.axis_index(layout.axis_name)
    index = jnp.arange(layout.devices).reshape((-1,) + (1,) * total.ndim)
    keep = index < me if before else index > me
    return jnp.sum(jnp.where(keep, every, 0.0), axis=0)


def _forward(q, k, v, form: _Form, layout=None):
    qc, kc, vc = form.chunks(q), form.chunks(k), form.chunks(v)
    kv = form.einsum("...ckd,...ckv->...cdv", kc, vc)
    carried = _from_devices(jnp.sum(kv, axis=-3), layout, before=True)
    states = _shift(kv, forward=True) + carried[..., None, :, :]
    inter = form.einsum("...cqd,...cdv->...cqv", qc, form.op(states))
    intra = form.einsum("...cqk,...ckv->...cqv", form.scores(qc, kc), vc)
    return (from_blocks((inter + intra) * form.spec.scale, form.spec.seq_len),)


def _backward(q, k, v, d_out, form: _Form, layout=None):
    spec = form.spec
    qc, kc, vc, dc = (form.chunks(x) for x in (q, k, v, d_out))
    kv = form.einsum("...ckd,...ckv->...cdv", kc, vc)
    carried = _from_devices(jnp.sum(kv, axis=-3), layout, before=True)
    states = form.op(_shift(kv, forward=True) + carried[..., None, :, :])
    d_state = form.einsum("...cqd,...cqv->...cdv", qc, dc) * spec.scale
    later = _from_devices(jnp.sum(d_state, axis=-3), layout, before=False)
    after = form.op(_shift(d_state, forward=False) + later[..., None, :, :])
    d_scores = form.scores(dc, vc)  # tril(dO_c v_c^T)
    dq = form.einsum("...cqv,...cdv->...cqd", dc, states) + form.einsum(
        "...cqk,...ckd->...cqd", d_scores, kc
    )
    dk = form.einsum("...ckv,...cdv->...ckd", vc, after) + spec.scale * form.einsum(
        "...cqk,...cqd->...ckd", d_scores, qc
    )
    dv = form.einsum("...ckd,...cdv->...ckv", kc, after) + spec.scale * form.einsum(
        "...cqk,...cqv->...ckv", form.scores(qc, kc), dc
    )
    grads = (dq * spec.scale, dk, dv)
    return tuple(from_blocks(g, spec.seq_len) for g in grads)


def _over_sequence(fn, form):
    return lambda layout: lambda *xs: fn(*xs, form, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear(q, k, v, form: _Form):
    return _linear_fwd(q, k, v, form)[0]


def _linear_fwd(q, k, v, form):
    local = lambda q, k, v: _forward(q, k, v, form)
    batch_ndim = q.ndim - 2
    (out,) = per_shard(
        local, q, k, v, batch_ndim=batch_ndim, over_sequence=_over_sequence(_forward, form)
    )
    return out, (q, k, v)


def _linear_bwd(form, residuals, d_out):
    q, k, v = residuals
    local = lambda q, k, v, d_out: _backward(q, k, v, d_out, form)
    grads = per_shard(
        local,
        q,
        k,
        v,
        d_out,
        batch_ndim=q.ndim - 2,
        over_sequence=_over_sequence(_backward, form),
    )
    return tuple(g.astype(x.dtype) for g, x in zip(grads, residuals))


_linear.defvjp(_linear_fwd, _linear_bwd)


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
        chunk = max(1, min(self.chunk_for(spec), spec.seq_len))
        return _linear(q, k, v, _Form(spec, chunk))
