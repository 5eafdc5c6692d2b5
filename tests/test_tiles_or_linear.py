"""'none' with packed documents: the Mosaic kernels or the linear form, chosen at run
time from the key tiles the kernels would visit (`TilesOrLinear`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_all_close, here, on_hopper, out_and_grads, random_inputs

from eqx_xlstm import maths
from eqx_xlstm.implementations import Mosaic, TilesOrLinear
from eqx_xlstm.implementations.tiles_or_linear import mean_tiles


def first_keys(*documents):
    """First keys of one row of documents of the given lengths."""
    ids = np.repeat(np.arange(len(documents)), documents)
    return maths.first_keys(len(ids), None, jnp.asarray(ids))


def test_mean_tiles_counts_the_tiles_the_kernels_visit():
    one = first_keys(1024)  # 8 blocks walking 1, 2, ..., 8 tiles
    assert float(mean_tiles(one)) == 4.5
    packed = first_keys(*[128] * 8)  # each block its own document: one tile each
    assert float(mean_tiles(packed)) == 1.0
    uneven = first_keys(100, 924)  # a block starts at the tile of its first row's key
    assert float(mean_tiles(uneven)) == 4.5
    assert float(mean_tiles(jnp.stack([one, packed]))) == 2.75
    # The kernels up to `tiles_per_block`, the linear form beyond.
    assert bool(TilesOrLinear(tiles_per_block=4.5).runs_kernels(one))
    assert not bool(TilesOrLinear(tiles_per_block=4).runs_kernels(one))
    long = first_keys(4096)  # 32 blocks: 16.5 tiles each on average
    assert bool(TilesOrLinear().runs_kernels(packed)) and not TilesOrLinear().runs_kernels(long)


def test_one_choice_for_a_vmapped_batch():
    """Under `jax.vmap` the count is the whole batch's, unmapped, so `lax.cond` stays
    a branch instead of running both sides."""
    rows = jnp.stack([first_keys(1024), first_keys(*[128] * 8)])
    np.testing.assert_array_equal(jax.vmap(mean_tiles)(rows), [2.75, 2.75])
    choose = lambda fk: jax.lax.cond(mean_tiles(fk) < 3, jnp.sin, jnp.cos, fk.astype(jnp.float32))
    eqns = jax.make_jaxpr(jax.vmap(choose))(rows).jaxpr.eqns
    assert "cond" in [e.primitive.name for e in eqns]  # a mapped condition: select_n


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(activation="sigmoid", segmented=True), "'none' only"),
        (dict(activation="none"), "segment_ids"),
        (dict(activation="none", segmented=True, window=64), "sliding_window"),
        (dict(activation="none", segmented=True, dtype=jnp.float32), "float16 or bfloat16"),
    ],
)
def test_it_says_why_it_cannot_serve(changes, reason):
    assert reason in TilesOrLinear().unsupported(on_hopper(**changes))


@pytest.mark.skipif(
    Mosaic().unsupported(here(dtype=jnp.bfloat16)) is not None,
    reason="the Mosaic kernels cannot run here (no Hopper GPU, no interpret mode)",
)
@pytest.mark.parametrize("tiles_per_block", [1e9, 0.0])  # always the kernels; always linear
def test_either_side_matches_the_reference(tiles_per_block):
    q, k, v, g = random_inputs(128, batch=(2, 1), dqk=64, dv=64, dtype=jnp.bfloat16, seed=4)
    ids = jnp.stack([jnp.repeat(jnp.arange(3), jnp.array([40, 30, 58])), jnp.zeros(128, int)])
    kwargs = dict(activation_function="none", segment_ids=ids[:, None, :])
    impl = TilesOrLinear(tiles_per_block=tiles_per_block)
    got = out_and_grads(q, k, v, g, jit=True, implementation=impl, **kwargs)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    assert_all_close(got, out_and_grads(*f32, implementation="reference", **kwargs), jnp.bfloat16)


def test_its_tuning_round_trips_and_is_checked():
    from eqx_xlstm import dispatch

    impl = TilesOrLinear(tiles_per_block=3.5)
    assert dispatch.implementation_from_dict(impl.to_dict()) == impl
    assert TilesOrLinear(tiles_per_block=12) == TilesOrLinear()
    for bad in (-1.0, float("nan"), "12", None):  # (a wrong type: the type check's TypeError)
        with pytest.raises((TypeError, ValueError), match="tiles_per_block"):
            TilesOrLinear(tiles_per_block=bad)
