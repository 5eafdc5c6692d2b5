"""Across devices (issue #9, first part): on 4 CPU host devices, the XLA paths and the
Triton kernels (Pallas interpret mode) run shard-local on inputs sharded over a leading
(batch or heads) axis: no collective in the compiled forward or gradient, outputs and
gradients keep the inputs' sharding, and the results equal one device's."""

import json
import os
import pathlib
import subprocess
import sys

CHECK = pathlib.Path(__file__).with_name("sharded_attention_check.py")


def test_paths_are_shard_local_over_batch_and_heads():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    result = subprocess.run(
        [sys.executable, str(CHECK)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 12  # 5 cases and one vmapped over heads, each sharded two ways
    for row in rows:
        assert row["collectives"] == {}, row
        assert row["shardings"] == [row["expected"]], row
        assert row["max_rel_err"] < 1e-5, row
