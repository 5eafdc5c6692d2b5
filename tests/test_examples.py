"""The example training scripts: runs as commands (output, resume, sharding, the CLI's
errors) and, for settings refused before any work, `main(config)` called directly."""

import dataclasses
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import eqx_xlstm as ex

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
MQAR_SMALL = ["--batch-size", "8", "--no-progress", "--num-blocks", "1", "--embedding-dim", "32"]
sys.path.insert(0, str(EXAMPLES))  # the scripts import `training` as they do when run
import run_folder  # noqa: E402
import train_charlm  # noqa: E402
import train_mqar  # noqa: E402
import training  # noqa: E402


def refusal(module, *argv) -> str:
    """The UsageError `module.main` raises for the command line `argv`."""
    with pytest.raises(training.UsageError) as info:
        main_in_process(module, *argv)
    return str(info.value)


def main_in_process(module, *argv) -> dict:
    """`module.main` for the command line `argv`, in this process (the examples, like
    user code, rely on standard dtype promotion; the tests' default is strict)."""
    with jax.numpy_dtype_promotion("standard"):
        return module.main(module.parse_args(list(argv)))


CACHE_ENV = {}  # set by shared_compilation_cache


def session_folder(tmp_path_factory, worker_id) -> pathlib.Path:
    """A folder of this test session that the pytest-xdist workers share."""
    if worker_id == "master":
        return tmp_path_factory.getbasetemp()
    return tmp_path_factory.getbasetemp().parent  # this session's, above the workers'


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory, worker_id):
    """The example runs (of both workers) share a persistent compilation cache: most
    compile the same training step, and a cache hit halves a run's time on 2 cores."""
    cache = session_folder(tmp_path_factory, worker_id) / "jax_cache"
    cache.mkdir(exist_ok=True)
    CACHE_ENV.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    yield
    CACHE_ENV.clear()


def example_env(devices=None) -> dict:
    """The environment of an example process: the CPU, the shared compilation cache,
    and `devices` host devices if given."""
    env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}
    if devices:
        count = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {count}".strip()
    return env


def run(script, *args, devices=None, code=None):
    """Run an example script with `args`, or Python `code` beside the examples."""
    env = example_env(devices)
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


RUN = ["--steps", "40", "--checkpoint-every", "5", *MQAR_SMALL]


def start(*args, out):
    """`train_mqar.py` with `args` as a running process (stdout and stderr piped)."""
    command = [sys.executable, str(EXAMPLES / "train_mqar.py"), *args, "--out", str(out)]
    return subprocess.Popen(
        command, env=example_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_checkpoint(out, step, process):
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / str(step)).is_dir():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def one_go(tmp_path_factory, worker_id):
    """An uninterrupted run: its folder and final values, made once per session (the
    pytest-xdist workers share it through a locked folder of the session)."""
    root = session_folder(tmp_path_factory, worker_id)
    with open(root / "one_go.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out, values = root / "one_go", root / "one_go.json"
        if not values.is_file():
            values.write_text(json.dumps(final(run("train_mqar.py", *RUN, "--out", str(out)))))
        return out, json.loads(values.read_text())


def test_run_keeps_the_newest_checkpoints_which_rebuild_the_model(one_go):
    out, values = one_go
    assert values["step"] == 40 and 0.0 <= values["accuracy"] <= 1.0 and values["loss"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [30, 35, 40]
    assert (out / "run.lock").read_text() == ""  # released
    # The header holds the model config as data: the checkpoint alone rebuilds the
    # model, which scores the held-out set exactly as the run did.
    code = f"""
import training, train_mqar
model, header = training.load_model({str(out)!r})
assert model.config.backend_config.activation_function == "softmax", model.config
assert model.config.num_blocks == 1 and model.config.embedding_dim == 32, model.config
print(train_mqar.held_out_accuracy(train_mqar.MQARConfig(), model), header["step"])
"""
    result = run(None, code=code)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy, step = result.stdout.split()
    assert float(accuracy) == values["accuracy"] and int(step) == 40


def test_sigkill_then_resume_ends_exactly_as_one_go(one_go, tmp_path):
    out = tmp_path / "killed"
    process = start(*RUN, out=out)
    wait_for_checkpoint(out, 5, process)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
    resumed = run("train_mqar.py", *RUN, "--resume", "--out", str(out))
    assert final(resumed) == {**one_go[1], "out": str(out)}  # loss and accuracy exactly
    assert "note: taking over" in resumed.stderr  # the killed run's stale lock


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_at_a_step_boundary_and_a_second_run_is_refused(tmp_path, signum):
    out, args = tmp_path / "run", ["--steps", "100000", "--checkpoint-every", "5", *MQAR_SMALL]
    process = start(*args, out=out)
    wait_for_checkpoint(out, 5, process)
    # One run per --out: a second one is refused, naming the running one.
    message = refusal(train_mqar, *args, "--overwrite", "--out", str(out))
    assert f"is in use by another run (pid {process.pid} on " in message
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"stopped by {signum.name} at step (\d+) of 100000: checkpoint saved in (.+); "
        "continue with --resume",
        last,
    )
    assert match, stderr[-2000:]
    assert ex.read_checkpoint_metadata(match[2])["step"] == int(match[1]) >= 5
    assert (out / "run.lock").read_text() == ""


def test_damaged_checkpoints_are_found_and_kept(one_go, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(one_go[0], out)
    newest = out / "checkpoints" / "40"
    data = max((f for f in (newest / "arrays").rglob("*") if f.is_file()), key=os.path.getsize)
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one flipped bit
    data.write_bytes(bytes(damaged))
    with jax.numpy_dtype_promotion("standard"):
        _, header = training.load_model(out)  # reading only: the damaged one stays put
    assert header["step"] == 35 and newest.is_dir() and not (out / "damaged").exists()
    resumed = run("train_mqar.py", *RUN, "--resume", "--out", str(out))
    assert final(resumed)["loss"] == one_go[1]["loss"]  # resumed from step 35
    # Where the flipped bit lands (orbax's file layout varies) decides which check sees it.
    assert f"warning: checkpoint {newest.absolute()} is unusable: " in resumed.stderr
    assert re.search("does not match its checksum|its arrays cannot be read", resumed.stderr)
    assert "resuming from step 35" in resumed.stderr
    (evidence,) = (out / "damaged").iterdir()  # moved aside, not deleted
    assert evidence.name.startswith("40-") and (evidence / "header").is_dir()
    # Every checkpoint edited: one clear error, and nothing moved or rewritten.
    for header in (out / "checkpoints").glob("*/header/metadata"):
        header.write_text(header.read_text().replace('"step": ', '"step": 1'))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(run_folder.FolderError) as info:
        main_in_process(train_mqar, *RUN, "--resume", "--out", str(out))
    assert str(info.value) == (
        f"checkpoint {newest.absolute()} is unusable: its header was changed after saving "
        f"(digest mismatch) (and 2 older); no usable checkpoint in {out / 'checkpoints'}"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "diverged"
    result = run("train_mqar.py", "--lr", "1e30", *RUN, "--out", str(out))  # AdamW: overflow
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: the (loss became nan|parameters became non-finite) at step \d+; stopped "
        rf"without saving it; the last good checkpoint is {out / 'checkpoints'}/(\d+) \(try a "
        r"lower --lr\)",
        result.stderr.strip().splitlines()[-1],
    ), result.stderr[-2000:]
    # Nothing non-finite was saved: every checkpoint verifies and holds finite numbers.
    config = train_mqar.parse_args(["--lr", "1e30", *RUN, "--out", str(out)])
    with jax.numpy_dtype_promotion("standard"):
        like = jax.eval_shape(
            lambda: training._fresh(config.train, config.model_config())[1].saved()
        )
    for path in (out / "checkpoints").iterdir():
        saved, header = ex.load_checkpoint(path, like)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))
        assert np.isfinite(header["losses"]).all()
    assert (out / "run.lock").read_text() == ""


def test_a_resumed_run_that_diverges_names_the_checkpoint_it_resumed_from(tmp_path):
    # The training loop itself, on a tiny model: a learning rate of 1e30 is 0 at step 0
    # (warmup), so the first checkpoint is good; after resuming, AdamW steps overflow.
    out = tmp_path / "resumed"
    config = training.TrainConfig(
        steps=20, out=str(out), batch_size=2, lr=1e30, stop_after=1, progress=False
    )
    sizes = dict(vocab_size=16, context_length=8, embedding_dim=16, num_heads=2, num_blocks=1)

    def make_batch(key, step):
        tokens = jax.random.randint(jax.random.fold_in(key, step), (2, 9), 0, 16)
        return tokens[:, :-1], tokens[:, 1:], np.ones((2, 8), np.float32)

    model_config = training.model_config(config, **sizes)
    with jax.numpy_dtype_promotion("standard"):
        training.train(config, model_config, make_batch, data_settings={})
        resumed = dataclasses.replace(config, stop_after=None, resume=True)
        with pytest.raises(training.TrainingStopped) as info:
            training.train(resumed, model_config, make_batch, data_settings={})
    assert f"the last good checkpoint is {out / 'checkpoints' / '1'} " in str(info.value)


def test_charlm_checks_sampling_settings_before_training(tmp_path):
    out = str(tmp_path / "x")
    assert "--top-k must be in 1..128" in refusal(train_charlm, "--out", out, "--top-k", "0")
    for temperature in ("-1", "inf", "nan"):
        assert "--temperature must be a finite number >= 0" in refusal(
            train_charlm, "--out", out, "--temperature", temperature
        )
    assert not (tmp_path / "x").exists()


def test_sharded_run_matches_one_device_and_the_mesh_identifies_the_run(one_go, tmp_path):
    # A 2 x 2 mesh: batch and parameters (FSDP) over `data`, heads over `model`.
    out = tmp_path / "four"
    args = (*RUN, "--mesh", "data=2,model=2", "--out", str(out))
    sharded = final(run("train_mqar.py", *args, devices=4))
    assert sharded["loss"] == pytest.approx(one_go[1]["loss"], rel=1e-4)
    assert sharded["accuracy"] == pytest.approx(one_go[1]["accuracy"], abs=1e-3)
    # Resuming on another mesh is refused (sums would run in another order).
    message = refusal(train_mqar, *RUN, "--resume", "--out", str(out))
    assert "different run (mesh differ)" in message


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend", "slstm"], "unknown --backend 'slstm'; valid: attention"),
        (["--activation", "relu"], "unknown --activation 'relu'"),
        (["--devices", "64"], "xla_force_host_platform_device_count"),
        (["--mesh", "data=2,model=32"], "--mesh data=2,model=32 needs 64 devices"),
        (["--mesh", "data=2,heads=2"], "each part must be AXIS=SIZE"),
        (["--mesh", "data=0"], "the size of 'data' must be an int >= 1"),
        (["--mesh", "data=2", "--devices", "2"], "pass one of them"),
        (["--resume"], "no checkpoint"),
        (["--vocab-size", "8"], "too few keys"),
        (["--num-pairs", "0"], "--num-pairs must be >= 1, got 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
        (["--keep", "0"], "--keep must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--seed", str(2**32)], "--seed must be < 2**32"),
        (["--stop-after", "3"], "--stop-after must be between 1 and --steps (2)"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    ],
)
def test_bad_input_fails_clearly(tmp_path, args, message):
    assert message in refusal(train_mqar, "--steps", "2", "--out", str(tmp_path / "x"), *args)
    assert not (tmp_path / "x").exists()  # nothing was written


def test_unusable_out_is_refused_before_training(tmp_path):
    file = tmp_path / "file"
    file.write_text("not a folder")
    assert f"--out {file} is a file; give a folder" in refusal(train_mqar, "--out", str(file))
    assert f"{file} is a file" in refusal(train_mqar, "--out", str(file / "sub"))
    assert file.read_text() == "not a folder"


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
    # As a command: exit status 2 and "error: ..." on stderr (4 host devices here).
    args = ["--steps", "2", "--devices", "3", "--batch-size", "8", "--out", str(tmp_path / "x")]
    result = run("train_mqar.py", *args, devices=4)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --batch-size 8 is not divisible by --devices 3"
    assert not (tmp_path / "x").exists()


def test_resume_with_other_config_is_refused_and_keeps_the_checkpoints(one_go, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(one_go[0], out)
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    for other in (["--vocab-size", "96"], ["--num-pairs", "9"], ["--lr", "0.01"]):
        message = refusal(train_mqar, *RUN, "--resume", *other, "--out", str(out))
        assert f"the checkpoints in {out} are from a different run" in message
    assert "pass --resume to continue them or --overwrite" in refusal(
        train_mqar, *RUN, "--out", str(out)
    )
    after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before


def test_run_main_turns_each_ending_into_one_line_and_a_status(capsys):
    def raising(err):
        def main(config):
            raise err

        return main

    cases = [
        (training.UsageError("--lr must be ..."), 2, "error: --lr must be ..."),
        (run_folder.FolderError("x is in use"), 2, "error: x is in use"),
        (training.TrainingStopped("stopped by SIGTERM at step 3", 143), 143, "stopped by SIGTERM"),
        (KeyboardInterrupt(), 130, "stopped by SIGINT without saving"),
    ]
    for err, status, line in cases:
        with pytest.raises(SystemExit) as info:
            training.run_main(raising(err), None)
        assert info.value.code == status
        assert capsys.readouterr().err.strip().startswith(line)
