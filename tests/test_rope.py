"""RoPE: shapes, dtypes, the rotation's properties and its formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import naive_rope, random_inputs

import eqx_xlstm as ex


def pair(shape, seed=0, dtype=jnp.float32):
    """Random queries and keys of `shape` (`(*batch, S, D)`)."""
    *batch, seq, dim = shape
    q, k, _, _ = random_inputs(seq, tuple(batch), dim, 1, dtype, seed)
    return q, k


@pytest.mark.parametrize("shape", [(7, 8), (3, 7, 8), (2, 3, 7, 8), (2, 1, 3, 7, 8)])
def test_any_leading_axes_are_batch_axes(shape):
    xq, xk = pair(shape)
    oq, ok = ex.apply_rotary_emb(xq, xk, theta=100.0)
    assert oq.shape == ok.shape == shape
    np.testing.assert_allclose(oq, naive_rope(xq, 100.0), atol=1e-5)
    np.testing.assert_allclose(ok, naive_rope(xk, 100.0), atol=1e-5)


def test_preserves_pair_norms():
    x, _ = pair((2, 16, 32))
    out, _ = ex.apply_rotary_emb(x, x)
    pair_norm = lambda a: jnp.linalg.norm(a.reshape(*a.shape[:-1], -1, 2), axis=-1)  # noqa: E731
    np.testing.assert_allclose(pair_norm(out), pair_norm(x), rtol=1e-5, atol=1e-6)


def test_dot_product_depends_only_on_relative_position():
    d, seq = 16, 12
    q, k = (x[0] for x in pair((1, d)))
    # Put the same q and k at every position; q_i . k_j must depend on i - j only.
    xq, xk = ex.apply_rotary_emb(jnp.tile(q, (seq, 1)), jnp.tile(k, (seq, 1)))
    scores = np.asarray(xq, np.float64) @ np.asarray(xk, np.float64).T
    for offset in range(-seq + 1, seq):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-4)
    assert not np.allclose(np.diagonal(scores, 0)[0], np.diagonal(scores, 3)[0])


def test_explicit_freqs_longer_than_seq_use_first_rows():
    x, _ = pair((2, 5, 8))
    sin, cos = ex.precompute_freqs(8, 50, theta=300.0)
    a = ex.apply_rotary_emb(x, x, freqs_sin=sin, freqs_cos=cos)[0]
    b = ex.apply_rotary_emb(x, x, theta=300.0)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_keeps_dtype(dtype):
    xq, xk = pair((3, 6, 8), dtype=dtype)
    oq, ok = ex.apply_rotary_emb(xq, xk)
    assert oq.dtype == ok.dtype == dtype


def test_position_zero_is_identity():
    x, _ = pair((4, 10))
    out, _ = ex.apply_rotary_emb(x, x)
    np.testing.assert_array_equal(out[0], x[0])
    assert not np.allclose(out[1:], x[1:])


def test_precompute_freqs_formula():
    sin, cos = ex.precompute_freqs(6, 4, theta=500.0)
    assert sin.shape == cos.shape == (4, 3) and sin.dtype == jnp.float32
    angles = np.arange(4)[:, None] * 500.0 ** (-np.arange(0, 6, 2) / 6)[None]
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-7)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-7)


def test_works_under_jit():
    x, _ = pair((2, 3, 7, 8))
    eager = ex.apply_rotary_emb(x, x, theta=50.0)
    jitted = jax.jit(ex.apply_rotary_emb, static_argnames="theta")(x, x, theta=50.0)
    np.testing.assert_allclose(eager[0], jitted[0], atol=1e-6)


def test_long_tables_are_composed_on_the_device_within_float32_rounding():
    """Beyond HOST_TABLES_UP_TO the tables are formed from two short host tables by
    angle addition: within a few float32 roundings of the float64 angles, and the
    traced program does not carry S x D/2 constants."""
    from eqx_xlstm.nn.rope import HOST_TABLES_UP_TO, rope_angles, rope_tables

    seq_len = HOST_TABLES_UP_TO * 3 + 5
    sin, cos = rope_tables(seq_len, 64, None, None, 1e4)
    angles = rope_angles(64, seq_len, 1e4)
    np.testing.assert_allclose(sin, np.sin(angles), atol=5e-7, rtol=0)
    np.testing.assert_allclose(cos, np.cos(angles), atol=5e-7, rtol=0)
    x = jax.ShapeDtypeStruct((1, 65536, 64), jnp.float32)
    text = jax.jit(lambda q, k, v: ex.attention(q, k, v, activation_function="none"))
    assert len(text.lower(x, x, x).as_text()) < 4e6  # whole tables: about 70 MB
