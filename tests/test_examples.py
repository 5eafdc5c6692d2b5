"""The example training scripts: runs as commands (output, resume, sharding, the CLI's
errors) and, for settings refused before any work, `main(config)` called directly."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
MQAR_SMALL = ["--batch-size", "8", "--no-progress"]
sys.path.insert(0, str(EXAMPLES))  # the scripts import `training` as they do when run
import train_charlm  # noqa: E402
import train_mqar  # noqa: E402
import training  # noqa: E402


def refusal(module, *argv) -> str:
    """The UsageError `module.main` raises for the command line `argv`."""
    with pytest.raises(training.UsageError) as info:
        module.main(module.parse_args(list(argv)))
    return str(info.value)


CACHE_ENV = {}  # set by shared_compilation_cache


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """The example runs share a persistent compilation cache: most compile the same
    training step, and a cache hit halves a run's time on a 2-core CPU."""
    CACHE_ENV.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    yield
    CACHE_ENV.clear()


def run(script, *args, devices=None, code=None):
    """Run an example script with `args`, or Python `code` beside the examples."""
    env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = ["-c", code] if code else [str(EXAMPLES / script), *args]
    return subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=EXAMPLES if code else None,
    )


def final(result):
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("final: ")]
    assert len(lines) == 1, result.stdout[-2000:]
    return json.loads(lines[0][len("final: ") :])


def test_charlm_smoke(tmp_path):
    result = run(
        "train_charlm.py",
        "--steps",
        "1",  # the shortest run (its schedule is all warmup)
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
        "--activation",
        "sigmoid",
        "--no-progress",
    )
    values = final(result)
    assert values["step"] == 1 and values["val_loss"] > 0
    assert "validation loss" in result.stdout and "sample:\ndef " in result.stdout
    assert (tmp_path / "loss.png").is_file()


def test_help(capsys):
    for module in (train_mqar, train_charlm):
        with pytest.raises(SystemExit) as info:
            module.parse_args(["--help"])
        assert info.value.code == 0 and "--stop-after" in capsys.readouterr().out


def test_mqar_runs_and_resumes_exactly(tmp_path):
    one_go = final(run("train_mqar.py", "--steps", "8", "--out", str(tmp_path / "a"), *MQAR_SMALL))
    assert one_go["step"] == 8 and 0.0 <= one_go["accuracy"] <= 1.0 and one_go["loss"] > 0
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "a" / "checkpoint.eqx").is_file()
    first = final(
        run(
            "train_mqar.py",
            "--steps",
            "8",
            "--stop-after",
            "4",
            "--out",
            str(tmp_path / "b"),
            *MQAR_SMALL,
        )
    )
    assert first["step"] == 4
    resumed = final(
        run("train_mqar.py", "--steps", "8", "--resume", "--out", str(tmp_path / "b"), *MQAR_SMALL)
    )
    assert resumed["step"] == 8
    assert resumed["loss"] == one_go["loss"]
    assert resumed["accuracy"] == one_go["accuracy"]
    # The header holds the model config as data: the checkpoint alone rebuilds the
    # model, which scores the held-out set exactly as the run did.
    code = f"""
import jax, jax.numpy as jnp, training, train_mqar
model, header = training.load_model({str(tmp_path / "b")!r})
assert model.config.backend_config.activation_function == "softmax", model.config
config = train_mqar.MQARConfig()
tokens, targets, weights = train_mqar.mqar_batch(
    config, jax.random.fold_in(jax.random.key(0), 2), config.eval_sequences
)
hits = (jnp.argmax(jax.vmap(model)(tokens), -1) == targets) * weights
print(float(jnp.sum(hits) / jnp.sum(weights)), header["step"])
"""
    result = run(None, code=code)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy, step = result.stdout.split()
    assert float(accuracy) == one_go["accuracy"] and int(step) == 8


def test_charlm_checks_sampling_settings_before_training(tmp_path):
    out = str(tmp_path / "x")
    assert "--top-k must be in 1..128" in refusal(train_charlm, "--out", out, "--top-k", "0")
    assert "--temperature must be >= 0" in refusal(
        train_charlm, "--out", out, "--temperature", "-1"
    )
    assert not (tmp_path / "x").exists()


def test_sharded_run_matches_single_device(tmp_path):
    args = ["--steps", "4", "--activation", "none", *MQAR_SMALL]
    single = final(run("train_mqar.py", *args, "--out", str(tmp_path / "one"), devices=4))
    sharded = final(
        run("train_mqar.py", *args, "--devices", "4", "--out", str(tmp_path / "four"), devices=4)
    )
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend", "slstm"], "unknown --backend 'slstm'; valid: attention"),
        (["--activation", "relu"], "unknown --activation 'relu'"),
        (["--devices", "64"], "xla_force_host_platform_device_count"),
        (["--resume"], "no checkpoint"),
        (["--vocab-size", "8"], "too few keys"),
    ],
)
def test_bad_input_fails_clearly(tmp_path, args, message):
    assert message in refusal(train_mqar, "--steps", "2", "--out", str(tmp_path / "x"), *args)
    assert not (tmp_path / "x").exists()  # nothing was written


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
    # As a command: exit status 2 and "error: ..." on stderr (4 host devices here).
    args = ["--steps", "2", "--devices", "3", "--batch-size", "8", "--out", str(tmp_path / "x")]
    result = run("train_mqar.py", *args, devices=4)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --batch-size 8 is not divisible by --devices 3"
    assert not (tmp_path / "x").exists()


def test_resume_with_other_config_fails_and_keeps_checkpoint(tmp_path):
    final(run("train_mqar.py", "--steps", "2", "--out", str(tmp_path), *MQAR_SMALL))
    checkpoint = tmp_path / "checkpoint.eqx"
    before = checkpoint.read_bytes()
    for other in (["--vocab-size", "96"], ["--num-pairs", "9"]):
        args = ["--steps", "2", "--resume", *other, "--out", str(tmp_path), *MQAR_SMALL]
        assert "different run" in refusal(train_mqar, *args)
    args = ["--steps", "2", "--out", str(tmp_path), *MQAR_SMALL]
    assert "--overwrite" in refusal(train_mqar, *args)
    assert checkpoint.read_bytes() == before
