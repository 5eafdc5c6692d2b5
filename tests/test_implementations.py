"""Every implementation against the reference path, through `attention`; memory."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    ACTIVATIONS,
    BF16,
    SMALL_CHUNKED,
    SMALL_LINEAR,
    assert_all_close,
    here,
    out_and_grads,
    random_inputs,
)

import eqx_xlstm as ex
from eqx_xlstm import dispatch
from eqx_xlstm.implementations import Chunked, CuDNN, Mosaic, Triton, cudnn_private, row_kernels
from eqx_xlstm.implementations.cudnn import CuDNNPieces
from eqx_xlstm.implementations.mosaic import MosaicPieces
from eqx_xlstm.implementations.ring import BlockwisePieces

ON_GPU = jax.default_backend() == "gpu"
# What the kernels take here: 16-bit on a GPU; float32 in interpret mode on a CPU.
KERNEL_DTYPE = jnp.bfloat16 if ON_GPU else jnp.float32


def masks(seq):
    random = jax.random.bernoulli(jax.random.key(seq), 0.4, (seq, seq))
    return {
        "causal": None,
        "full": jnp.ones((seq, seq), bool),
        "random": random,
        "empty_rows": random.at[0].set(False).at[seq // 2].set(False),
    }


def against_reference(implementation, q, k, v, g, mask=None, jit=False, **kwargs):
    """(got, expected): output and gradients of `implementation` and of the reference."""
    got = out_and_grads(q, k, v, g, mask, jit, implementation=implementation, **kwargs)
    return got, out_and_grads(q, k, v, g, mask, implementation="reference", **kwargs)


# 13: not a multiple of the block (5); 1: a single position.
@pytest.mark.parametrize(
    "seq, mask_name",
    [(13, m) for m in ("causal", "full", "random", "empty_rows")] + [(1, "causal"), (1, "full")],
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_chunked_matches_reference_f32(seq, mask_name, activation):
    q, k, v, g = random_inputs(seq)
    mask = masks(seq)[mask_name]
    got, expected = against_reference(
        SMALL_CHUNKED,
        q,
        k,
        v,
        g,
        mask,
        activation_function=activation,
        qk_pre_activation_function="swish",
    )
    assert_all_close(got, expected, jnp.float32)


@pytest.mark.parametrize("seq", [1, 4, 13])  # one chunk, exactly one, several and a part
@pytest.mark.parametrize("pre", ["none", "swish"])
def test_linear_matches_reference_f32(seq, pre):
    q, k, v, g = random_inputs(seq)
    got, expected = against_reference(
        SMALL_LINEAR, q, k, v, g, activation_function="none", qk_pre_activation_function=pre
    )
    assert_all_close(got, expected, jnp.float32)


@pytest.mark.parametrize(
    "implementation, activation, mask_name",
    [(SMALL_CHUNKED, a, m) for a in ACTIVATIONS for m in ("causal", "random")]
    + [(SMALL_LINEAR, "none", "causal")],
)
def test_xla_paths_match_reference_bf16(implementation, activation, mask_name):
    q, k, v, g = random_inputs(17, dtype=jnp.bfloat16)
    got, expected = against_reference(
        implementation, q, k, v, g, masks(17)[mask_name], activation_function=activation
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=BF16["atol"], rtol=2e-2, err_msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_default_block_sizes_match_reference(activation):
    # Real block sizes: S spans two chunked blocks, several linear chunks.
    q, k, v, g = random_inputs(Chunked().block + 37, batch=(1,), dqk=16, dv=16)
    got, expected = against_reference(None, q, k, v, g, activation_function=activation)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_chunked_under_jit_and_vmap():
    q, k, v, _ = random_inputs(11)
    fn = lambda q, k, v: ex.attention(q, k, v, implementation=SMALL_CHUNKED)
    jitted = eqx.filter_jit(eqx.filter_vmap(fn, in_axes=1, out_axes=1))(q, k, v)
    np.testing.assert_allclose(jitted, ex.attention(q, k, v, implementation="reference"), atol=2e-5)


def test_backend_config_selects_implementation():
    q, k, v, _ = random_inputs(12)
    outs = []
    for implementation in ("reference", SMALL_CHUNKED, "chunked"):
        config = ex.mLSTMBackendAttentionConfig(
            context_length=16, activation_function="sigmoid", implementation=implementation
        )
        outs.append(ex.mLSTMBackendAttention(config, qk_head_dim=8)(q, k, v))
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=2e-5)
    with pytest.raises(ValueError, match="implementation"):
        ex.mLSTMBackendAttentionConfig(implementation="flash")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("seq, pre", [(1, "none"), (150, "swish")])
def test_triton_matches_reference(activation, seq, pre):
    # On a CPU this runs the kernels in Pallas interpret mode.
    q, k, v, g = random_inputs(seq, batch=(2,), dqk=16, dv=32, dtype=KERNEL_DTYPE)
    got, expected = against_reference(
        "triton", q, k, v, g, activation_function=activation, qk_pre_activation_function=pre
    )
    assert_all_close(got, expected, KERNEL_DTYPE)


@pytest.mark.parametrize(
    "activation, dtype",
    [(a, jnp.float16) for a in ACTIVATIONS] + [("sigmoid", jnp.bfloat16)],
)
def test_triton_16bit_matches_reference(activation, dtype):
    # Other block sizes than the defaults, too: tuning is a static argument.
    small = Triton(forward=(32, 16, 4, 2), backward=(16, 32, 4, 2))
    q, k, v, g = random_inputs(70, batch=(2,), dqk=32, dv=16, dtype=dtype, seed=2)
    got, expected = against_reference(
        small, q, k, v, g, activation_function=activation, qk_pre_activation_function="swish"
    )
    assert_all_close(got, expected, dtype)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_pallas_under_vmap_over_heads(activation):
    # `eqx.filter_vmap` over the heads axis, as the README shows: on a Hopper GPU the
    # Mosaic kernels run batched, forward and backward (softmax's lse folded like the
    # output); elsewhere the Triton kernels, interpreted. Same as the unbatched call.
    dtype, dim, seq = (jnp.bfloat16, 64, 200) if ON_GPU else (jnp.float32, 16, 40)
    q, k, v, g = random_inputs(seq, batch=(2, 2), dqk=dim, dv=dim, dtype=dtype, seed=6)

    def fn(q, k, v):
        return ex.attention(
            q,
            k,
            v,
            activation_function=activation,
            qk_pre_activation_function="swish",
            implementation="pallas",
        )

    vmapped = eqx.filter_jit(eqx.filter_vmap(fn, in_axes=1, out_axes=1))
    np.testing.assert_allclose(
        np.asarray(vmapped(q, k, v).astype(jnp.float32)),
        np.asarray(fn(q, k, v).astype(jnp.float32)),
        atol=1e-6,
    )
    out, vjp = jax.vjp(vmapped, q, k, v)
    got = [np.asarray(x.astype(jnp.float32)) for x in (out, *vjp(g))]
    assert_all_close(
        got,
        out_and_grads(
            q,
            k,
            v,
            g,
            None,
            implementation="pallas",
            activation_function=activation,
            qk_pre_activation_function="swish",
        ),
        dtype,
    )


def mosaic_or_skip(dtype=jnp.bfloat16, dim=64):
    """Skips where the Mosaic kernels can run neither compiled nor interpreted."""
    reason = Mosaic().unsupported(here(dtype=dtype, dqk=dim, dv=dim))
    if reason:
        pytest.skip(f"implementation='mosaic' here: {reason}")


@pytest.mark.parametrize(
    "activation, fused, dtype",
    [("sigmoid", False, jnp.bfloat16), ("none", True, jnp.float16)],
)
def test_mosaic_matches_reference(activation, fused, dtype):
    # The Mosaic kernels through `attention`, forward and backward (the dQ + dK/dV
    # pair, or the fused kernel): compiled on a Hopper GPU, interpreted on a CPU, where
    # it must run under jax.jit (an eager jax.vjp deadlocks JAX's interpreter threads).
    mosaic_or_skip(dtype)
    implementation = Mosaic(fused_backward_from=0 if fused else None)
    q, k, v, g = random_inputs(100, batch=(1,), dqk=64, dv=64, dtype=dtype, seed=4)
    kwargs = dict(activation_function=activation, qk_pre_activation_function="swish")
    got, expected = against_reference(implementation, q, k, v, g, jit=True, **kwargs)
    assert_all_close(got, expected, dtype)


def pieces_against_blockwise(pieces, activation, mask, seq=200, batch=(2,)):
    """Context parallelism's ring pieces through `pieces` and through the blockwise
    XLA pieces: (got, expected) lists of out, dq, dk, dv, and lse for softmax."""
    dtype = jnp.bfloat16
    spec = here(
        activation=activation,
        mask=mask,
        dtype=dtype,
        seq_len=seq,
        batch_shape=batch,
        dqk=64,
        dv=64,
        sigmoid_bias=-2.0,
    )
    q, k, v, d_out = random_inputs(seq, batch=batch, dqk=64, dv=64, dtype=dtype, seed=5)

    def run(pieces):
        # One jit per pass: interpreted kernels in one program with the other pass's
        # may deadlock JAX's interpreter threads.
        out, lse = jax.jit(lambda q, k, v: pieces.forward(q, k, v, spec))(q, k, v)
        grads = jax.jit(lambda *xs: pieces.backward(*xs, spec))(q, k, v, out, lse, d_out)
        extra = [lse] if activation == "softmax" else []
        return [np.asarray(x, np.float32) for x in (out, *grads, *extra)]

    return run(pieces), run(BlockwisePieces(block=64))


@pytest.mark.parametrize(
    "activation, fused, mask, seq",
    [
        ("sigmoid", False, "full", 100),
        ("none", True, "full", 100),
        ("softmax", False, "full", 128),  # a padded full softmax piece goes to Triton
        ("softmax", False, "causal", 100),
    ],
)
def test_mosaic_ring_pieces_match_blockwise(activation, fused, mask, seq):
    # The Mosaic kernels' `full` mask mode (forward, dQ, dK/dV, fused; the causal mode
    # is `attention`'s); S = 100 pads to 128. Softmax: with each row's log2-sum-exp2.
    mosaic_or_skip()
    mosaic = MosaicPieces(Mosaic(fused_backward_from=0 if fused else None))
    got, expected = pieces_against_blockwise(mosaic, activation, mask, seq=seq, batch=(1,))
    assert_all_close(got[:4], expected[:4], jnp.bfloat16)
    if activation == "softmax":
        np.testing.assert_allclose(got[4], expected[4], atol=2e-3, rtol=1e-3, err_msg="lse")


@pytest.mark.skipif(not ON_GPU, reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("mask", ["full", "causal"])
@pytest.mark.parametrize("seq", [256, 37])  # odd: the Triton pieces stand in
def test_cudnn_ring_pieces_match_blockwise(mask, seq):
    if not cudnn_private.available():
        pytest.skip(f"jax {jax.__version__} lacks the private cuDNN API the pieces use")
    got, expected = pieces_against_blockwise(CuDNNPieces(), "softmax", mask, seq)
    assert_all_close(got[:4], expected[:4], jnp.bfloat16)
    np.testing.assert_allclose(got[4], expected[4], atol=2e-3, rtol=1e-3, err_msg="lse")


def test_mosaic_softmax_gradients_through_attention(monkeypatch):
    # Padded rows (S=130), swish and RoPE, a window and packed documents, different in
    # each sequence (RoPE restarting with each: a table per sequence); the backward's
    # lse comes from the forward. Bounded, Mosaic takes q and k raw and its kernels
    # return their gradients (swish' and RoPE transposed as the dK/dV and dQ blocks
    # write their rows), not XLA after them.
    mosaic_or_skip()
    raw_calls = []
    real = row_kernels._raw_row_attention
    spy = lambda *a: raw_calls.append(a) or real(*a)
    monkeypatch.setattr(row_kernels, "_raw_row_attention", spy)
    dispatch._run.clear_cache()  # traced anew, through the spy
    q, k, v, g = random_inputs(130, batch=(2,), dqk=64, dv=64, dtype=jnp.bfloat16, seed=4)
    ids = jnp.stack([jnp.arange(130) // 50, jnp.arange(130) // 90])
    kwargs = dict(qk_pre_activation_function="swish", sliding_window=100, segment_ids=ids)
    got, expected = against_reference("mosaic", q, k, v, g, **kwargs)
    assert raw_calls, "Mosaic was not handed the raw q and k"
    assert_all_close(got, expected, jnp.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="the 'pallas' alias picks Mosaic on a Hopper GPU only")
def test_pallas_softmax_is_mosaic():
    mosaic_or_skip()
    q, k, v, g = random_inputs(200, batch=(2,), dqk=64, dv=64, dtype=jnp.bfloat16, seed=4)
    got, expected = against_reference("pallas", q, k, v, g, qk_pre_activation_function="swish")
    assert_all_close(got, expected, jnp.bfloat16)


def test_chunked_memory_grows_linearly():
    # XLA's buffer plan for fwd+bwd: x4 sequence must cost about x4, not x16.
    def temp_bytes(implementation, seq):
        q = jax.ShapeDtypeStruct((1, seq, 64), jnp.float32)
        loss = lambda q, k, v: jnp.sum(ex.attention(q, k, v, implementation=implementation))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes("chunked", 2048), temp_bytes("chunked", 8192)
    assert large / small < 6, (small, large)
    if jax.default_backend() == "cpu":  # XLA:GPU plans the reference's S x S buffers apart
        ref_small, ref_large = temp_bytes("reference", 2048), temp_bytes("reference", 8192)
        assert ref_large / ref_small > 10  # the test can tell quadratic from linear


@pytest.mark.skipif(not ON_GPU, reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("ring", [True, False])  # its kernels as ops, or the public API
@pytest.mark.parametrize("pre", ["none", "swish"])
@pytest.mark.parametrize("seq", [1, 37, 256])
def test_cudnn_matches_reference_on_gpu(seq, pre, ring):
    q, k, v, g = random_inputs(seq, dqk=64, dv=64, dtype=jnp.bfloat16)
    got, expected = against_reference(CuDNN(ring=ring), q, k, v, g, qk_pre_activation_function=pre)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=BF16["atol"], rtol=2e-2, err_msg=name)
    default = ex.attention(q, k, v, qk_pre_activation_function=pre)
    np.testing.assert_allclose(np.asarray(default, np.float32), got[0], atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="the default splits forward and gradient on a GPU only")
def test_default_none_may_split_forward_and_gradient():
    # On Hopper, 'none' at 2048 < S <= 4096 runs the Mosaic forward without a gradient
    # and the linear form under differentiation.
    from eqx_xlstm import dispatch

    seq = 3000
    chosen = dispatch.plan(here(activation="none", dtype=jnp.bfloat16, seq_len=seq))
    if chosen.forward == chosen.gradient:
        pytest.skip(f"one implementation here: {chosen.forward.name}")
    q, k, v, g = random_inputs(seq, batch=(1,), dqk=64, dv=64, dtype=jnp.bfloat16, seed=7)
    kwargs = dict(activation_function="none", qk_pre_activation_function="swish")
    got, expected = against_reference(None, q, k, v, g, jit=True, **kwargs)
    assert_all_close(got, expected, jnp.bfloat16)
    forward = ex.attention(q, k, v, **kwargs)
    np.testing.assert_allclose(
        np.asarray(forward, np.float32),
        expected[0],
        rtol=2e-2,
        atol=3e-2 * np.abs(expected[0]).max(),
    )
