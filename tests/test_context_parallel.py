"""Context parallelism (issue #9): the sequence sharded over devices. On 4 CPU host
devices, automatic (jit on sequence-sharded inputs) and explicit
(`context_parallel_attention` in `shard_map`) equal one device for every activation
and layout, move data only by ring transfers (or D x DV state gathers for 'none'),
keep the sequence sharding, and a sequence-sharded gradient needs at most 0.6x one
device's memory at S = 4096. Argument errors are checked in this process."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_on_host_devices
from jax.sharding import Mesh, PartitionSpec

import eqx_xlstm as ex
from eqx_xlstm import context_parallel_attention


@pytest.fixture(scope="module")
def rows():
    return {row["case"]: row for row in run_on_host_devices("context_parallel_check.py")}


def test_sequence_sharded_jit_runs_as_a_ring(rows):
    auto = {case: row for case, row in rows.items() if case.startswith("auto-")}
    assert len(auto) == 6
    for case, row in auto.items():
        assert row["max_rel_err"] < 1e-5, row
        assert row["sharded_as_inputs"], row
        if case.endswith("-256"):
            # chunked and Triton: k/v shards around the ring; linear: one D x DV
            # state gathered per device and direction; never q, k or v gathered.
            allowed = {"all-gather"} if "linear" in case else {"collective-permute"}
            assert set(row["collectives"]) == allowed, row


def test_segments_and_windows_run_as_a_ring(rows):
    # Each query's first key goes round with it; only the int32 segment starts are
    # gathered (a cumulative max along the sharded sequence), never q, k or v. The
    # chunked path's pieces, and the Triton kernels' (first keys relative to each key
    # chunk, in full pieces too; grouped-query heads read in place).
    names = ("softmax", "none", "triton-softmax", "triton-sigmoid", "triton-grouped-softmax")
    for name in names:
        row = rows[f"bounded-ring-{name}"]
        assert row["max_rel_err"] < 1e-5, row
        assert row["sharded_as_inputs"], row
        assert "collective-permute" in row["collectives"], row
        assert set(row["gathered_dtypes"]) <= {"s32"}, row


def test_an_array_sigmoid_bias_runs_as_a_ring(rows):
    # A learnable bias per head through the Triton kernels' ring (alone, and with a
    # window): each query's bias travels with it; its gradient, summed over positions
    # held on every device, costs one all-reduce of a (batch, heads) array. Nothing
    # gathered; output and every gradient (the bias's too) as on one device.
    for name in ("bias", "bias-window"):
        row = rows[f"ring-triton-{name}"]
        assert row["max_rel_err"] < 1e-5, row
        assert row["sharded_as_inputs"], row
        assert set(row["collectives"]) == {"collective-permute", "all-reduce"}, row
        assert row["collectives"]["all-reduce"] == 1, row
        assert not row["gathered_dtypes"], row


def test_explicit_function_in_shard_map_matches_one_device(rows):
    explicit = [row for case, row in rows.items() if case.startswith("explicit-")]
    assert len(explicit) == 4  # every activation; both layouts for softmax
    for row in explicit:
        assert row["max_rel_err"] < 1e-5, row


def test_sequence_sharded_gradient_memory_shrinks(rows):
    for case in ("memory-chunked-softmax", "memory-linear-none"):
        row = rows[case]
        assert row["sharded"] <= 0.6 * row["one"], row


def one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]), ("seq",))


def test_one_device_equals_attention():
    # The ring of one device: its own two zig-zag chunks (every activation on 4 devices
    # in the subprocess above).
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (2, 64, 16)) for key in keys)
    spec = PartitionSpec(None, "seq", None)
    f = lambda q, k, v: context_parallel_attention(
        q, k, v, axis_name="seq", activation_function="softmax", layout="zigzag", block=16
    )
    got = jax.shard_map(f, mesh=one_device_mesh(), in_specs=spec, out_specs=spec)(q, k, v)
    np.testing.assert_allclose(got, ex.attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_argument_errors_name_the_argument():
    q = jnp.ones((2, 6, 8))
    with pytest.raises(ValueError, match="axis_name"):
        context_parallel_attention(q, q, q, axis_name="seq")
    spec = PartitionSpec(None, "seq", None)
    call = lambda **kw: jax.shard_map(
        lambda x: context_parallel_attention(x, x, x, axis_name="seq", **kw),
        mesh=one_device_mesh(),
        in_specs=spec,
        out_specs=spec,
    )
    with pytest.raises(ValueError, match="layout"):
        call(layout="striped")(q)
    with pytest.raises(ValueError, match="even shard length"):
        call(layout="zigzag")(jnp.ones((2, 7, 8)))
    with pytest.raises(ValueError, match="block"):
        call(block=0)(q)
    with pytest.raises(ValueError, match="activation_function"):
        call(activation_function="relu")(q)


def test_explicit_sharding_mode_runs_every_path(rows):
    # Explicit mesh axes type the sharding: every path runs on each device's shard
    # (shard_map), under jax.vmap too; sequence sharding as a ring; leading axes with no
    # communication.
    for case in ("heads-chunked", "heads-triton", "vmap-heads-triton"):
        row = rows[f"mode-explicit-{case}"]
        assert "crash" not in row, row
        assert row["max_rel_err"] < 1e-5, row
        assert row["out_spec"] == [None, "x", None, None], row
        assert row["collectives"] == {}, row
    for case in (
        "sequence-chunked",
        "sequence-chunked-sigmoid",
        "sequence-triton",
        "vmap-sequence-chunked",
    ):
        row = rows[f"mode-explicit-{case}"]
        assert "crash" not in row, row
        assert row["max_rel_err"] < 1e-5, row
        assert row["out_spec"] == [None, None, "x", None], row
        assert set(row["collectives"]) == {"collective-permute"}, row  # the ring only
    row = rows["mode-explicit-sequence-linear"]
    assert "crash" not in row and row["max_rel_err"] < 1e-5, row
    assert "collective-permute" not in row["collectives"], row  # a state prefix, no ring
    for activation in ("softmax", "none"):  # a language model on a (data, seq) mesh
        row = rows[f"mode-explicit-lm-{activation}"]
        assert "crash" not in row and row["max_abs_err"] < 1e-5, row
    # Segments, a window, grouped heads and a per-head bias over the batch axis: one
    # device's values and gradients (the bias's gradient summed over the devices).
    row = rows["mode-explicit-batch-features"]
    assert "crash" not in row and "error" not in row and row["max_rel_err"] < 1e-5, row
    assert set(row["collectives"]) <= {"all-reduce"}, row
    # Over the sequence: segments and a window go round the ring (chunked pieces, and
    # the Triton kernels'), RoPE restarted per segment; the all-reduce is the loss's
    # sum. With grouped heads and the per-head bias too (K/V repeated to q's heads, the
    # bias one more feature): the all-reduce also sums the bias's gradient.
    for case in ("chunked-softmax", "chunked-none", "triton-sigmoid"):
        row = rows[f"mode-explicit-sequence-{case}-features"]
        assert row["max_rel_err"] < 1e-5, row
        assert set(row["collectives"]) == {"collective-permute", "all-reduce"}, row
    row = rows["mode-explicit-sequence-features"]
    assert "crash" not in row and "error" not in row and row["max_rel_err"] < 1e-5, row
    assert set(row["collectives"]) == {"collective-permute", "all-reduce"}, row
    message = rows["mode-explicit-features"]["error"]
    assert message and "`queries`" in message and "feature (last) axis" in message, message
