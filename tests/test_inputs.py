"""Inputs the upstream accepts: Python ints and NumPy scalars for numbers, NumPy
arrays for q, k, v, and float64 computed in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ACTIVATIONS, SMALL_CHUNKED, SMALL_LINEAR, naive_attention, random_inputs

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
