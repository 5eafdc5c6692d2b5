"""Which implementation runs an attention call, in one table, and running it.

`plan(spec, requested)` picks two implementations: one for the forward pass alone and
one for when a gradient is taken (usually the same). `run` applies swish and RoPE in
front, then the plan, inside one `jax.jit` whose static arguments are the spec and
the plan, so every setting that changes the computation is part of the cache key.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import explicit_mode, maths
from ._private_jax import mapped_axis
from .implementations import (
    Chunked,
    CuDNN,
    Implementation,
    Linear,
    Mosaic,
    Reference,
    TilesOrLinear,
    Triton,
    prepare_pass,
)
from .spec import AttentionSpec

IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (Reference(), Chunked(), Linear(), CuDNN(), Triton(), Mosaic(), TilesOrLinear())
}
"""Every implementation by name, with its default tuning."""

ALIASES: dict[str, tuple[str, ...]] = {"pallas": ("mosaic", "triton")}
"""Names that stand for the first of several implementations that serves the call."""

NAMES = (*IMPLEMENTATIONS, *ALIASES)

FORWARD, GRADIENT, BOTH = "forward", "gradient", "both"


@dataclasses.dataclass(frozen=True)
class Default:
    """One row of the default choice: `implementation` serves `passes` of the calls
    for which `when(spec)` holds and which it supports."""

    implementation: str
    passes: str = BOTH
    when: Callable[[AttentionSpec], bool] = lambda spec: True


def _on_gpu(spec):
    return spec.platform == "gpu"


def _none_on_gpu_up_to(seq_len):
    return lambda spec: _on_gpu(spec) and spec.activation == "none" and spec.seq_len <= seq_len


def _bounded_or_grouped_on_gpu(spec):
    """Segments, windows or grouped heads on a GPU, where the kernels skip the tiles no
    query sees; 'none' without a window beyond 4096 goes on to the run-time choice
    between them and the linear form (with segments) or the linear form, whose time
    does not grow with the visible tiles."""
    if not _on_gpu(spec) or not (spec.bounded or spec.kv_groups > 1):
        return False
    return spec.activation != "none" or spec.window is not None or spec.seq_len <= 4096


def _mosaic_kernels_first(spec):
    """Sigmoid on a GPU, and segments, windows or grouped heads as
    `_bounded_or_grouped_on_gpu` says: the Mosaic kernels where they serve."""
    return _on_gpu(spec) and (spec.activation == "sigmoid" or _bounded_or_grouped_on_gpu(spec))


DEFAULTS: tuple[Default, ...] = (
    Default("cudnn"),
    # The Mosaic kernels serve every activation, segments, windows and grouped heads
    # (read in place); an array bias goes on to Triton.
    Default("mosaic", when=_mosaic_kernels_first),
    Default("triton", when=_bounded_or_grouped_on_gpu),
    Default("triton", when=lambda spec: _on_gpu(spec) and spec.activation == "sigmoid"),
    # 'none' on Hopper: the kernel beats the linear form up to these lengths, forward
    # alone and forward + backward (H200, docs/benchmarks.md); beyond, the linear form
    # (O(S D^2)) wins.
    Default("mosaic", FORWARD, _none_on_gpu_up_to(4096)),
    Default("mosaic", GRADIENT, _none_on_gpu_up_to(2048)),
    # 'none' with segments beyond: the kernels where the documents are short, the
    # linear form where they are long, chosen at run time from the segment ids.
    Default("tiles_or_linear", when=_on_gpu),
    Default(
        "linear", when=lambda spec: spec.seq_len > 2 * IMPLEMENTATIONS["linear"].chunk_for(spec)
    ),
    Default("chunked", when=lambda spec: spec.seq_len > IMPLEMENTATIONS["chunked"].block),
    Default("reference"),
)
"""The default choice, in order: for each pass, the first row whose implementation
serves the call and whose condition holds."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The implementation of the forward pass alone, and that of a differentiated call."""

    forward: Implementation
    gradient: Implementation


def check_implementation(requested: object) -> str | Implementation | None:
    """`requested` if it is None, a known name or an `Implementation`; else a ValueError."""
    if requested is None or isinstance(requested, Implementation):
        return requested
    if not isinstance(requested, str) or requested not in NAMES:
        raise ValueError(
            f"Unknown implementation {requested!r}; valid values are None, an "
            "eqx_xlstm.implementations.Implementation, or one of "
            + ", ".join(repr(n) for n in NAMES)
            + "."
        )
    return requested


def _refuse(requested, reason):
    label = requested if isinstance(requested, str) else requested.name
    raise ValueError(f"implementation={label!r} cannot serve these inputs: {reason}.")


def plan(spec: AttentionSpec, requested: str | Implementation | None = None) -> Plan:
    """The implementations that run a call of `spec`; a ValueError saying why when a
    requested one cannot serve it."""
    requested = check_implementation(requested)
    if isinstance(requested, Implementation):
        reason = requested.unsupported(spec)
        if reason is not None:
            _refuse(requested, reason)
        return Plan(requested, requested)
    if requested in IMPLEMENTATIONS:
        return plan(spec, IMPLEMENTATIONS[requested])
    if requested in ALIASES:
        return _alias(spec, requested)
    return Plan(_default(spec, FORWARD), _default(spec, GRADIENT))


def _alias(spec, name):
    """The first implementation of the alias that serves `spec`."""
    serving = [
        IMPLEMENTATIONS[n] for n in ALIASES[name] if not IMPLEMENTATIONS[n].unsupported(spec)
    ]
    if not serving:
        last = IMPLEMENTATIONS[ALIASES[name][-1]]
        _refuse(name, last.unsupported(spec))
    return Plan(serving[0], serving[0])


def _default(spec, which):
    for row in DEFAULTS:
        impl = IMPLEMENTATIONS[row.implementation]
        if row.passes in (BOTH, which) and impl.unsupported(spec) is None and row.when(spec):
            return impl
    raise AssertionError("the reference row serves every call")  # unreachable


def run(q, k, v, mask, sin, cos, spec: AttentionSpec, chosen: Plan, segment_ids=None, bias=None):
    """Swish, RoPE and attention as `chosen` says; returns `spec.dtype`.

    `sin`, `cos`: the RoPE tables, `(S, D/2)`. `segment_ids`: packed sequences
    (`spec.segmented`), `(..., S)` broadcasting against the batch axes: the tables are
    read at positions that restart with each segment, and implementations get each
    query's first visible key (`spec.bounded`, with the window's). With
    `spec.kv_groups = G > 1`, k and v have H / G heads on axis -3. `bias`: the sigmoid
    bias as an array broadcasting against the batch axes, when `spec.array_bias`.

    Inputs with no elements (S = 0, an empty batch axis, DV = 0) give the empty
    output, the same on every path. Under `jax.vmap` over a leading axis of q, k and v
    (such as the heads axis, with `eqx.filter_vmap(backend, in_axes=1)`), the mapped
    axis stays where it is in memory and joins the implementation's batch axes,
    instead of being moved to the front and back around the kernels (two extra passes
    over memory).
    """
    if q.size == 0 or v.size == 0:  # no positions, no rows or no value features
        return jnp.zeros(v.shape, spec.dtype)
    first_key = None
    if spec.bounded:
        first_key = maths.first_keys(spec.seq_len, spec.window, segment_ids)
    if segment_ids is not None:  # positions restart at each segment's start
        positions = maths.segment_positions(segment_ids)
        sin, cos = sin[positions], cos[positions]
    extras = (first_key, bias)
    axis = mapped_axis(q, k, v, others=(mask, sin, cos, *extras))
    if axis is None or axis > q.ndim - 2:  # mapped along the sequence or feature axis
        return _run_typed(q, k, v, mask, sin, cos, extras, spec, chosen)

    @jax.custom_batching.custom_vmap
    def call(q, k, v, mask, sin, cos, extras):
        return _run_typed(q, k, v, mask, sin, cos, extras, spec, chosen)

    @call.def_vmap
    def _keep_in_place(axis_size, in_batched, q, k, v, mask, sin, cos, extras):
        # jax moved the mapped axis to the front; move it back, so that XLA cancels
        # the two transposes, and run with it as one more batch axis. The unmapped
        # per-sequence arrays (segment positions' tables, first keys, a bias) get a
        # size-1 axis there, so they keep broadcasting against the axes they meant.
        inner = q.ndim - 3  # the mapped function's batch axes
        sin, cos = (_with_mapped_axis(t, 2, inner, axis) for t in (sin, cos))
        first_key, bias = extras
        extras = (
            _with_mapped_axis(first_key, 1, inner, axis),
            _with_mapped_axis(bias, 0, inner, axis),
        )
        q, k, v = (jnp.moveaxis(x, 0, axis) for x in (q, k, v))
        batch_shape = q.shape[:-2]
        spec_here = spec.replace(batch_shape=batch_shape)
        out = _run_typed(q, k, v, mask, sin, cos, extras, spec_here, chosen)
        return jnp.moveaxis(out, axis, 0), True

    return call(q, k, v, mask, sin, cos, extras)


def _with_mapped_axis(x, trailing, inner, axis):
    """`x` (None, or an array whose axes before its last `trailing` broadcast against
    `inner` batch axes) with a size-1 axis at batch axis `axis` (where a mapped axis
    goes back in), when it has batch axes at all."""
    if x is None or x.ndim == trailing:
        return x
    x = x.reshape((1,) * (inner - (x.ndim - trailing)) + x.shape)
    return jnp.expand_dims(x, axis)


def _run_typed(q, k, v, mask, sin, cos, extras, spec: AttentionSpec, chosen: Plan):
    """`_run`, or each device's shard of it where the inputs' types say they are
    sharded (JAX's explicit sharding mode, `explicit_mode`)."""
    typed = explicit_mode.typed_spec(q)
    if typed is None:
        return _run(q, k, v, mask, sin, cos, extras, spec=spec, chosen=chosen)
    run_local = functools.partial(_run, chosen=chosen)
    return explicit_mode.run_sharded(
        q, k, v, mask, sin, cos, extras, typed=typed, spec=spec, chosen=chosen, run_local=run_local
    )


def _grouped(q, k, v, first_key, spec: AttentionSpec):
    """Grouped-query heads as implementations take them: q `(*b, Hkv, G, S, D)`, k and
    v `(*b, Hkv, 1, S, D)` (a view, no copy), `first_key` broadcasting alike."""
    groups = spec.kv_groups
    *batch, heads = spec.batch_shape
    q = q.reshape(*batch, heads // groups, groups, *q.shape[-2:])
    k, v = (x[..., None, :, :] for x in (k, v))
    if first_key is not None and first_key.ndim > 1:  # its head axis is 1
        first_key = first_key[..., None, :]
    return q, k, v, first_key, spec.replace(batch_shape=q.shape[:-2])


@functools.partial(jax.jit, static_argnames=("spec", "chosen"))
def _run(q, k, v, mask, sin, cos, extras, *, spec: AttentionSpec, chosen: Plan):
    first_key, bias = extras
    accum = spec.accum_dtype
    rope = None
    tables = tuple(_of_batch_rank(t, spec) for t in (sin, cos))
    if _takes_raw(chosen, spec, sin, bias):  # swish and RoPE in it (`Implementation.takes_raw`)
        rope = tables
        q, k = q.astype(spec.dtype), k.astype(spec.dtype)
    elif _kernel_pass(chosen, spec, q, tables[0]):
        q, k = (
            prepare_pass.differentiable_prepared(
                x.astype(spec.dtype), spec.pre_activation, *tables, len(spec.batch_shape), 0
            )
            for x in (q, k)
        )
    else:
        q = maths.prepare(q, spec.pre_activation, sin, cos, accum)
        k = maths.prepare(k, spec.pre_activation, sin, cos, accum)
    v = v.astype(spec.dtype)
    native = bias is not None and chosen.forward.takes_bias and chosen.gradient.takes_bias
    if bias is not None and not native:
        q, k = maths.bias_as_feature(q, k, bias, spec.scale)
    inner = spec
    if spec.kv_groups > 1:
        q, k, v, first_key, inner = _grouped(q, k, v, first_key, spec)
        if rope is not None:  # one table for the group axis too
            rope = tuple(t[..., None, :, :] for t in rope)
    bias = jnp.broadcast_to(bias, spec.batch_shape).reshape(q.shape[:-2]) if native else None
    if chosen.forward == chosen.gradient:
        out = _call(chosen.forward, q, k, v, inner, mask, first_key, bias, rope)
    else:
        out = _forward_or_gradient(q, k, v, mask, first_key, bias, inner, chosen)
    return out.reshape(*spec.batch_shape, *out.shape[-2:]).astype(spec.dtype)


def _kernel_pass(chosen: Plan, spec: AttentionSpec, q, sin) -> bool:
    """Whether q and k go through `prepare_pass`'s kernel (`sin` of q's rank): where it
    serves the call and the plan's implementations read them in `spec.dtype` anyway."""
    kernels = chosen.forward.reads_inputs_dtype and chosen.gradient.reads_inputs_dtype
    return kernels and prepare_pass.serves(spec, q.shape, sin.shape)


def _takes_raw(chosen: Plan, spec: AttentionSpec, sin, bias) -> bool:
    """Whether the plan's one implementation takes q and k raw with the RoPE tables:
    where it says so, no bias is handed over as a feature of q and k, and the tables
    (`sin`, `(..., S, D/2)`: per sequence with segments) vary along leading axes of
    the batch only (every row's angles are row `n // every` of them, one table for a
    group of grouped heads)."""
    impl = chosen.forward
    if impl != chosen.gradient or bias is not None or not impl.takes_raw(spec):
        return False
    batch = spec.batch_shape
    lead = sin.shape[:-2]
    if len(lead) > len(batch):
        return False
    lead = (1,) * (len(batch) - len(lead)) + lead
    same = next((i for i, (a, b) in enumerate(zip(lead, batch)) if a != b), len(batch))
    if any(size != 1 for size in lead[same:]):  # the angles vary after an axis they share
        return False
    return spec.kv_groups == 1 or lead[-1] == 1  # grouped heads: one table for all heads


def _of_batch_rank(table, spec: AttentionSpec):
    """A RoPE table `(..., S, D/2)` with leading axes of size 1 up to q's rank."""
    missing = len(spec.batch_shape) + 2 - table.ndim
    return table.reshape((1,) * missing + table.shape)


def _call(implementation, q, k, v, spec, mask, first_key, bias=None, rope=None):
    """`implementation(q, k, v, spec, mask)`, with `first_key` when the spec is bounded
    (implementations written before segments and windows take five arguments),
    `bias=` when it takes the array bias itself, and `rope=` when it takes q and k
    raw."""
    extra = {} if bias is None else {"bias": bias}
    if rope is not None:
        extra["rope"] = rope
    if first_key is None:
        return implementation(q, k, v, spec, mask, **extra)
    return implementation(q, k, v, spec, mask, first_key, **extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _forward_or_gradient(q, k, v, mask, first_key, bias, spec, chosen):
    """`chosen.forward` when no gradient is taken; `chosen.gradient` otherwise. Both
    return `spec.dtype`, as a custom_vjp's two forward rules must agree."""
    return _call(chosen.forward, q, k, v, spec, mask, first_key, bias).astype(spec.dtype)


def _forward_or_gradient_fwd(q, k, v, mask, first_key, bias, spec, chosen):
    def run(q, k, v, *bias):
        out = _call(chosen.gradient, q, k, v, spec, mask, first_key, *bias)
        return out.astype(spec.dtype)

    return jax.vjp(run, q, k, v, *(() if bias is None else (bias,)))


def _forward_or_gradient_bwd(spec, chosen, vjp, d_out):
    q_k_v_bias = vjp(d_out)
    bias = q_k_v_bias[3] if len(q_k_v_bias) > 3 else None
    return (*q_k_v_bias[:3], None, None, bias)


_forward_or_gradient.defvjp(_forward_or_gradient_fwd, _forward_or_gradient_bwd)


def implementation_from_dict(data: dict) -> Implementation:
    """The implementation `Implementation.to_dict` described."""
    data = dict(data)
    name = data.pop("name", None)
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown implementation {name!r} in {data!r}.")
    return type(IMPLEMENTATIONS[name])(**data)
