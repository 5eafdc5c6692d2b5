"""Across devices (issue #9, first part): on 4 CPU host devices, the XLA paths and the
Triton kernels (Pallas interpret mode) run shard-local on inputs sharded over a leading
(batch or heads) axis: no collective in the compiled forward or gradient, outputs and
gradients keep the inputs' sharding, and the results equal one device's; decoding too,
with its KV cache or linear state sharded like the inputs; sharded arrays through a
checkpoint; and a language model placed on a 2 x 2 mesh by `ex.partition_specs`."""

from helpers import run_on_host_devices


def test_paths_are_shard_local_over_batch_and_heads():
    rows = run_on_host_devices("sharded_attention_check.py")
    checkpoints = [row for row in rows if row["case"].startswith("checkpoint")]
    (model_parallel,) = [row for row in rows if row["case"] == "model-parallel"]
    rows = [row for row in rows if row["case"] not in ("model-parallel",)]
    rows = [row for row in rows if not row["case"].startswith("checkpoint")]
    # An array shared by the shards (the Mosaic backward's RoPE table, one for all rows
    # or one per batch row): whole along its axes of size 1, split like the others
    # along the rest and the sequence; no collective.
    shared = [row for row in rows if row["case"] == "shared-table"]
    rows = [row for row in rows if row["case"] != "shared-table"]
    # The swish + RoPE kernel in front of the GPU kernels and its gradient's, shard by
    # shard over the batch, the heads or the sequence: no collective, results exact.
    passes = [row for row in rows if row["case"] == "prepare-pass"]
    rows = [row for row in rows if row["case"] != "prepare-pass"]
    assert [row["sharded"] for row in passes] == ["batch", "heads", "sequence"], passes
    for row in passes:
        assert not row["collectives"], row
        assert row["shardings"] == [row["expected"]], row
        assert row["max_rel_err"] == 0.0, row
    assert [row["sharded"] for row in shared] == ["batch", "batch", "heads", "sequence"], shared
    for row in shared:
        assert not row["collectives"], row
        assert row["shardings"] == [row["expected"]], row
        assert row["max_rel_err"] == 0.0, row
    # Packed sequences with a window (chunked, linear, Triton) and grouped-query heads:
    # no collective either (each device its own block bounds), shardings kept, exact.
    bounded = [row for row in rows if row["case"].startswith("bounded")]
    rows = [row for row in rows if not row["case"].startswith("bounded")]
    assert len(bounded) == 6, bounded
    for row in bounded:
        assert not row["collectives"], row
        assert row["shardings"] == [row["expected"]], row
        assert row["max_rel_err"] < 1e-5, row
    # A language model on a 2 x 2 (data, model) mesh placed by ex.partition_specs:
    # Megatron-style column/row-parallel projections with FSDP over data; loss and
    # gradients equal one device's; the decoding state's per-head arrays over `model`.
    assert model_parallel["max_rel_err"] < 1e-5, model_parallel
    assert model_parallel["q_proj"] == model_parallel["ffn_up"] == "P('model', 'data')"
    assert model_parallel["out_proj"] == "P('data', 'model')"
    assert model_parallel["head"] == "P('model', 'data')"
    assert model_parallel["embedding"] == "P('data', None)"
    assert "P('model',)" in model_parallel["state_shardings"], model_parallel
    # Sharded arrays through a checkpoint: back equal, with the sharding asked for.
    assert len(checkpoints) == 2
    for row in checkpoints:
        assert row["equal"] and row["sharding"] == row["expected"], row
    # 5 paths, one vmapped over heads and 2 decoding states, each sharded two ways
    assert len(rows) == 16
    for row in rows:
        # A decode step checks that every row stays within context_length
        # (`equinox.error_if`): one all-reduce of that flag; no data moves.
        allowed = {"all-reduce"} if row["case"].startswith("decode") else set()
        assert set(row["collectives"]) <= allowed, row
        assert row["shardings"] == [row["expected"]], row
        assert row["max_rel_err"] < 1e-5, row
