"""Run by tests/test_context_parallel.py in a process with 4 CPU host devices: attention
on inputs sharded over the sequence axis, automatic (`jax.jit` on `NamedSharding`
inputs) and explicit (`context_parallel_attention` inside `shard_map`), against one
device; and the per-device memory of a sequence-sharded gradient. Prints one JSON line
per case."""

import functools
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from sharded_attention_check import COLLECTIVES, compiled_run  # this folder is the script's path

import eqx_xlstm as ex

SEQ = PartitionSpec(None, None, "x", None)
SMALL_TRITON = ex.implementations.Triton(forward=(16, 16, 4, 1), backward=(16, 16, 4, 1))


def inputs(seq_len, batch=2, heads=2, dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (batch, heads, seq_len, dim)) for key in keys]


def value_and_grads(f):
    loss = lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    return lambda q, k, v: (f(q, k, v), *grad(q, k, v))


def rel_err(got, want):
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want))


def report(**row):
    print(json.dumps(row), flush=True)


def collectives(hlo):
    return {c: n for c in COLLECTIVES if (n := len(re.findall(c + r"(?:-start)?\(", hlo)))}


def report_sequence_sharded(case, mesh, f, q, k, v, *replicated, per_position=None):
    """Run `f(q, k, v, *replicated)` on one device and with q, k, v sharded over the
    sequence; report the compiled program's collectives and all-gathered dtypes,
    whether the first `per_position` results (all by default) kept the inputs'
    sharding, and the largest relative error of every result."""
    want = jax.tree.leaves(jax.jit(f)(q, k, v, *replicated))
    sharded = [jax.device_put(x, NamedSharding(mesh, SEQ)) for x in (q, k, v)]
    got, hlo = compiled_run(f, *sharded, *replicated)
    got = jax.tree.leaves(got)
    gathered = re.findall(r"= (\w+)\[[\d,]*\][^ ]* all-gather\(", hlo)
    report(
        case=case,
        collectives=collectives(hlo),
        gathered_dtypes=sorted(set(gathered)),
        sharded_as_inputs=all(
            x.sharding.is_equivalent_to(NamedSharding(mesh, SEQ), x.ndim)
            for x in got[:per_position]
        ),
        max_rel_err=rel_err(got, want),
    )


def automatic(mesh):
    cases = [
        ("chunked", "softmax", 256),
        ("chunked", "sigmoid", 256),
        ("linear", "none", 256),
        ("chunked", "softmax", 252),  # not a multiple of 4 devices: gathered, still exact
        (SMALL_TRITON, "softmax", 256),  # Pallas interpret mode: the kernels as pieces
        (SMALL_TRITON, "sigmoid", 256),
    ]
    for implementation, activation, seq_len in cases:
        f = value_and_grads(
            lambda q, k, v, i=implementation, a=activation: ex.attention(
                q,
                k,
                v,
                activation_function=a,
                qk_pre_activation_function="swish",
                implementation=i,
            )
        )
        name = getattr(implementation, "name", implementation)
        report_sequence_sharded(f"auto-{name}-{activation}-{seq_len}", mesh, f, *inputs(seq_len))


def automatic_bounded(mesh):
    """Segments and a sliding window on sequence-sharded inputs: the ring with each
    query's first key, relative to each key chunk it meets; through the chunked path's
    pieces and the Triton kernels' (Pallas interpret mode), whose pieces also take
    grouped-query heads (one K/V head for two query heads, with segments)."""
    ids = jnp.sort(jax.random.randint(jax.random.key(4), (2, 1, 256), 0, 5), axis=-1)
    chunked = ex.implementations.Chunked(16)
    for name, implementation, activation, kwargs in (
        ("softmax", chunked, "softmax", {"segment_ids": ids, "sliding_window": 70}),
        ("none", chunked, "none", {"sliding_window": 40}),
        ("triton-softmax", SMALL_TRITON, "softmax", {"segment_ids": ids, "sliding_window": 70}),
        ("triton-sigmoid", SMALL_TRITON, "sigmoid", {"sliding_window": 40}),
        ("triton-grouped-softmax", SMALL_TRITON, "softmax", {"segment_ids": ids}),
    ):
        f = value_and_grads(
            lambda q, k, v, a=activation, i=implementation, kw=kwargs: ex.attention(
                q, k, v, activation_function=a, implementation=i, **kw
            )
        )
        q, k, v = inputs(256)
        if "grouped" in name:
            k, v = k[:, :1], v[:, :1]
        report_sequence_sharded(f"bounded-ring-{name}", mesh, f, q, k, v)


def automatic_array_bias(mesh):
    """A learnable sigmoid bias per head on sequence-sharded inputs through the Triton
    kernels' ring: each query's bias travels with it as a per-position array; output
    and the gradients of q, k, v and the bias against one device."""
    bias = jnp.array([-2.0, -1.0])
    for name, kwargs in (("bias", {}), ("bias-window", {"sliding_window": 40})):

        def loss(q, k, v, b, kw=kwargs):
            options = dict(activation_function="sigmoid", implementation=SMALL_TRITON)
            out = ex.attention(q, k, v, sigmoid_bias=b, **options, **kw)
            return jnp.sum(jnp.sin(out)), out

        # (out, dq, dk, dv, d_bias): the bias's gradient is per head, not per position.
        f = lambda *xs: jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*xs)[::-1]
        case = f"ring-triton-{name}"
        report_sequence_sharded(case, mesh, f, *inputs(256, seed=3), bias, per_position=4)


def explicit(mesh):
    from eqx_xlstm import context_parallel_attention

    seq_len, n = 256, mesh.devices.size
    q, k, v = inputs(seq_len, seed=1)
    order = [c for d in range(n) for c in (d, 2 * n - 1 - d)]
    chunks = lambda x: x.reshape(*x.shape[:-2], 2 * n, seq_len // (2 * n), x.shape[-1])
    zigzag = lambda x: chunks(x)[..., order, :, :].reshape(x.shape)
    unzig = lambda x: chunks(x)[..., np.argsort(order), :, :].reshape(x.shape)
    for activation in ("softmax", "sigmoid", "none"):
        one = lambda q, k, v, a=activation: ex.attention(
            q, k, v, activation_function=a, qk_pre_activation_function="swish"
        )
        want = jax.jit(value_and_grads(one))(q, k, v)
        for layout in ("contiguous", "zigzag") if activation == "softmax" else ("zigzag",):
            inner = functools.partial(
                context_parallel_attention,
                axis_name="x",
                layout=layout,
                activation_function=activation,
                qk_pre_activation_function="swish",
                block=16,
            )
            mapped = jax.shard_map(inner, mesh=mesh, in_specs=SEQ, out_specs=SEQ)
            there, back = (zigzag, unzig) if layout == "zigzag" else (lambda x: x,) * 2
            f = value_and_grads(lambda q, k, v, m=mapped, t=there, b=back: b(m(t(q), t(k), t(v))))
            report(
                case=f"explicit-{activation}-{layout}",
                max_rel_err=rel_err(jax.jit(f)(q, k, v), want),
            )


def memory(mesh, seq_len=4096):
    """Bytes a device holds for a sequence-sharded gradient (arguments, outputs and
    temporaries of the compiled program), against one device's for the whole."""
    for implementation, activation in (("chunked", "softmax"), ("linear", "none")):
        f = lambda q, k, v, i=implementation, a=activation: ex.attention(
            q, k, v, activation_function=a, implementation=i
        )
        grad = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
        shapes = [jax.ShapeDtypeStruct((1, 4, seq_len, 64), jnp.float32)] * 3
        per_device = lambda compiled: (
            (m := compiled.memory_analysis()).argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
        )
        one = per_device(jax.jit(grad).lower(*shapes).compile())
        sharded = [
            jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, SEQ))
            for s in shapes
        ]
        many = per_device(jax.jit(grad).lower(*sharded).compile())
        report(case=f"memory-{implementation}-{activation}", one=one, sharded=many)


def explicit_mode():
    """JAX's explicit sharding mode (Explicit mesh axes): every path runs on inputs typed
    as sharded over a leading or the sequence axis (inside shard_map), also under
    jax.vmap (as the layers call it), values and gradients as one device's; a sharded
    feature axis is a ValueError naming the argument."""
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    heads = PartitionSpec(None, "x")
    q, k, v = inputs(64, batch=2, heads=4)
    for name, spec, implementation, activation, vmapped in (
        ("heads-chunked", heads, "chunked", "softmax", False),
        ("sequence-chunked", SEQ, "chunked", "softmax", False),
        ("sequence-chunked-sigmoid", SEQ, "chunked", "sigmoid", False),
        ("sequence-linear", SEQ, "linear", "none", False),
        ("heads-triton", heads, SMALL_TRITON, "sigmoid", False),
        ("sequence-triton", SEQ, SMALL_TRITON, "softmax", False),
        ("vmap-heads-triton", heads, SMALL_TRITON, "softmax", True),
        ("vmap-sequence-chunked", SEQ, "chunked", "sigmoid", True),
    ):
        attend = lambda q, k, v, i=implementation, a=activation: ex.attention(
            q, k, v, implementation=i, activation_function=a, qk_pre_activation_function="swish"
        )
        f = value_and_grads(jax.vmap(attend) if vmapped else attend)
        want = jax.jit(f)(q, k, v)
        try:
            with jax.set_mesh(mesh):
                sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
                compiled = jax.jit(f).lower(*sharded).compile()
                got, hlo = compiled(*sharded), compiled.as_text()
            row = {
                "max_rel_err": rel_err(got, want),
                "out_spec": list(got[0].sharding.spec) + [None] * (4 - len(got[0].sharding.spec)),
                "collectives": collectives(hlo),
            }
        except Exception as err:  # reported, so that the other checks' tests still run
            row = {"crash": f"{type(err).__name__}: {err}"[:2000]}
        report(case=f"mode-explicit-{name}", **row)
    language_model_explicit()
    explicit_mode_features()
    explicit_mode_sequence_features()
    try:
        with jax.set_mesh(mesh):
            sharded = jax.device_put(q, NamedSharding(mesh, PartitionSpec(None, None, None, "x")))
            jax.jit(lambda q: ex.attention(q, q, q))(sharded)
        row = {"error": None}
    except ValueError as err:
        row = {"error": str(err)}
    report(case="mode-explicit-features", **row)


def explicit_mode_features():
    """Packed segments, a window, grouped-query heads and a per-head sigmoid bias on
    inputs typed as sharded over the batch, and over the sequence (the ring): values
    and gradients as one device's."""
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    q = inputs(48, batch=4, heads=4)[0]
    _, k, v = inputs(48, batch=4, heads=2, seed=1)
    ids = jnp.repeat(jnp.arange(3), 16)[None, None, :] + jnp.arange(4)[:, None, None]
    bias = jnp.linspace(-3.0, -1.0, 4)

    def attend(q, k, v, bias):
        return ex.attention(
            q,
            k,
            v,
            activation_function="sigmoid",
            segment_ids=ids,
            sliding_window=20,
            sigmoid_bias=bias,
            implementation="chunked",
            qk_pre_activation_function="swish",
        )

    f = lambda q, k, v, bias: jax.value_and_grad(
        lambda *xs: jnp.sum(attend(*xs) ** 2), argnums=(0, 1, 2, 3)
    )(q, k, v, bias)
    want = jax.tree.leaves(jax.jit(f)(q, k, v, bias))
    for name, spec in (("batch", PartitionSpec("x")), ("sequence", SEQ)):
        try:
            with jax.set_mesh(mesh):
                sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
                compiled = jax.jit(f).lower(*sharded, bias).compile()
                got = jax.tree.leaves(compiled(*sharded, bias))
            row = {
                "max_rel_err": rel_err(got, want),
                "collectives": collectives(compiled.as_text()),
            }
        except ValueError as err:
            row = {"error": str(err)}
        except Exception as err:
            row = {"crash": f"{type(err).__name__}: {err}"[:2000]}
        report(case=f"mode-explicit-{name}-features", **row)


def explicit_mode_sequence_features():
    """Packed segments and a window on inputs typed as sharded over the sequence: the
    ring in explicit mode, each query's first key going round with it, RoPE restarted
    per segment from tables sharded alike; through the chunked path's pieces and the
    Triton kernels' (interpret mode). Values and gradients against one device."""
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    q, k, v = inputs(64, batch=2, heads=2, seed=2)
    ids = jnp.repeat(jnp.arange(3), jnp.array([20, 30, 14]))
    for name, implementation, activation in (
        ("chunked-softmax", "chunked", "softmax"),
        ("chunked-none", "chunked", "none"),
        ("triton-sigmoid", SMALL_TRITON, "sigmoid"),
    ):

        def loss(q, k, v, i=implementation, a=activation):
            options = dict(segment_ids=ids, sliding_window=25, implementation=i)
            out = ex.attention(q, k, v, activation_function=a, **options)
            return jnp.sum(out**2)

        f = jax.value_and_grad(loss, argnums=(0, 1, 2))
        want = jax.tree.leaves(jax.jit(f)(q, k, v))
        with jax.set_mesh(mesh):
            sharded = [jax.device_put(x, NamedSharding(mesh, SEQ)) for x in (q, k, v)]
            compiled = jax.jit(f).lower(*sharded).compile()
            got = jax.tree.leaves(compiled(*sharded))
        report(
            case=f"mode-explicit-sequence-{name}-features",
            max_rel_err=rel_err(got, want),
            collectives=collectives(compiled.as_text()),
        )


def language_model_explicit():
    """A language model's loss and gradients on tokens typed as sharded over a 2 x 2
    (data, seq) mesh of Explicit axes, against one device."""
    axes = ("data", "seq")
    mesh = jax.make_mesh((2, 2), axes, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 32)
    for activation in ("softmax", "none"):
        config = ex.ModelConfig(
            vocab_size=32,
            context_length=64,
            embedding_dim=32,
            num_heads=2,
            num_blocks=1,
            backend_config=ex.mLSTMBackendAttentionConfig(activation_function=activation),
        )
        model = ex.LanguageModel(config, key=jax.random.key(0))
        loss = lambda m, t: jnp.mean(jnp.sin(jax.vmap(m)(t)))
        value_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
        want = jax.tree.leaves(value_grad(model, tokens))
        try:
            with jax.set_mesh(mesh):
                sharded = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(*axes)))
                got = jax.tree.leaves(value_grad(model, sharded))
            row = {"max_abs_err": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))}
        except Exception as err:
            row = {"crash": f"{type(err).__name__}: {err}"[:2000]}
        report(case=f"mode-explicit-lm-{activation}", **row)


if __name__ == "__main__":
    mesh = Mesh(np.array(jax.devices()), ("x",))
    automatic(mesh)
    automatic_bounded(mesh)
    automatic_array_bias(mesh)
    explicit(mesh)
    memory(mesh)
    explicit_mode()
