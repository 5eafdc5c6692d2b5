"""The Mosaic GPU kernels themselves: compiled on a Hopper GPU, in Mosaic GPU interpret
mode (threads, shared memory and barriers simulated) on a CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import HALF_KERNEL, here, random_inputs

import eqx_xlstm as ex
from eqx_xlstm import maths
from eqx_xlstm.implementations import Mosaic, raw_rows
from eqx_xlstm.implementations.mosaic import backward, common, dq_kernel, forward, jax_private

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
        ("sigmoid", 256, 128, 1, jnp.bfloat16),  # N > 1: test_kernels_under_vmap
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
    out = kernel(q, k, v)
    if activation == "softmax":  # also each row's log2-sum-exp2 of the logits
        out, lse = out
        w = np.where(np.tril(np.ones_like(w, bool)), w, -np.inf)
        row_max = w.max(-1, keepdims=True)
        w = np.exp(w - row_max)
        want_lse = (row_max[..., 0] + np.log(w.sum(-1))) * maths.LOG2E
        np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-3, rtol=1e-4)
        w /= w.sum(-1, keepdims=True)
    assert_close_16bit(out, np.tril(w) @ v32)


# S=384: up to 3 key tiles (dQ) and 6 query tiles (dK/dV) through 2 slots: slots refill.
# (fp16 and D=64 with the fused kernel: tests/test_implementations.py, through attention.)
@pytest.mark.parametrize(
    "activation, seq, dim, fused, heads, dtype",
    [
        ("sigmoid", 256, 128, True, 1, jnp.bfloat16),
        ("none", 384, 64, False, 1, jnp.bfloat16),
    ],
)
def test_backward_kernels_match_reference(activation, seq, dim, fused, heads, dtype):
    # dK/dV with dQ fused in, or dQ and dK/dV apart, against autodiff of float32.
    # (Softmax's pair: with first keys and grouped heads below, and through `attention`
    # in tests/test_implementations.py.)
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
        return (dq_kernel.mosaic_dq(*a, *rest), *backward.mosaic_dkv(*a, *rest))

    for got, want in zip(jax.jit(kernels)(q, k, v, g), wanted, strict=True):
        assert_close_16bit(got, np.asarray(want))


def reference_sigmoid(q, k, v, bias):
    """Causal sigmoid attention of (N, S, D) arrays in float32 (no RoPE)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    w = jax.nn.sigmoid(q @ jnp.swapaxes(k, 1, 2) / np.sqrt(q.shape[-1]) + bias)
    return jnp.tril(w) @ v


# The dQ and dK/dV kernels batch by the same fold as the forward kernel.
@pytest.mark.parametrize("kernel", ["forward", "fused"])
def test_kernels_under_vmap(kernel):
    # Mosaic GPU kernels have no batching rule: under vmap the mapped axis joins their
    # leading axis N (`common.fold_vmap`), here with an unbatched value input; the
    # fused backward's in-place dQ sum too. Against the reference, entry by entry.
    q, k, v, g = random_inputs(128, batch=(2, 1), dqk=64, dv=64, dtype=jnp.bfloat16, seed=8)
    v = v[0]  # the same values for both mapped entries
    rest = ("sigmoid", -5.5, INTERPRET)
    calls = {
        "forward": lambda q, k, v, g: forward.mosaic_forward(q, k, v, *rest),
        "fused": lambda q, k, v, g: backward.mosaic_dkv(q, k, v, g, *rest, fused=True),
    }
    batched = jax.jit(jax.vmap(calls[kernel], in_axes=(0, 0, None, 0)))(q, k, v, g)
    for i in range(2):
        if kernel == "forward":
            wanted = [reference_sigmoid(q[i], k[i], v, -5.5)]
        else:
            grads = jax.vjp(lambda *x: reference_sigmoid(*x, -5.5), q[i], k[i], v)[1]
            wanted = grads(g[i].astype(jnp.float32))
        for got, want in zip(jax.tree.leaves(batched), wanted, strict=True):
            assert_close_16bit(got[i], np.asarray(want))


def test_fused_backward_without_jax_ref_table(monkeypatch):
    # `in_gmem` leans on a private JAX table (`jax_private`); where a jax lacks it, the
    # fused backward falls back to `jax.new_ref` and gives the right gradients.
    q, k, v, g = inputs(128, 1, 64, jnp.bfloat16, seed=9)
    monkeypatch.setattr(jax_private, "ref_type_mappings", lambda: None)
    got = jax.jit(lambda *a: backward.mosaic_dkv(*a, "sigmoid", -5.5, INTERPRET, fused=True))(
        q, k, v, g
    )
    wanted = jax.vjp(lambda *x: reference_sigmoid(*x, -5.5), q, k, v)[1](g.astype(jnp.float32))
    for a, b in zip(got, wanted, strict=True):
        assert_close_16bit(a, np.asarray(b))


def test_grouped_key_value_heads_read_in_place_with_gradients():
    """Grouped-query heads: each query head's K/V row is `n // G`, nothing repeated;
    dK and dV sum the group's shares. Through the fused backward kernel (the pair takes
    grouped heads in `test_backward_kernels_with_first_keys`)."""
    q, _, _, g = random_inputs(128, batch=(1, 2), dqk=64, dv=64, dtype=jnp.bfloat16, seed=6)
    _, k, v, _ = random_inputs(128, batch=(1, 1), dqk=64, dv=64, dtype=jnp.bfloat16, seed=7)

    def out_and_grads(impl, q, k, v, g):
        f = lambda q, k, v: ex.attention(
            q, k, v, activation_function="sigmoid", sigmoid_bias=-5.0, implementation=impl
        )
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(g))

    got = jax.jit(lambda *a: out_and_grads(Mosaic(fused_backward_from=0), *a))(q, k, v, g)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    for a, b in zip(got, out_and_grads("reference", *f32), strict=True):
        assert_close_16bit(a, np.asarray(b))


def masked_reference(q, k, v, activation, bias, first_key):
    """Causal attention of `(N, S, D)` arrays in float32, query i seeing keys from
    `first_key[..., i]` on (k and v rows shared by G = N / N_kv query rows)."""
    groups = q.shape[0] // k.shape[0]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = (jnp.repeat(x, groups, axis=0) for x in (k, v))
    first_key = jnp.repeat(first_key, groups, axis=0)
    seq = q.shape[1]
    scores = q @ jnp.swapaxes(k, 1, 2) / np.sqrt(q.shape[-1])
    i, j = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
    seen = (j <= i) & (j >= first_key[:, :, None])
    if activation == "softmax":
        w = jax.nn.softmax(jnp.where(seen, scores, -jnp.inf), axis=-1)
    else:
        w = jax.nn.sigmoid(scores + bias) if activation == "sigmoid" else scores
    return jnp.where(seen, w, 0.0) @ v


def softmax_stats(q, k, v, g, first_key):
    """What the softmax backward kernels read, from the float32 reference: each row's
    log2-sum-exp2 of the logits (as the forward kernel writes it, checked in
    `test_forward_kernel_matches_reference`) and delta = sum(dO * O)."""
    groups = q.shape[0] // k.shape[0]
    q32, k32 = q.astype(jnp.float32), jnp.repeat(k.astype(jnp.float32), groups, axis=0)
    first = jnp.repeat(first_key, groups, axis=0)
    scores = q32 @ jnp.swapaxes(k32, 1, 2) / np.sqrt(q.shape[-1])
    i, j = jnp.arange(q.shape[1])[:, None], jnp.arange(q.shape[1])[None, :]
    seen = (j <= i) & (j >= first[:, :, None])
    lse = jax.nn.logsumexp(jnp.where(seen, scores, -jnp.inf), axis=-1) * maths.LOG2E
    out = masked_reference(q, k, v, "softmax", 0.0, first_key)
    return dict(lse=lse, delta=jnp.sum(out * g.astype(jnp.float32), axis=-1))


def first_keys(seq, rows, window=None, runs=None):
    ids = None if runs is None else jnp.repeat(jnp.arange(len(runs)), np.asarray(runs))
    return jnp.broadcast_to(maths.first_keys(seq, window, ids), (rows, seq)).astype(jnp.int32)


# S=384: three pairs of query blocks and three key tiles. The runs leave the last pair's
# first keys past tile 0 (skipped), mask the head of the middle pair's walk, and leave
# it an unmasked tile; with a window, rows whose first key lies beyond a masked tile.
@pytest.mark.parametrize(
    "activation, window, runs, groups",
    [
        ("softmax", 100, (40, 100, 244), 2),
        ("sigmoid", None, (40, 100, 244), 1),
        ("none", 70, None, 1),
    ],
)
def test_forward_kernel_with_first_keys(activation, window, runs, groups):
    """Segments and windows: each query's first key, the tiles before its block's
    skipped, grouped K/V rows read in place; against the reference with the mask."""
    seq, dim, kv_rows = 384, 64, 1  # `groups` query rows on one K/V row
    q, _, _, _ = inputs(seq, groups, dim, jnp.bfloat16, seed=3)
    _, k, v, _ = inputs(seq, kv_rows, dim, jnp.bfloat16, seed=4)
    first = first_keys(seq, kv_rows, window, runs)
    bias = -4.0
    kernel = lambda q, k, v, f: forward.mosaic_forward(
        q, k, v, activation, bias, INTERPRET, groups=groups, first_key=f
    )
    got = jax.jit(kernel)(q, k, v, first)
    got = got[0] if activation == "softmax" else got  # (out, lse)
    assert_close_16bit(got, np.asarray(masked_reference(q, k, v, activation, bias, first)))


# The persistent schedule: 3 CUDA blocks take the blocks (2 rows x 2 blocks of 128
# query rows or keys) in turn, 2, 1 and 1 each, the ring of streamed tiles running on
# from one block into the next; bounded (the forward's two buffers of first keys take
# turns), full (every tile walked), grouped heads, raw rows' gradients.
@pytest.mark.parametrize(
    "kernel, activation, window, runs, full, groups, raw",
    [
        ("forward", "softmax", 70, (40, 100, 116), False, 2, False),
        ("forward", "sigmoid", None, None, True, 1, False),
        ("dq", "softmax", 70, (40, 100, 116), False, 2, True),
        ("dkv", "sigmoid", None, (40, 100, 116), False, 1, True),
        ("dkv", "none", None, None, True, 1, False),
    ],
)
def test_persistent_kernels_match_one_block_per_query_block(
    kernel, activation, window, runs, full, groups, raw
):
    seq, dim, rows = 256, 64, 2
    q, _, _, g = inputs(seq, rows, dim, jnp.bfloat16, seed=3)
    _, k, v, _ = inputs(seq, rows // groups, dim, jnp.bfloat16, seed=4)
    first = None if full else first_keys(seq, rows // groups, window, runs)
    options = dict(full=full, groups=groups, first_key=first)
    if raw:
        sin, cos = rope_tables(jnp.arange(seq)[None], dim)
        options["prepared"] = raw_rows.Prepared(q, k, raw_rows.rope_pair_table(sin, cos), True)
    if kernel != "forward" and activation == "softmax":
        options |= softmax_stats(
            q, k, v, g, jnp.zeros((rows // groups, seq), jnp.int32) if full else first
        )
    call = {
        "forward": lambda **o: forward.mosaic_forward(q, k, v, activation, -4.0, INTERPRET, **o),
        "dq": lambda **o: dq_kernel.mosaic_dq(q, k, v, g, activation, -4.0, INTERPRET, **o),
        "dkv": lambda **o: backward.mosaic_dkv(q, k, v, g, activation, -4.0, INTERPRET, **o),
    }[kernel]
    want, got = call(**options), call(**options, ctas=3)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="ctas"):
        call(**options, ctas=0)
    if kernel == "dkv" and activation != "softmax":
        with pytest.raises(ValueError, match="fused"):
            call(**options, ctas=3, fused=True)


# S=256: key block 0 is seen by no query after 140 (the dK/dV walk stops early), the
# second query pair starts at key tile 1.
# With `groups` 2, both query rows read one K/V row. With `raw` ("swish" or "none"), the
# kernels take q and k after RoPE (restarting with each run, as packed documents' do)
# and swish, and return the raw rows' gradients (RoPE transposed and swish' as each
# block writes its rows; the fused kernel's summed dQ after it).
@pytest.mark.parametrize(
    "activation, window, runs, fused, groups, raw",
    [
        ("sigmoid", None, (40, 100, 116), True, 1, "swish"),
        ("none", 50, (40, 100, 116), False, 2, None),
        ("softmax", 50, (40, 100, 116), False, 2, "none"),
    ],
)
def test_backward_kernels_with_first_keys(activation, window, runs, fused, groups, raw):
    seq, dim = 256, 64  # `groups` query rows on one K/V row
    q, _, _, g = inputs(seq, groups, dim, jnp.bfloat16, seed=6)
    _, k, v, _ = inputs(seq, 1, dim, jnp.bfloat16, seed=7)
    first = first_keys(seq, 1, window, runs)
    bias = -4.0
    prepare = lambda x: x
    if raw is not None:
        ids = jnp.repeat(jnp.arange(len(runs)), np.asarray(runs))
        sin, cos = rope_tables(maths.segment_positions(ids)[None], dim)
        prepare = lambda x: maths.prepare(x, raw, sin, cos, jnp.float32)
    reference = lambda q, k, v: masked_reference(prepare(q), prepare(k), v, activation, bias, first)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    wanted = jax.vjp(reference, *f32[:3])[1](f32[3])
    options = dict(first_key=first, groups=groups)
    if raw is not None:  # the kernels' q and k: prepared, in bfloat16
        table = raw_rows.rope_pair_table(sin, cos)
        options["prepared"] = raw_rows.Prepared(q, k, table, swish=raw == "swish")
        q, k = (prepare(x.astype(jnp.float32)).astype(jnp.bfloat16) for x in (q, k))
    if activation == "softmax":
        options |= softmax_stats(q, k, v, g, first)

    def kernels(q, k, v, g):
        rest = (activation, bias, INTERPRET)
        if fused:
            return backward.mosaic_dkv(q, k, v, g, *rest, fused=True, **options)
        dq = dq_kernel.mosaic_dq(q, k, v, g, *rest, **options)
        return (dq, *backward.mosaic_dkv(q, k, v, g, *rest, **options))

    # Called eagerly, each interpreted kernel runs alone (under one jit they hung at
    # times when XLA's CPU thread pool ran out: conftest.py; on a GPU they run under
    # jit: benchmarks/results/h200_mosaic_bounded_check.txt).
    call = kernels if INTERPRET else jax.jit(kernels)
    for got, want in zip(call(q, k, v, g), wanted, strict=True):
        assert_close_16bit(got, np.asarray(want))


@pytest.mark.parametrize("segments", [True, False])
def test_attention_takes_segments_and_windows_through_the_kernels(segments, monkeypatch):
    """Through `attention`: padded rows (S=200), RoPE restarted per segment, and the
    gradient, against the reference path. A window alone reaches the kernels as
    `window` (its first keys computed in them), with segments as first keys."""
    import eqx_xlstm.implementations.mosaic as package

    seen = set()
    for name in ("mosaic_forward", "mosaic_dq", "mosaic_dkv"):
        real = getattr(package, name)
        spy = lambda *a, real=real, name=name, **o: (
            seen.add((name, o["window"], o["first_key"] is None)) or real(*a, **o)
        )
        monkeypatch.setattr(package, name, spy)
    q, k, v, g = random_inputs(200, batch=(1, 1), dqk=64, dv=64, dtype=jnp.bfloat16, seed=2)
    kwargs = dict(activation_function="sigmoid", sliding_window=50)
    if segments:
        kwargs["segment_ids"] = jnp.repeat(jnp.arange(3), jnp.array([70, 60, 70]))
    else:
        kwargs["qk_pre_activation_function"] = "swish"  # (the raw rows' path)

    def out_and_grads(impl, *arrays):
        f = lambda q, k, v: ex.attention(q, k, v, implementation=impl, **kwargs)
        out, vjp = jax.vjp(f, *arrays[:3])
        return (out, *vjp(arrays[3]))

    got = jax.jit(lambda *a: out_and_grads(Mosaic(), *a))(q, k, v, g)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    for a, b in zip(got, out_and_grads("reference", *f32), strict=True):
        assert_close_16bit(a, np.asarray(b))
    window, keyless = (None, False) if segments else (50, True)
    kernels = ("mosaic_forward", "mosaic_dq", "mosaic_dkv")
    assert seen == {(name, window, keyless) for name in kernels}


def test_attention_through_the_persistent_kernels(monkeypatch):
    """`Mosaic(ctas=1)` through `attention` (forward, dQ and dK/dV persistent, one
    CUDA block taking both rows' blocks in turn; raw q and k, segments and a window,
    padded rows) gives what `Mosaic()` gives."""
    import eqx_xlstm.implementations.mosaic as package

    seen = []
    for name in ("mosaic_forward", "mosaic_dq", "mosaic_dkv"):
        real = getattr(package, name)
        spy = lambda *a, real=real, name=name, **o: (
            seen.append((name, o.get("ctas"))) or real(*a, **o)
        )
        monkeypatch.setattr(package, name, spy)
    q, k, v, g = random_inputs(100, batch=(2,), dqk=64, dv=64, dtype=jnp.bfloat16, seed=5)
    ids = jnp.repeat(jnp.arange(3), jnp.array([40, 30, 30]))
    kwargs = dict(
        activation_function="softmax",
        qk_pre_activation_function="swish",
        segment_ids=ids,
        sliding_window=35,
    )

    def out_and_grads(impl):
        f = lambda q, k, v: ex.attention(q, k, v, implementation=impl, **kwargs)
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(g))

    persistent = out_and_grads(Mosaic(ctas=1))
    assert set(seen) == {("mosaic_dkv", 1), ("mosaic_dq", 1), ("mosaic_forward", 1)}, seen
    for a, b in zip(persistent, out_and_grads(Mosaic()), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="ctas"):
        Mosaic(ctas=0)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("raw", [False, True])
def test_bounded_dkv_kernel_stays_within_the_fast_shared_memory(activation, raw):
    """With packed documents or a window a dK/dV block walks few tiles, and there one
    16-byte barrier past `backward.FAST_SCRATCH_BYTES` cost the kernel 15-20% (H200): what is
    added to its shared memory must keep it within (raw rows: the next step up)."""
    rows = jax.ShapeDtypeStruct((4, 1024, 128), jnp.bfloat16)
    softmax = activation == "softmax"
    options = dict(fused=False, keyed=True, softmax=softmax, raw=raw, interpret=False)
    used = common.scratch_bytes(backward._dkv_scratch(rows, rows, rows, rows, **options))
    assert used <= backward.FAST_SCRATCH_BYTES[raw]


@pytest.mark.parametrize("window, runs", [(70, None), (None, (40, 100, 300, 72)), (50, (200, 312))])
def test_first_key_tile_ranges_visit_exactly_the_seen_tiles(window, runs):
    """The dQ pairs' and dK/dV blocks' ranges (computed in XLA): a walk visits a tile
    iff one of its pairs is visible, and leaves a tile unmasked only if all are."""
    seq, rows = 512, backward.ROWS
    first = np.asarray(first_keys(seq, 1, window, runs))[0]
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    seen = (j <= i) & (j >= first[:, None])
    tile = lambda q0, q1, k0, k1: seen[q0:q1, k0:k1]

    pairs = np.asarray(dq_kernel._pair_ranges(jnp.asarray(first)[None]))[0]
    for p, (lo, mask_until, *_) in enumerate(pairs):  # 128 query rows, 128-key tiles
        q0, q1 = 2 * p * rows, 2 * (p + 1) * rows
        visited = set(range(lo, p + 1))
        assert visited == {t for t in range(p + 1) if tile(q0, q1, 128 * t, 128 * t + 128).any()}
        assert all(tile(q0, q1, 128 * t, 128 * t + 128).all() for t in range(mask_until, p))

    blocks = np.asarray(backward._key_ranges(jnp.asarray(first)[None]))[0]
    for b, (stop, mask_from, *_) in enumerate(blocks):  # 128 keys, 64-row query tiles
        k0, k1 = 128 * b, 128 * (b + 1)
        visited = set(range(2 * b, stop))
        assert visited == {
            t for t in range(seq // rows) if tile(rows * t, rows * t + rows, k0, k1).any()
        }
        assert all(
            tile(rows * t, rows * t + rows, k0, k1).all() for t in range(2 * b + 2, mask_from)
        )


@pytest.mark.parametrize("window", [1, 50, 64, 128, 129, 300, 1000])
def test_window_tile_ranges_equal_those_of_its_first_keys(window):
    """For a sliding window alone the kernels compute their tile ranges from the
    positions (`window`): the same as they read for the window's first keys."""
    seq, rows = 512, backward.ROWS
    first = first_keys(seq, 1, window)
    pairs = np.asarray(dq_kernel._pair_ranges(first))[0]  # also the forward's blocks
    for p, (lo, mask_until, *_) in enumerate(pairs):
        assert common.window_tiles(p * 2 * rows, 2 * rows, window, 2 * rows) == (lo, mask_until)
    blocks = np.asarray(backward._key_ranges(first))[0]
    for b, (stop, mask_from, *_) in enumerate(blocks):
        got = common.window_query_tiles(b * 2 * rows, 2 * rows, window, rows, seq)
        assert tuple(int(x) for x in got) == (stop, mask_from)


# Each kernel given `window` against the same kernel given the window's first keys:
# equal outputs. Persistent (`ctas`: the forward's), grouped heads and raw rows'
# gradients included.
@pytest.mark.parametrize(
    "kernel, activation, groups, raw, ctas",
    [
        ("forward", "softmax", 2, False, 3),
        ("dq", "sigmoid", 1, True, None),
        ("dkv", "softmax", 2, True, None),
    ],
)
def test_window_kernels_equal_the_kernels_reading_its_first_keys(
    kernel, activation, groups, raw, ctas
):
    seq, dim, rows, window = 256, 64, 2, 70
    q, _, _, g = inputs(seq, rows, dim, jnp.bfloat16, seed=3)
    _, k, v, _ = inputs(seq, rows // groups, dim, jnp.bfloat16, seed=4)
    first = first_keys(seq, rows // groups, window)
    options = dict(groups=groups, ctas=ctas)
    if raw:
        sin, cos = rope_tables(jnp.arange(seq)[None], dim)
        options["prepared"] = raw_rows.Prepared(q, k, raw_rows.rope_pair_table(sin, cos), True)
    if kernel != "forward" and activation == "softmax":
        options |= softmax_stats(q, k, v, g, first)
    call = {
        "forward": lambda **o: forward.mosaic_forward(q, k, v, activation, -4.0, INTERPRET, **o),
        "dq": lambda **o: dq_kernel.mosaic_dq(q, k, v, g, activation, -4.0, INTERPRET, **o),
        "dkv": lambda **o: backward.mosaic_dkv(q, k, v, g, activation, -4.0, INTERPRET, **o),
    }[kernel]
    got, want = call(**options, window=window), call(**options, first_key=first)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="not both"):
        call(**options, window=window, first_key=first)
    with pytest.raises(ValueError, match="window"):
        call(**options, window=0)


def rope_tables(positions, dim):
    """sin, cos `(..., S, D/2)` of RoPE at `positions` (`(..., S)`)."""
    freq = 1.0 / 10000 ** (jnp.arange(dim // 2) / (dim // 2))
    angles = positions[..., None].astype(jnp.float32) * freq
    return jnp.sin(angles), jnp.cos(angles)


@pytest.mark.parametrize("pre_activation", ["swish", "none"])
def test_raw_gradient_is_the_transpose_of_prepare(pre_activation):
    """What the kernels' epilogues compute (here in its XLA form, also used after the
    fused kernel): the vector-Jacobian product of swish then RoPE, per-row tables."""
    x, grad = jax.random.normal(jax.random.key(0), (2, 2, 40, 16))
    sin, cos = rope_tables(jnp.stack([jnp.arange(40), jnp.arange(40) % 13]), 16)
    table = raw_rows.from_bits(raw_rows.as_bits(raw_rows.rope_pair_table(sin, cos), jnp.bfloat16))
    sin, cos = (t.astype(jnp.float16).astype(jnp.float32) for t in (sin, cos))  # as the table
    want = jax.vjp(lambda x: maths.prepare(x, pre_activation, sin, cos, jnp.float32), x)[1](grad)
    got = raw_rows.raw_gradient(grad, x, table, pre_activation == "swish")
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-6)
