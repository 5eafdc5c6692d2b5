"""The implementation protocol and the dispatch table, on specs (no GPU needed)."""

import dataclasses
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SMALL_CHUNKED, assert_all_close, on_hopper, out_and_grads, random_inputs, spec

import eqx_xlstm as ex
from eqx_xlstm import dispatch
from eqx_xlstm.implementations import (
    Chunked,
    CuDNN,
    Implementation,
    Linear,
    Mosaic,
    Reference,
    Triton,
)


def defaults(s):
    chosen = dispatch.plan(s)
    return chosen.forward.name, chosen.gradient.name


def test_default_table_on_a_cpu():
    assert defaults(spec(seq_len=4096)) == ("chunked", "chunked")
    assert defaults(spec(seq_len=Chunked().block)) == ("reference", "reference")
    assert defaults(spec(activation="none", seq_len=1000)) == ("linear", "linear")
    assert defaults(spec(activation="none", seq_len=128)) == ("reference", "reference")
    assert defaults(spec(activation="none", mask="explicit", seq_len=300)) == ("reference",) * 2
    # 16-bit sigmoid on a CPU: the kernels would run interpreted, so never by default.
    assert defaults(spec(activation="sigmoid", dtype=jnp.bfloat16, seq_len=4096)) == (
        "chunked",
        "chunked",
    )


def test_default_table_on_hopper():
    assert defaults(on_hopper()) == ("cudnn", "cudnn")
    assert defaults(on_hopper(activation="sigmoid")) == ("mosaic", "mosaic")
    assert defaults(on_hopper(dtype=jnp.float32)) == ("reference", "reference")
    assert defaults(on_hopper(dtype=jnp.float32, seq_len=4096)) == ("chunked", "chunked")
    # 'none': the kernel forward up to S=4096, its gradient up to 2048, else the
    # linear form (measured on an H200, docs/benchmarks.md).
    assert defaults(on_hopper(activation="none", seq_len=2048)) == ("mosaic", "mosaic")
    assert defaults(on_hopper(activation="none", seq_len=4096)) == ("mosaic", "linear")
    assert defaults(on_hopper(activation="none", seq_len=8192)) == ("linear", "linear")
    # Not Hopper: Triton for sigmoid, the linear form for 'none'.
    ampere = dict(gpu_capability="8.0")
    assert defaults(on_hopper(activation="sigmoid", **ampere)) == ("triton", "triton")
    assert defaults(on_hopper(activation="none", seq_len=2048, **ampere)) == ("linear",) * 2
    # Segments, windows and grouped heads: cuDNN's own window and grouped heads for
    # softmax; else the Mosaic kernels, which skip the tiles no query sees.
    for features in (dict(window=1024), dict(kv_groups=8)):
        assert defaults(on_hopper(**features)) == ("cudnn",) * 2
    assert defaults(on_hopper(activation="sigmoid", window=1024)) == ("mosaic",) * 2
    assert defaults(on_hopper(activation="sigmoid", kv_groups=8)) == ("mosaic",) * 2
    assert defaults(on_hopper(segmented=True, window=64, dqk=64, dv=64)) == ("mosaic",) * 2
    assert defaults(on_hopper(segmented=True, dqk=128, dv=128)) == ("mosaic",) * 2
    assert defaults(on_hopper(activation="sigmoid", segmented=True)) == ("mosaic",) * 2
    # A learnable sigmoid bias (an array): the Triton kernels read it per row.
    assert defaults(on_hopper(activation="sigmoid", array_bias=True)) == ("triton",) * 2
    assert defaults(on_hopper(activation="none", window=64, seq_len=8192)) == ("mosaic",) * 2
    # Not Hopper: the Triton kernels.
    assert defaults(on_hopper(activation="sigmoid", segmented=True, **ampere)) == ("triton",) * 2
    # 'none' with segments at long S: the kernels or the linear form, chosen at run time.
    none_packed = on_hopper(activation="none", segmented=True, seq_len=8192)
    assert defaults(none_packed) == ("tiles_or_linear",) * 2
    none_packed_ampere = none_packed.replace(gpu_capability="8.0")
    assert defaults(none_packed_ampere) == ("linear",) * 2


def test_pallas_alias_picks_the_best_kernel():
    chosen = dispatch.plan(on_hopper(activation="sigmoid"), "pallas")
    assert (chosen.forward.name, chosen.gradient.name) == ("mosaic", "mosaic")
    chosen = dispatch.plan(on_hopper(), "pallas")
    assert (chosen.forward.name, chosen.gradient.name) == ("mosaic", "mosaic")
    chosen = dispatch.plan(on_hopper(activation="sigmoid", kv_groups=4), "pallas")
    assert (chosen.forward.name, chosen.gradient.name) == ("mosaic", "mosaic")
    chosen = dispatch.plan(on_hopper(dqk=32, dv=32), "pallas")  # too narrow for Mosaic
    assert (chosen.forward.name, chosen.gradient.name) == ("triton", "triton")
    chosen = dispatch.plan(spec(dqk=16, dv=16), "pallas")
    assert chosen.forward.name in ("mosaic", "triton")  # interpret mode on a CPU


@pytest.mark.parametrize(
    "implementation, changes, reason",
    [
        (CuDNN(), {}, "needs an NVIDIA GPU"),
        (CuDNN(), dict(platform="gpu"), "float16 or bfloat16"),
        (CuDNN(), dict(platform="gpu", dtype=jnp.bfloat16, activation="sigmoid"), "softmax only"),
        (CuDNN(), dict(platform="gpu", dtype=jnp.bfloat16, mask="explicit"), "causal mask only"),
        (CuDNN(), dict(platform="gpu", dtype=jnp.bfloat16, dv=32), "equal q/k/v head dims"),
        (Triton(), dict(mask="explicit"), "causal mask only"),
        (Triton(), dict(dqk=8, dv=8), "multiples of 16"),
        (Triton(), dict(platform="gpu"), "float16 or bfloat16"),
        (Triton(), dict(platform="gpu", dtype=jnp.bfloat16, dqk=48, dv=48), "power-of-two"),
        (Mosaic(), dict(dtype=jnp.float32), "float16 or bfloat16"),
        (Mosaic(), dict(dtype=jnp.bfloat16, dqk=32, dv=32), "64 or 128"),
        (Mosaic(), dict(dtype=jnp.bfloat16, platform="gpu", gpu_capability="8.0"), "Hopper"),
        (Mosaic(), dict(dtype=jnp.bfloat16, platform="tpu"), "Hopper GPU, or Mosaic GPU"),
        (Linear(), dict(activation="sigmoid"), "'none' only"),
        (Linear(), dict(activation="none", mask="explicit"), "causal mask only"),
    ],
)
def test_each_implementation_says_why_it_cannot_serve(implementation, changes, reason):
    assert reason in implementation.unsupported(spec(**changes))


@pytest.mark.parametrize(
    "implementation, changes",
    [
        (Reference(), dict(mask="explicit")),
        (Chunked(), dict(mask="explicit", activation="none")),
        (Linear(), dict(activation="none")),
        (CuDNN(), dict(platform="gpu", dtype=jnp.float16)),
        (Triton(), dict(platform="gpu", dtype=jnp.bfloat16, dqk=128, dv=64)),
        (Triton(), dict(dqk=48, dv=48)),  # interpret mode takes any multiple of 16
        (Mosaic(), dict(platform="gpu", gpu_capability="9.0", dtype=jnp.bfloat16)),
    ],
)
def test_each_implementation_serves_what_it_should(implementation, changes):
    assert implementation.unsupported(spec(**changes)) is None


def test_forced_paths_refuse_with_the_reason():
    q, k, v, _ = random_inputs(seq=8, dqk=16, dv=16)
    reason = "NVIDIA GPU" if jax.default_backend() != "gpu" else "float16 or bfloat16"
    with pytest.raises(ValueError, match=f"implementation='cudnn' cannot serve.*{reason}"):
        ex.attention(q, k, v, implementation="cudnn")
    mask = jnp.ones((8, 8), bool)
    for name in ("triton", "mosaic", "pallas", "linear"):
        with pytest.raises(ValueError, match=f"implementation={name!r}.*causal mask only"):
            ex.attention(q, k, v, mask, activation_function="none", implementation=name)
    with pytest.raises(ValueError, match="implementation='triton'.*multiples of 16"):
        ex.attention(*random_inputs(seq=8)[:3], implementation=Triton())
    valid_names_end = re.escape("'tiles_or_linear', 'pallas'.")
    with pytest.raises(ValueError, match=valid_names_end):
        ex.attention(q, k, v, implementation="flash")


def test_tuning_is_a_static_argument_not_a_global():
    # Two block sizes give two compilations and the right answer each time; no cache
    # needs clearing between them.
    q, k, v, _ = random_inputs(seq=13)
    want = ex.attention(q, k, v, implementation="reference")
    for block in (5, 4, 5):
        got = ex.attention(q, k, v, implementation=Chunked(block=block))
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert Chunked(block=5) == Chunked(block=5) and hash(Chunked(5)) == hash(Chunked(5))
    with pytest.raises(ValueError, match="block"):
        Chunked(block=0)
    with pytest.raises(ValueError, match="powers of two"):
        Triton(forward=(48, 64, 4, 2))
    assert dispatch.implementation_from_dict(Triton().to_dict()) == Triton()


@dataclasses.dataclass(frozen=True)
class Recording(Implementation):
    """The reference path, recording which pass traced it."""

    name = "recording"
    label: str = ""
    traces: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def unsupported(self, spec):
        return None

    def __call__(self, q, k, v, spec, mask):
        self.traces.append(self.label)
        out = Reference()(q, k, v, spec, mask)  # float32
        return out.astype(spec.dtype) if self.label == "forward" else out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_plan_may_split_forward_and_gradient(dtype):
    # The forward implementation serves calls without a gradient; the gradient one
    # serves differentiated calls, forward included, so its residuals are its own. With
    # bf16, one returns bf16 and the other float32 (as Mosaic and Linear do).
    q, k, v, g = (x.astype(dtype) for x in random_inputs(seq=11, seed=3))
    forward, gradient = Recording(label="forward"), Recording(label="gradient")
    s = spec(batch_shape=(2, 3), seq_len=11, dqk=8, dv=6, dtype=dtype)
    sin, cos = ex.nn.rope.rope_tables(11, 8, None, None, 1e4)
    chosen = dispatch.Plan(forward, gradient)
    run = lambda q, k, v: dispatch.run(q, k, v, None, sin, cos, s, chosen)
    expected = out_and_grads(q, k, v, g, implementation="reference")
    np.testing.assert_allclose(np.asarray(run(q, k, v), np.float32), expected[0], atol=1e-6)
    assert forward.traces == ["forward"] and gradient.traces == []
    got = jax.jit(lambda q, k, v, g: (lambda o, f: (o, *f(g)))(*jax.vjp(run, q, k, v)))(q, k, v, g)
    assert gradient.traces == ["gradient"] and forward.traces == ["forward"]
    assert_all_close([np.asarray(x.astype(jnp.float32)) for x in got], expected, dtype)


def test_vmap_keeps_the_mapped_axis_in_place():
    # eqx.filter_vmap over heads (axis 1) gives the same as one call with heads as a
    # batch axis, and no transposes around the implementation (two extra passes over
    # memory otherwise).
    q, k, v, g = random_inputs(seq=40, batch=(2, 3), dqk=16, dv=16, seed=5)
    fn = lambda q, k, v: ex.attention(
        q, k, v, activation_function="none", implementation=SMALL_CHUNKED
    )
    vmapped = eqx.filter_vmap(fn, in_axes=1, out_axes=1)
    np.testing.assert_allclose(vmapped(q, k, v), fn(q, k, v), atol=1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)
    for a, b in zip(
        jax.grad(loss(vmapped), (0, 1, 2))(q, k, v), jax.grad(loss(fn), (0, 1, 2))(q, k, v)
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
    transposes = lambda f: jax.jit(f).lower(q, k, v).compile().as_text().count("transpose(")
    assert transposes(lambda *x: vmapped(*x)) == transposes(fn), "the mapped axis was moved"
    # Mapped along axis 0, or not the innermost transformation: unchanged behaviour.
    heads_first = [x.transpose(1, 0, 2, 3) for x in (q, k, v)]
    by_first = eqx.filter_vmap(fn)(*heads_first)
    np.testing.assert_allclose(by_first.transpose(1, 0, 2, 3), fn(q, k, v), atol=1e-5)
    per_head_grad = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v))), in_axes=1, out_axes=1)
    np.testing.assert_allclose(
        per_head_grad(q, k, v), jax.grad(lambda q: jnp.sum(fn(q, k, v)))(q), atol=1e-5
    )


def test_mosaic_takes_raw_queries_and_keys_where_bounded():
    # Dispatch hands Mosaic q and k before swish and RoPE (its backward kernels return
    # their gradients) for segments and windows, where the RoPE tables vary along
    # leading axes of the batch only (row n reads table row n // every; one table for a
    # group of grouped heads) and no bias is folded into q and k; otherwise the XLA
    # pass runs as before.
    plan = dispatch.Plan
    mosaic, triton = plan(Mosaic(), Mosaic()), plan(Triton(), Triton())
    table = lambda *lead: jnp.zeros((*lead, 64, 32))
    bounded = on_hopper(window=16, batch_shape=(2, 4))
    takes = lambda spec, sin, bias=None, chosen=mosaic: dispatch._takes_raw(chosen, spec, sin, bias)
    assert takes(bounded, table())  # shared by every row
    assert takes(bounded, table(2, 1))  # per sequence (segments), shared by its heads
    assert takes(bounded, table(2, 4))
    assert takes(on_hopper(segmented=True, batch_shape=(2, 4)), table(1))
    assert not takes(bounded, table(1, 4))  # varies along heads only
    assert not takes(on_hopper(batch_shape=(2, 4)), table())  # plain causal
    assert not takes(bounded, table(), bias=jnp.zeros(2))  # a bias feature
    assert not takes(bounded, table(), chosen=triton)
    assert not takes(bounded, table(), chosen=plan(Mosaic(), Triton()))
    grouped = on_hopper(window=16, batch_shape=(2, 4), kv_groups=2)
    assert takes(grouped, table(2, 1)) and not takes(grouped, table(2, 4))


def test_without_the_mlir_bindings_mosaic_keeps_the_xla_pass(monkeypatch):
    # The register-by-register epilogue builds MLIR with JAX's private bindings
    # (`jax_private.mlir_modules`); where they moved, Mosaic takes prepared q and k.
    from eqx_xlstm.implementations.mosaic import jax_private

    bounded = on_hopper(window=16)
    assert Mosaic().takes_raw(bounded)

    def moved():
        raise ImportError("not here")

    monkeypatch.setattr(jax_private, "mlir_modules", moved)
    assert not Mosaic().takes_raw(bounded)
