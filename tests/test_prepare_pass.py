"""The swish + RoPE pass as a Triton kernel (`prepare_pass`), in Pallas interpret mode:
its results against XLA's pass, where dispatch uses it, and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import out_and_grads, random_inputs

from eqx_xlstm import maths
from eqx_xlstm.implementations import Triton, prepare_pass
from eqx_xlstm.nn.rope import precompute_freqs


def xla_pass(x, pre_activation, sin, cos):
    return maths.prepare(x, pre_activation, sin, cos, jnp.float32).astype(x.dtype)


def assert_within_an_ulp(got, expected):
    """Equal but for a rare last-bit difference (float32 maths rounded once, the
    operations ordered differently)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    eps = float(jnp.finfo(got.dtype).eps)
    got, expected = (np.asarray(x, np.float32) for x in (got, expected))
    assert np.mean(got != expected) < 1e-3
    np.testing.assert_array_less(np.abs(got - expected), 2 * eps * np.abs(expected) + 1e-6)


def random_rows(shape, dtype, seed=0):
    return (3 * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("pre_activation", ["swish", "none"])
def test_kernel_equals_the_xla_pass(dtype, pre_activation):
    x = random_rows((2, 3, 64, 64), dtype)
    sin, cos = precompute_freqs(64, 64)
    got = prepare_pass.prepare_rows(x, pre_activation, sin, cos, interpret=True)
    assert_within_an_ulp(got, xla_pass(x, pre_activation, sin, cos))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("pre_activation", ["swish", "none"])
def test_gradient_kernel_equals_xlas_gradient(dtype, pre_activation):
    """The backward kernel: XLA's gradient of the same float32 maths w.r.t. the rows,
    per-sequence tables included."""
    x = random_rows((2, 3, 64, 64), dtype)
    d_out = random_rows(x.shape, dtype, seed=1)
    sin, cos = (jnp.stack([t, jnp.roll(t, 5, axis=0)])[:, None] for t in precompute_freqs(64, 64))
    got = prepare_pass.prepare_rows_gradient(x, d_out, pre_activation, sin, cos, interpret=True)
    _, pull_back = jax.vjp(lambda x: xla_pass(x, pre_activation, sin, cos), x)
    assert_within_an_ulp(got, pull_back(d_out)[0])


def test_tables_per_sequence_and_grouped_heads():
    """One table per sequence (segments) is read by every head of it; with grouped
    heads `(B, Hkv, G, S, D)`, by every head of every group."""
    sin, cos = precompute_freqs(32, 64)
    shift = lambda t: jnp.stack([t, jnp.roll(t, 7, axis=0)])  # two sequences' positions
    per_sequence = tuple(shift(t)[:, None] for t in (sin, cos))  # (2, 1, S, D/2)
    x = random_rows((2, 3, 64, 32), jnp.bfloat16)
    got = prepare_pass.prepare_rows(x, "swish", *per_sequence, interpret=True)
    assert_within_an_ulp(got, xla_pass(x, "swish", *per_sequence))
    grouped = random_rows((2, 2, 3, 64, 32), jnp.bfloat16, seed=1)
    tables = tuple(t[:, None] for t in per_sequence)  # (2, 1, 1, S, D/2)
    got = prepare_pass.prepare_rows(grouped, "swish", *tables, interpret=True)
    assert_within_an_ulp(got, xla_pass(grouped, "swish", *tables))


def test_fits_only_where_the_kernel_serves():
    big = (4, 16, 32768, 128)
    table = (32768, 64)
    assert prepare_pass.fits(big, jnp.bfloat16, table)
    assert prepare_pass.fits(big, jnp.float16, (4, 1, 32768, 64))  # per sequence
    assert not prepare_pass.fits(big, jnp.float32, table)  # 16-bit rows only
    assert not prepare_pass.fits((4, 16, 16384, 128), jnp.bfloat16, (16384, 64))  # XLA's as fast
    assert not prepare_pass.fits((4, 16, 32760, 128), jnp.bfloat16, (32760, 64))  # S % 32
    assert not prepare_pass.fits((4, 16, 65536, 96), jnp.bfloat16, (65536, 48))  # D/2 = 48
    # Tables that vary along a head axis after a shared batch axis: not n // every.
    assert not prepare_pass.fits(big, jnp.bfloat16, (1, 16, 32768, 64))


@pytest.fixture
def any_size(monkeypatch):
    """`fits` at the tests' small sizes."""
    monkeypatch.setattr(prepare_pass, "TABLE_BYTES_FROM", 0)


@pytest.fixture
def kernel_pass_on_cpu(any_size, monkeypatch):
    """Call it after the reference run: from then on dispatch serves the pass with the
    kernel here (interpret mode) wherever it fits; returns the list of the shapes the
    kernel ran on. A test traces its plan anew (other tuning than the reference's)."""

    def patch():
        ran, rows = [], prepare_pass.prepare_rows
        serves = lambda spec, x, table: prepare_pass.fits(x, spec.dtype, table)
        monkeypatch.setattr(prepare_pass, "serves", serves)
        spy = lambda x, *a, **kw: ran.append(x.shape) or rows(x, *a, **kw)
        monkeypatch.setattr(prepare_pass, "prepare_rows", spy)
        return ran

    return patch


def test_prepared_per_shard_and_its_gradient(any_size):
    x = random_rows((2, 3, 64, 32), jnp.bfloat16)
    sin, cos = (t[None, None] for t in precompute_freqs(32, 64))
    prepared = jax.jit(lambda x: prepare_pass.prepared(x, "swish", sin, cos, batch_ndim=2))
    assert_within_an_ulp(prepared(x), xla_pass(x, "swish", sin, cos))
    mapped = jax.vmap(lambda x: prepare_pass.prepared(x, "swish", sin[0], cos[0], batch_ndim=1))
    assert_within_an_ulp(mapped(x), xla_pass(x, "swish", sin, cos))

    # The gradient is XLA's of the same maths, w.r.t. the rows and the tables.
    def loss(prepare):
        return lambda x, s, c: jnp.sum(prepare(x, s, c).astype(jnp.float32) ** 2)

    kernel = lambda x, s, c: prepare_pass.differentiable_prepared(x, "swish", s, c, 2, 0)
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(x, sin, cos)
    expected = jax.grad(loss(lambda x, s, c: xla_pass(x, "swish", s, c)), argnums=(0, 1, 2))(
        x, sin, cos
    )
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=2e-2)


def test_attention_through_the_kernel_pass(kernel_pass_on_cpu):
    """Where the kernel serves and the implementation reads 16-bit rows (Triton here,
    in interpret mode), dispatch runs the pass through it, for q and for grouped k
    alike: the same outputs and gradients as with XLA's pass in front of the same
    kernels."""
    q, k, v, g = random_inputs(seq=96, batch=(1, 2), dqk=32, dv=32, dtype=jnp.bfloat16)
    k, v = k[:, :1], v[:, :1]  # grouped-query heads, 2:1
    options = dict(activation_function="sigmoid", qk_pre_activation_function="swish")
    expected = out_and_grads(q, k, v, g, implementation="triton", **options)  # XLA's pass
    ran = kernel_pass_on_cpu()
    # Other blocks: a plan of its own, traced anew with the patched functions.
    blocks = Triton(forward=(32, 32, 4, 1), backward=(32, 32, 4, 1))
    got = out_and_grads(q, k, v, g, implementation=blocks, **options)
    assert set(ran) == {(1, 2, 96, 32), (1, 1, 96, 32)}  # q and k
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)


def test_kernel_pass_under_vmap_over_heads(kernel_pass_on_cpu):
    """`eqx.filter_vmap` over the heads axis (the backend's way): the kernel pass runs
    on the mapped rows, with the outputs and gradients of XLA's pass unmapped."""
    import equinox as eqx

    import eqx_xlstm as ex

    q, k, v, g = random_inputs(seq=64, batch=(2, 3), dqk=32, dv=32, dtype=jnp.bfloat16)
    options = dict(activation_function="sigmoid", qk_pre_activation_function="swish")
    expected = out_and_grads(q, k, v, g, implementation="triton", **options)  # XLA's pass
    ran = kernel_pass_on_cpu()
    blocks = Triton(forward=(32, 32, 2, 1), backward=(32, 32, 2, 1))  # a plan of its own
    call = lambda q, k, v: ex.attention(q, k, v, implementation=blocks, **options)
    heads_mapped = eqx.filter_vmap(call, in_axes=1, out_axes=1)
    out, pull_back = jax.vjp(heads_mapped, q, k, v)
    assert (2, 3, 64, 32) in ran  # the kernel, on every head at once
    for a, b in zip((out, *pull_back(g)), expected, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2, rtol=2e-2)
