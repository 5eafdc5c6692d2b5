"""The Mosaic GPU kernels themselves: compiled on a Hopper GPU, in Mosaic GPU interpret
mode (threads, shared memory and barriers simulated) on a CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import HALF_KERNEL, here, random_inputs

from eqx_xlstm.implementations import Mosaic
from eqx_xlstm.implementations.mosaic import backward, forward, jax_private

INTERPRET = jax.default_backend() != "gpu"


@pytest.fixture(autouse=True)
def mosaic_here():
    reason = Mosaic().unsupported(here(dtype=jnp.bfloat16))
    if reason:
        pytest.skip(f"the Mosaic kernels cannot run here: {reason}")


def inputs(seq, heads, dim, dtype, seed):
    return random_inputs(seq, batch=(heads,), dqk=dim, dv=dim, dtype=dtype, seed=seed)


def assert_close_16bit(got, want):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(
        np.asarray(got, np.float32),
        want,
        atol=HALF_KERNEL["atol"] * scale,
        rtol=HALF_KERNEL["rtol"],
    )


@pytest.mark.parametrize(
    "activation, seq, dim, heads, dtype",
    [
        ("sigmoid", 256, 128, 2, jnp.bfloat16),
        ("none", 512, 64, 1, jnp.float16),  # 4 key tiles, 3 slots: one refilled
        ("softmax", 256, 64, 1, jnp.bfloat16),  # two key tiles: the output is rescaled
    ],
)
def test_forward_kernel_matches_reference(activation, seq, dim, heads, dtype):
    q, k, v, _ = inputs(seq, heads, dim, dtype, seed=5)
    bias = -float(np.log(seq))
    kernel = jax.jit(lambda q, k, v: forward.mosaic_forward(q, k, v, activation, bias, INTERPRET))
    q32, k32, v32 = (np.asarray(x.astype(jnp.float32)) for x in (q, k, v))
    scores = q32 @ k32.transpose(0, 2, 1) / np.sqrt(dim)
    w = 1 / (1 + np.exp(-(scores + bias))) if activation == "sigmoid" else scores
    if activation == "softmax":
        w = np.where(np.tril(np.ones_like(w, bool)), w, -np.inf)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    assert_close_16bit(kernel(q, k, v), np.tril(w) @ v32)


# S=384: up to 3 key tiles (dQ) and 6 query tiles (dK/dV) through 2 slots: slots refill.
# (fp16 and D=64 with the fused kernel: tests/test_implementations.py, through attention.)
@pytest.mark.parametrize(
    "activation, seq, dim, fused, heads, dtype",
    [
        ("sigmoid", 256, 128, True, 2, jnp.bfloat16),
        ("none", 384, 64, False, 1, jnp.bfloat16),
    ],
)
def test_backward_kernels_match_reference(activation, seq, dim, fused, heads, dtype):
    # dK/dV with dQ fused in, or dQ and dK/dV apart, against autodiff of float32.
    q, k, v, g = inputs(seq, heads, dim, dtype, seed=6)
    bias = -float(np.log(seq))

    def reference(q, k, v):
        scores = q @ jnp.swapaxes(k, 1, 2) / np.sqrt(dim)
        w = jax.nn.sigmoid(scores + bias) if activation == "sigmoid" else scores
        return jnp.tril(w) @ v

    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    wanted = jax.vjp(reference, *f32[:3])[1](f32[3])

    def kernels(*a):
        rest = (activation, bias, INTERPRET)
        if fused:
            return backward.mosaic_dkv(*a, *rest, fused=True)
        return (backward.mosaic_dq(*a, *rest), *backward.mosaic_dkv(*a, *rest))

    for got, want in zip(jax.jit(kernels)(q, k, v, g), wanted, strict=True):
        assert_close_16bit(got, np.asarray(want))


# The dQ and dK/dV kernels batch by the same fold as the forward kernel.
@pytest.mark.parametrize("kernel", ["forward", "fused"])
def test_kernels_under_vmap(kernel):
    # Mosaic GPU kernels have no batching rule: under vmap the mapped axis joins their
    # leading axis N (`common.fold_vmap`), here with an unbatched value input; the
    # fused backward's in-place dQ sum too.
    q, k, v, g = random_inputs(128, batch=(2, 1), dqk=64, dv=64, dtype=jnp.bfloat16, seed=8)
    v = v[0]  # the same values for both mapped entries
    rest = ("sigmoid", -5.5, INTERPRET)
    calls = {
        "forward": lambda q, k, v, g: forward.mosaic_forward(q, k, v, *rest),
        "fused": lambda q, k, v, g: backward.mosaic_dkv(q, k, v, g, *rest, fused=True),
    }
    fn = calls[kernel]
    batched = jax.jit(jax.vmap(fn, in_axes=(0, 0, None, 0)))(q, k, v, g)
    # Against one unbatched call with both entries as rows of N (other tests check that
    # rows of N are independent, against the reference).
    rows = [x.reshape(2, 128, 64) for x in (q, k, jnp.broadcast_to(v, q.shape), g)]
    unbatched = jax.jit(fn)(*rows)
    for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(unbatched), strict=True):
        np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), np.asarray(want))


def test_fused_backward_without_jax_ref_table(monkeypatch):
    # `in_gmem` leans on a private JAX table (`jax_private`); where a jax lacks it, the
    # fused backward falls back to `jax.new_ref` and gives the same gradients.
    q, k, v, g = inputs(128, 1, 64, jnp.bfloat16, seed=9)

    def grads(q, k, v, g):
        return backward.mosaic_dkv(q, k, v, g, "sigmoid", -5.5, INTERPRET, fused=True)

    with_table = jax.jit(grads)(q, k, v, g)
    monkeypatch.setattr(jax_private, "ref_type_mappings", lambda: None)
    without = jax.jit(lambda *a: grads(*a))(q, k, v, g)  # a fresh trace
    for got, want in zip(without, with_table, strict=True):
        np.testing.assert_allclose(
            np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)), atol=1e-6
        )
