"""Inputs the upstream accepts (Python ints and NumPy scalars for numbers, NumPy
arrays for q, k, v, float64 computed in float64) and hostile ones (float16 logits
beyond its range, empty inputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    ACTIVATIONS,
    SMALL_CHUNKED,
    SMALL_LINEAR,
    naive_attention,
    out_and_grads,
    random_inputs,
)

import eqx_xlstm as ex


@pytest.mark.parametrize("theta", [np.int64(500), np.float32(500.0)])
def test_ints_and_numpy_scalars_for_theta_and_bias(theta):
    q, k, v, _ = random_inputs()
    want = ex.attention(q, k, v, activation_function="sigmoid", theta=500.0, sigmoid_bias=-2.0)
    got = ex.attention(
        q, k, v, activation_function="sigmoid", theta=theta, sigmoid_bias=np.float32(-2.0)
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        ex.apply_rotary_emb(q, k, theta=theta)[0], ex.apply_rotary_emb(q, k, theta=500.0)[0]
    )
    config = ex.mLSTMBackendAttentionConfig(context_length=np.int64(16), theta=theta)
    assert (config.context_length, config.theta) == (16, 500.0)
    assert type(config.context_length) is int and type(config.theta) is float
    backend = ex.mLSTMBackendAttention(config, qk_head_dim=np.int32(8))
    assert backend.qk_head_dim == 8 and type(backend.qk_head_dim) is int
    sin, cos = ex.precompute_freqs(np.int64(8), np.int64(16), theta)
    np.testing.assert_array_equal(sin, backend.freqs_sin)


def test_bools_and_non_numbers_are_refused():
    q, k, v, _ = random_inputs()
    with pytest.raises((TypeError, ValueError), match="theta"):
        ex.attention(q, k, v, theta="1e4")
    with pytest.raises(TypeError, match="sigmoid_bias"):
        ex.attention(q, k, v, sigmoid_bias="0")
    with pytest.raises(ValueError, match="theta"):
        ex.mLSTMBackendAttentionConfig(theta=True)
    # A TypeError where the annotations are checked (the tests' import hook), else
    # a ValueError from the config's own check; both name the field.
    with pytest.raises((TypeError, ValueError), match="context_length"):
        ex.mLSTMBackendAttentionConfig(context_length=16.0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_numpy_arrays_as_inputs(activation):
    q, k, v, _ = random_inputs(seed=2)
    mask = np.tril(np.ones((9, 9), bool)) & (np.arange(9)[:, None] % 3 != 1)
    as_numpy = [np.asarray(x) for x in (q, k, v)]
    got = ex.attention(*as_numpy, mask, activation_function=activation)
    assert isinstance(got, jax.Array)
    want = ex.attention(q, k, v, jnp.asarray(mask), activation_function=activation)
    np.testing.assert_array_equal(got, want)
    backend = ex.mLSTMBackendAttention(
        ex.mLSTMBackendAttentionConfig(context_length=9, activation_function=activation),
        qk_head_dim=8,
    )
    np.testing.assert_array_equal(backend(*as_numpy), backend(q, k, v))
    rotated = ex.apply_rotary_emb(as_numpy[0], as_numpy[1])
    np.testing.assert_array_equal(rotated[0], ex.apply_rotary_emb(q, k)[0])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])  # 'none': the next test
@pytest.mark.parametrize("implementation", ["reference", SMALL_CHUNKED])
def test_float64_is_computed_in_float64(activation, implementation, x64):
    # Float32 anywhere on the way (tables, logits, sums) leaves errors of about 1e-7.
    q, k, v, _ = (x.astype(jnp.float64) for x in random_inputs(seed=4))
    assert q.dtype == jnp.float64
    got = ex.attention(
        q,
        k,
        v,
        activation_function=activation,
        qk_pre_activation_function="swish",
        implementation=implementation,
    )
    assert got.dtype == jnp.float64
    want = naive_attention(q, k, v, activation=activation, pre="swish")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_float64_linear_form_rope_and_backend(x64):
    q, k, v, _ = (x.astype(jnp.float64) for x in random_inputs(seed=5))
    got = ex.attention(q, k, v, activation_function="none", implementation=SMALL_LINEAR)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, naive_attention(q, k, v, activation="none"), atol=1e-12)
    rotated = ex.apply_rotary_emb(q, k, theta=300)[0]
    assert rotated.dtype == jnp.float64
    from helpers import naive_rope

    np.testing.assert_allclose(rotated, naive_rope(q, 300.0), atol=1e-12)
    config = ex.mLSTMBackendAttentionConfig(context_length=16, activation_function="sigmoid")
    backend = ex.mLSTMBackendAttention(config, qk_head_dim=8)
    out, state = backend(q[..., :5, :], k[..., :5, :], v[..., :5, :], return_last_states=True)
    step, _ = backend(
        q[..., 5:, :], k[..., 5:, :], v[..., 5:, :], return_last_states=True, state=state
    )
    want = naive_attention(q, k, v, activation="sigmoid", sigmoid_bias=-np.log(16))
    np.testing.assert_allclose(jnp.concatenate([out, step], -2), want, atol=1e-12)


@pytest.mark.parametrize(
    "implementation", ["reference", SMALL_CHUNKED, "linear", SMALL_LINEAR, "triton", "mosaic"]
)
def test_float16_none_is_finite_wherever_the_reference_is(implementation):
    # Raw q . k up to ~1e5 exceed float16's range before the 1/sqrt(D) scale, while
    # the outputs stay in the hundreds: every path must scale (or sum) in float32.
    q, k, v, g = random_inputs(128, batch=(1,), dqk=64, dv=64, seed=11)
    q, k, v, g = (x.astype(jnp.float16) for x in (q * 60, k * 60, v * 0.002, g))
    kwargs = dict(activation_function="none")
    got = out_and_grads(q, k, v, g, implementation=implementation, jit=True, **kwargs)
    want = out_and_grads(q, k, v, g, implementation="reference", **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        finite = np.isfinite(b)
        assert finite.mean() > 0.5, name  # the case is not degenerate
        assert np.isfinite(a[finite]).all(), name
        scale = np.abs(b[finite]).max()
        np.testing.assert_allclose(a[finite], b[finite], atol=2e-2 * scale, rtol=2e-2, err_msg=name)


@pytest.mark.parametrize("shape", [(2, 0, 64), (0, 5, 64)])  # no positions; no rows
@pytest.mark.parametrize(
    "implementation", [None, "reference", "chunked", "linear", "triton", "mosaic"]
)
def test_empty_inputs_give_the_empty_output(shape, implementation):
    kernel = implementation in ("triton", "mosaic")  # 16-bit only on a GPU (Mosaic: always)
    q = jnp.ones(shape, jnp.bfloat16 if kernel else jnp.float32)
    fn = lambda q: ex.attention(q, q, q, activation_function="none", implementation=implementation)
    assert fn(q).shape == shape
    assert jax.grad(lambda q: jnp.sum(fn(q)))(q).shape == shape
    with pytest.raises(ValueError, match="head dimension.*>= 2"):
        ex.attention(jnp.ones((2, 5, 0)), jnp.ones((2, 5, 0)), jnp.ones((2, 5, 3)))


@pytest.mark.parametrize("activation", ["softmax", "none"])
def test_decoding_zero_new_positions_changes_nothing(activation):
    config = ex.mLSTMBackendAttentionConfig(context_length=8, activation_function=activation)
    backend = ex.mLSTMBackendAttention(config, qk_head_dim=8)
    q, k, v, _ = random_inputs(3, batch=(2,), dqk=8, dv=4)
    empty = [x[:, :0] for x in (q, k, v)]
    h, state = backend(*empty, return_last_states=True)
    assert h.shape == (2, 0, 4) and (state.length == 0).all()
    h, state = backend(*empty, return_last_states=True, state=state)
    assert h.shape == (2, 0, 4) and (state.length == 0).all()
    h, state = backend(q, k, v, return_last_states=True, state=state)
    np.testing.assert_allclose(h, backend(q, k, v), atol=1e-6)
