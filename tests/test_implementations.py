"""Every implementation against the reference path; dispatch; memory growth."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_xlstm as ex
import eqx_xlstm._dispatch as dispatch

ACTIVATIONS = ["softmax", "sigmoid", "none"]


def inputs(seq, shape=(2, 3), dqk=8, dv=6, dtype=jnp.float32, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (*shape, seq, dqk), dtype)
    k = jax.random.normal(kk, (*shape, seq, dqk), dtype)
    v = jax.random.normal(kv, (*shape, seq, dv), dtype)
    return q, k, v, jax.random.normal(kg, v.shape, dtype)


def masks(seq):
    key = jax.random.key(seq)
    random = jax.random.bernoulli(key, 0.4, (seq, seq))
    with_empty_rows = random.at[0].set(False).at[seq // 2].set(False)
    return {
        "causal": None,
        "full": jnp.ones((seq, seq), bool),
        "random": random,
        "empty_rows": with_empty_rows,
    }


def out_and_grads(implementation, q, k, v, g, mask, activation, pre="none"):
    def fn(q, k, v):
        return ex.attention(
            q,
            k,
            v,
            mask,
            activation_function=activation,
            qk_pre_activation_function=pre,
            implementation=implementation,
        )

    out, vjp = jax.vjp(fn, q, k, v)
    return [np.asarray(x.astype(jnp.float32)) for x in (out, *vjp(g))]


def assert_kernel_close(got, expected, dtype, label=""):
    """Outputs and gradients of a kernel path against the reference path. 16-bit
    weights carry up to ~2^-8 relative error each and 'none' outputs are unbounded sums,
    so the 16-bit tolerance scales with the largest reference value."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        if jnp.dtype(dtype).itemsize == 2:  # bf16 or fp16
            scale = max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, atol=3e-2 * scale, rtol=2e-2, err_msg=name + label)
        else:
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name + label)


@pytest.mark.parametrize("seq", [1, 13])  # 13: not a multiple of the test block (5)
@pytest.mark.parametrize("mask_name", ["causal", "full", "random", "empty_rows"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_chunked_matches_reference_f32(seq, mask_name, activation, small_blocks):
    q, k, v, g = inputs(seq)
    mask = masks(seq)[mask_name]
    expected = out_and_grads("reference", q, k, v, g, mask, activation, "swish")
    got = out_and_grads("chunked", q, k, v, g, mask, activation, "swish")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)
        assert np.isfinite(a).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mask_name", ["causal", "random"])
def test_chunked_matches_reference_bf16(activation, mask_name, small_blocks):
    q, k, v, g = inputs(17, dtype=jnp.bfloat16)
    mask = masks(17)[mask_name]
    expected = out_and_grads("reference", q, k, v, g, mask, activation)
    got = out_and_grads("chunked", q, k, v, g, mask, activation)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=3e-2, rtol=2e-2, err_msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_default_block_sizes_match_reference(activation):
    # Real block sizes: S spans two chunked blocks, several linear chunks.
    q, k, v, g = inputs(dispatch.BLOCK + 37, shape=(1,), dqk=16, dv=16)
    expected = out_and_grads("reference", q, k, v, g, None, activation)
    got = out_and_grads(None, q, k, v, g, None, activation)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_chunked_under_jit_and_vmap(small_blocks):
    q, k, v, _ = inputs(11)
    fn = lambda q, k, v: ex.attention(q, k, v, implementation="chunked")  # noqa: E731
    jitted = eqx.filter_jit(eqx.filter_vmap(fn, in_axes=1, out_axes=1))(q, k, v)
    np.testing.assert_allclose(jitted, ex.attention(q, k, v, implementation="reference"), atol=2e-5)


def test_backend_config_selects_implementation(small_blocks):
    q, k, v, _ = inputs(12)
    outs = []
    for implementation in ("reference", "chunked"):
        config = ex.mLSTMBackendAttentionConfig(
            context_length=16, activation_function="sigmoid", implementation=implementation
        )
        outs.append(ex.mLSTMBackendAttention(config, qk_head_dim=8)(q, k, v))
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)
    with pytest.raises(ValueError, match="implementation"):
        ex.mLSTMBackendAttentionConfig(implementation="flash")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("seq, pre", [(1, "none"), (150, "none"), (150, "swish")])
def test_pallas_matches_reference(activation, seq, pre):
    # On a CPU this runs the kernels in Pallas interpret mode.
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    q, k, v, g = inputs(seq, shape=(2,), dqk=16, dv=32, dtype=dtype)
    expected = out_and_grads("reference", q, k, v, g, None, activation, pre)
    got = out_and_grads("pallas", q, k, v, g, None, activation, pre)
    assert_kernel_close(got, expected, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_pallas_float16_matches_reference(activation):
    # fp16 as well as bf16 (the Triton kernels here; the Mosaic ones in the tests below).
    q, k, v, g = inputs(150, shape=(2,), dqk=16, dv=32, dtype=jnp.float16, seed=2)
    expected = out_and_grads("reference", q, k, v, g, None, activation, "swish")
    got = out_and_grads("pallas", q, k, v, g, None, activation, "swish")
    assert_kernel_close(got, expected, jnp.float16)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])  # 'none' shares the RoPE code
@pytest.mark.parametrize("fuse", ["all", "outer"])
def test_pallas_rope_in_kernel_matches_reference(activation, fuse, monkeypatch):
    # Swish + RoPE inside the kernels: on every tile, or on each program's own block.
    import eqx_xlstm._pallas as pallas

    monkeypatch.setattr(pallas, "FUSE", fuse)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    q, k, v, g = inputs(150, shape=(2,), dqk=16, dv=32, dtype=dtype, seed=1)
    expected = out_and_grads("reference", q, k, v, g, None, activation, "swish")
    got = out_and_grads("pallas", q, k, v, g, None, activation, "swish")
    assert_kernel_close(got, expected, dtype)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])  # 'none': f32 tests
def test_pallas_bf16_and_xla_rope_match_reference(activation, monkeypatch):
    # bf16 through the kernels (interpret mode on a CPU), with swish + RoPE on every
    # tile in the kernels, on the kernels' own blocks only, and by XLA in front.
    import eqx_xlstm._pallas as pallas

    q, k, v, g = inputs(70, shape=(2,), dqk=32, dv=16, dtype=jnp.bfloat16, seed=3)
    expected = out_and_grads("reference", q, k, v, g, None, activation, "swish")
    for fuse in pallas.FUSE_MODES:
        monkeypatch.setattr(pallas, "FUSE", fuse)
        got = out_and_grads("pallas", q, k, v, g, None, activation, "swish")
        assert_kernel_close(got, expected, jnp.bfloat16, f" FUSE={fuse}")


@pytest.mark.parametrize(
    "activation, fused",
    [
        ("sigmoid", False),
        pytest.param(
            "sigmoid",
            True,
            marks=pytest.mark.skipif(
                jax.default_backend() != "gpu",
                reason="the fused backward is a Mosaic kernel: same Triton path as above here",
            ),
        ),
        ("softmax", False),
    ],
)
def test_pallas_under_vmap_over_heads(activation, fused, monkeypatch):
    # `eqx.filter_vmap` over the heads axis, as the README shows: on a Hopper GPU the
    # Mosaic kernels (sigmoid forward and backward, the fused backward or the dQ + dK/dV
    # pair; softmax forward without a gradient) run batched; elsewhere the Triton
    # kernels, interpreted. Same as the unbatched call.
    import eqx_xlstm._mosaic_backward as mosaic_backward

    monkeypatch.setattr(mosaic_backward, "FUSED_FROM", 0 if fused else None)
    jax.clear_caches()  # the knob is read when tracing
    on_gpu = jax.default_backend() == "gpu"
    dtype, dim, seq = (jnp.bfloat16, 64, 200) if on_gpu else (jnp.float32, 16, 40)
    q, k, v, g = inputs(seq, shape=(2, 2), dqk=dim, dv=dim, dtype=dtype, seed=6)

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
    assert_kernel_close(got, out_and_grads("pallas", q, k, v, g, None, activation, "swish"), dtype)


def mosaic_interpret_or_skip(activation, dim):
    """Whether the Mosaic kernels run interpreted here (no GPU); skips where they can run
    neither compiled nor interpreted."""
    import eqx_xlstm._mosaic_common as mosaic_common

    interpret = jax.default_backend() != "gpu"
    if interpret and not mosaic_common.interpret_available():
        pytest.skip("this jax has no Mosaic GPU interpret mode")
    if not interpret and mosaic_common.unsupported(activation, jnp.bfloat16, dim, dim):
        pytest.skip(mosaic_common.unsupported(activation, jnp.bfloat16, dim, dim))
    return interpret


@pytest.mark.parametrize(
    "activation, seq, dim, turns, heads, heads_outer, dtype",
    [
        ("sigmoid", 256, 128, "issued", 2, True, jnp.bfloat16),
        ("sigmoid", 256, 64, "done", 2, False, jnp.float16),
        ("none", 512, 64, None, 1, True, jnp.bfloat16),  # 4 key tiles, 3 slots: one refilled
        ("softmax", 512, 64, "issued", 1, True, jnp.bfloat16),
    ],
)
def test_mosaic_kernel_matches_reference(
    activation, seq, dim, turns, heads, heads_outer, dtype, monkeypatch
):
    # The Mosaic GPU forward kernel itself: compiled on a GPU, Mosaic GPU interpret mode
    # (threads, shared memory and barriers simulated) on a CPU. `turns`: ping-pong turns
    # passed when the matmuls are issued or done, or no ping-pong. Heads launched head
    # by head or interleaved (`heads_outer`).
    import eqx_xlstm._mosaic as mosaic
    import eqx_xlstm._mosaic_common as mosaic_common

    monkeypatch.setattr(mosaic, "PINGPONG", turns is not None)
    monkeypatch.setattr(mosaic, "HANDOFF", turns or "issued")
    monkeypatch.setattr(mosaic_common, "HEADS_OUTER", heads_outer)
    interpret = mosaic_interpret_or_skip(activation, dim)
    q, k, v, _ = inputs(seq, shape=(heads,), dqk=dim, dv=dim, dtype=dtype, seed=5)
    bias = -float(np.log(seq))
    kernel = jax.jit(lambda q, k, v: mosaic.mosaic_forward(q, k, v, activation, bias, interpret))
    got = np.asarray(kernel(q, k, v).astype(jnp.float32))
    q32, k32, v32 = (np.asarray(x.astype(jnp.float32)) for x in (q, k, v))
    scores = q32 @ k32.transpose(0, 2, 1) / np.sqrt(dim)
    w = 1 / (1 + np.exp(-(scores + bias))) if activation == "sigmoid" else scores
    if activation == "softmax":
        w = np.where(np.tril(np.ones_like(w, bool)), w, -np.inf)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    want = np.tril(w) @ v32
    np.testing.assert_allclose(got, want, atol=2e-2 * max(1.0, np.abs(want).max()), rtol=2e-2)


# S=384: up to 3 key tiles (dQ) and 6 query tiles (dK/dV) through 2 slots: slots refill.
@pytest.mark.parametrize(
    "activation, seq, dim, fused, heads, dtype",
    [
        ("sigmoid", 256, 128, True, 2, jnp.bfloat16),
        ("none", 256, 64, True, 1, jnp.float16),
        ("none", 384, 64, False, 1, jnp.bfloat16),
    ],
)
def test_mosaic_backward_kernels_match_reference(activation, seq, dim, fused, heads, dtype):
    # The Mosaic GPU backward kernels themselves (interpret mode on a CPU) against
    # autodiff of a float32 reference: dK/dV with dQ fused in, or dQ and dK/dV apart.
    from eqx_xlstm._mosaic_backward import mosaic_dkv, mosaic_dq

    interpret = mosaic_interpret_or_skip(activation, dim)
    q, k, v, g = inputs(seq, shape=(heads,), dqk=dim, dv=dim, dtype=dtype, seed=6)
    bias = -float(np.log(seq))

    def reference(q, k, v):
        scores = q @ jnp.swapaxes(k, 1, 2) / np.sqrt(dim)
        w = jax.nn.sigmoid(scores + bias) if activation == "sigmoid" else scores
        return jnp.tril(w) @ v

    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    wanted = jax.vjp(reference, *f32[:3])[1](f32[3])

    def kernels(*a):
        if fused:
            return mosaic_dkv(*a, activation, bias, interpret, fused=True)
        return (mosaic_dq(*a, activation, bias, interpret),) + mosaic_dkv(
            *a, activation, bias, interpret
        )

    kernels = jax.jit(kernels)
    for got, want in zip(kernels(q, k, v, g), wanted, strict=True):
        scale = max(1.0, float(jnp.abs(want).max()))
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("kernel", ["forward", "dkv", "dq", "fused"])
def test_mosaic_kernels_under_vmap(kernel):
    # Mosaic GPU kernels have no batching rule: under vmap the mapped axis joins their
    # leading axis N (`_mosaic_common.fold_vmap`), here with an unbatched value input;
    # the fused backward's in-place dQ sum too.
    import eqx_xlstm._mosaic as mosaic
    import eqx_xlstm._mosaic_backward as mosaic_backward

    interpret = mosaic_interpret_or_skip("sigmoid", 64)
    q, k, v, g = inputs(128, shape=(2, 1), dqk=64, dv=64, dtype=jnp.bfloat16, seed=8)
    v = v[0]  # the same values for both mapped entries
    calls = {
        "forward": lambda q, k, v, g: mosaic.mosaic_forward(q, k, v, "sigmoid", -5.5, interpret),
        "dkv": lambda q, k, v, g: mosaic_backward.mosaic_dkv(
            q, k, v, g, "sigmoid", -5.5, interpret
        ),
        "dq": lambda q, k, v, g: mosaic_backward.mosaic_dq(q, k, v, g, "sigmoid", -5.5, interpret),
        "fused": lambda q, k, v, g: mosaic_backward.mosaic_dkv(
            q, k, v, g, "sigmoid", -5.5, interpret, fused=True
        ),
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
    # `in_gmem` leans on a private JAX table; where a jax lacks it, the fused backward
    # falls back to `jax.new_ref` and gives the same gradients (unbatched).
    import eqx_xlstm._mosaic_backward as mosaic_backward
    import eqx_xlstm._mosaic_common as mosaic_common

    interpret = mosaic_interpret_or_skip("sigmoid", 64)
    q, k, v, g = inputs(128, shape=(1,), dqk=64, dv=64, dtype=jnp.bfloat16, seed=9)

    def grads(q, k, v, g):
        return mosaic_backward.mosaic_dkv(q, k, v, g, "sigmoid", -5.5, interpret, fused=True)

    with_table = jax.jit(grads)(q, k, v, g)
    for module in (mosaic_common, mosaic_backward):
        monkeypatch.setattr(module, "ref_type_mappings", lambda: None)
    without = jax.jit(lambda *a: grads(*a))(q, k, v, g)  # a fresh trace
    for got, want in zip(without, with_table, strict=True):
        np.testing.assert_allclose(
            np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)), atol=1e-6
        )


def count_calls(monkeypatch, module, name):
    """Wrap `module.name` so each call (each trace, under jit) appends to the list
    returned."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(
    "activation, fused, dtype",
    [
        ("sigmoid", False, jnp.bfloat16),
        ("sigmoid", True, jnp.bfloat16),
        ("sigmoid", True, jnp.float16),
        ("none", True, jnp.bfloat16),
    ],
)
def test_pallas_uses_mosaic_forward_on_hopper(activation, fused, dtype, monkeypatch):
    # Mosaic forward and backward kernels (the dQ + dK/dV pair, or the fused one)
    # through `attention`, on a Hopper GPU; bf16 and fp16.
    import eqx_xlstm._mosaic as mosaic
    import eqx_xlstm._mosaic_backward as mosaic_backward
    import eqx_xlstm._mosaic_common as mosaic_common

    monkeypatch.setattr(mosaic_backward, "FUSED_FROM", 0 if fused else None)
    jax.clear_caches()  # the knob is read when tracing

    reason = mosaic_common.unsupported(activation, dtype, 64, 64)
    if reason:
        pytest.skip(f"the Mosaic forward is not used here: {reason}")
    calls = count_calls(monkeypatch, mosaic, "mosaic_forward")
    q, k, v, g = inputs(200, shape=(2,), dqk=64, dv=64, dtype=dtype, seed=4)
    expected = out_and_grads("reference", q, k, v, g, None, activation, "swish")
    got = out_and_grads("pallas", q, k, v, g, None, activation, "swish")
    assert calls, "the Mosaic kernel was not used"
    assert_kernel_close(got, expected, dtype)


def test_pallas_softmax_forward_uses_mosaic_on_hopper(monkeypatch):
    # Without a gradient, softmax runs the Mosaic forward kernel; under differentiation
    # the Triton kernels, whose backward reads the forward's log-sum-exp.
    import eqx_xlstm._mosaic as mosaic
    import eqx_xlstm._mosaic_common as mosaic_common

    reason = mosaic_common.unsupported("softmax", jnp.bfloat16, 64, 64)
    if reason:
        pytest.skip(f"the Mosaic forward is not used here: {reason}")
    jax.clear_caches()  # kernels are chosen when tracing
    calls = count_calls(monkeypatch, mosaic, "mosaic_forward")
    q, k, v, g = inputs(200, shape=(2,), dqk=64, dv=64, dtype=jnp.bfloat16, seed=4)

    def forward(implementation):
        out = ex.attention(
            q, k, v, qk_pre_activation_function="swish", implementation=implementation
        )
        return [np.asarray(out.astype(jnp.float32))]

    assert_kernel_close(forward("pallas"), forward("reference"), jnp.bfloat16)
    assert calls, "the Mosaic kernel was not used"
    calls.clear()
    expected = out_and_grads("reference", q, k, v, g, None, "softmax", "swish")
    got = out_and_grads("pallas", q, k, v, g, None, "softmax", "swish")
    assert_kernel_close(got, expected, jnp.bfloat16)
    assert not calls, "the Mosaic forward ran under differentiation"


def test_pallas_refusals(monkeypatch):
    q, k, v, _ = inputs(8, dqk=16, dv=16)
    with pytest.raises(ValueError, match="causal mask only"):
        ex.attention(
            q, k, v, jnp.ones((8, 8), bool), activation_function="sigmoid", implementation="pallas"
        )
    q8, k8, v8, _ = inputs(8, dqk=8, dv=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        ex.attention(q8, k8, v8, activation_function="none", implementation="pallas")
    on_gpu = lambda **kw: dispatch.pallas_unsupported(  # noqa: E731
        **({"activation": "softmax", "causal": True, "dtype": jnp.dtype("bfloat16")} | kw)
    )
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    assert on_gpu(dqk=128, dv=64) is None
    assert "power-of-two" in on_gpu(dqk=48, dv=48)
    assert "bfloat16" in on_gpu(dqk=64, dv=64, dtype=jnp.dtype("float32"))


def test_default_selection():
    select = lambda **kw: dispatch.select_implementation(  # noqa: E731
        None,
        **(
            {
                "activation": "softmax",
                "causal": True,
                "dtype": jnp.dtype("float32"),
                "seq_len": 4096,
                "dqk": 64,
                "dv": 64,
            }
            | kw
        ),
    )
    if jax.default_backend() == "cpu":
        assert select() == "chunked"
        assert select(seq_len=dispatch.BLOCK) == "reference"
        assert select(activation="none", seq_len=1000) == "chunked"
        assert select(activation="none", causal=False, seq_len=300) == "reference"
        assert select(dtype=jnp.dtype("bfloat16")) == "chunked"  # no cuDNN on a CPU
    elif jax.default_backend() == "gpu":
        bf16 = jnp.dtype("bfloat16")
        assert select(dtype=bf16) == "cudnn"
        assert select(dtype=bf16, activation="sigmoid") == "pallas"
        assert select(dtype=bf16, activation="none") == "chunked"  # the linear form
        assert select() == "chunked"  # float32 softmax


def test_cudnn_refusals(monkeypatch):
    if jax.default_backend() != "gpu":
        q, k, v, _ = inputs(8, dtype=jnp.bfloat16)
        with pytest.raises(ValueError, match="implementation='cudnn'.*NVIDIA GPU"):
            ex.attention(q, k, v, implementation="cudnn")
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    why = lambda **kw: dispatch.cudnn_unsupported(  # noqa: E731
        **(
            {
                "activation": "softmax",
                "causal": True,
                "dtype": jnp.dtype("bfloat16"),
                "dqk": 64,
                "dv": 64,
            }
            | kw
        )
    )
    assert why() is None
    assert "softmax only" in why(activation="sigmoid")
    assert "causal" in why(causal=False)
    assert "bfloat16" in why(dtype=jnp.dtype("float32"))
    assert "head dims" in why(dqk=64, dv=32)


def test_chunked_memory_grows_linearly():
    # XLA's buffer plan for fwd+bwd: x4 sequence must cost about x4, not x16.
    def temp_bytes(implementation, seq):
        q = jax.ShapeDtypeStruct((1, seq, 64), jnp.float32)
        loss = lambda q, k, v: jnp.sum(  # noqa: E731
            ex.attention(q, k, v, implementation=implementation)
        )
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    for activation_impl in ("chunked",):
        small, large = temp_bytes(activation_impl, 2048), temp_bytes(activation_impl, 8192)
        assert large / small < 6, (small, large)
    if jax.default_backend() == "cpu":  # XLA:GPU plans the reference's S x S buffers apart
        ref_small, ref_large = temp_bytes("reference", 2048), temp_bytes("reference", 8192)
        assert ref_large / ref_small > 10  # the test can tell quadratic from linear


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("pre", ["none", "swish"])
@pytest.mark.parametrize("seq", [1, 37, 100, 256])
def test_cudnn_matches_reference_on_gpu(seq, pre):
    q, k, v, g = inputs(seq, dqk=64, dv=64, dtype=jnp.bfloat16)
    expected = out_and_grads("reference", q, k, v, g, None, "softmax", pre)
    got = out_and_grads("cudnn", q, k, v, g, None, "softmax", pre)
    assert got[0].dtype == np.float32  # compared in f32; the call itself returned bf16
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=3e-2, rtol=2e-2, err_msg=name)
    default = ex.attention(q, k, v, qk_pre_activation_function=pre)
    np.testing.assert_allclose(
        np.asarray(default, np.float32), got[0], atol=1e-6, err_msg="default is cudnn"
    )
