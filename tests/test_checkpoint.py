"""Checkpoints (orbax-checkpoint folders, verified on read): round trip, and every kind
of damage found as a `CheckpointError` naming the folder, never a load."""

import json
import pathlib
import re
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_xlstm as ex


def small_model(seed=0):
    config = ex.ModelConfig(
        vocab_size=32, context_length=16, embedding_dim=32, num_heads=4, num_blocks=1
    )
    return ex.LanguageModel(config, key=jax.random.key(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a small model, saved once; tests damage copies of it."""
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    model = small_model()
    ex.save_checkpoint(path, model, {"step": 3, "note": "x"})
    return path, model


def copy_of(saved, tmp_path) -> pathlib.Path:
    path = tmp_path / "ckpt"
    shutil.copytree(saved[0], path)
    return path


def test_round_trip_into_another_model_and_abstract_shapes(saved, tmp_path):
    path, model = saved
    restored, metadata = ex.load_checkpoint(path, small_model(seed=1))
    assert metadata == {"note": "x", "step": 3}
    assert ex.read_checkpoint_metadata(path)["step"] == 3
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    # `like` may be abstract (shapes and dtypes only).
    abstract = eqx.filter_eval_shape(small_model)
    restored, _ = ex.load_checkpoint(path, abstract)
    np.testing.assert_array_equal(restored.head.weight, model.head.weight)
    # Saving again over a checkpoint replaces it.
    again = copy_of(saved, tmp_path)
    ex.save_checkpoint(again, {"a": jnp.arange(3)}, {"step": 4})
    assert ex.read_checkpoint_metadata(again) == {"step": 4}
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        ex.read_checkpoint_metadata(tmp_path / "missing")


def largest_file(path: pathlib.Path) -> pathlib.Path:
    return max(
        (f for f in (path / "arrays").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
    )


def truncate(path):
    f = largest_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def empty(path):
    largest_file(path).write_bytes(b"")


def flip_one_bit(path):
    f = largest_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def edit_step(path):
    f = path / "header" / "metadata"
    header = json.loads(f.read_text())
    header["metadata"]["step"] = 300
    f.write_text(json.dumps(header))


def cut_header(path):
    f = path / "header" / "metadata"
    f.write_text(f.read_text()[:25])


def nan_weights_under_the_old_header(path):
    header = (path / "header" / "metadata").read_text()
    model = small_model()
    bad = eqx.tree_at(lambda m: m.head.weight, model, jnp.full_like(model.head.weight, jnp.nan))
    ex.save_checkpoint(path, bad, {"step": 3, "note": "x"})
    (path / "header" / "metadata").write_text(header)


@pytest.mark.parametrize(
    "damage,reason",
    [
        (truncate, "its arrays cannot be read"),
        (empty, "its arrays cannot be read"),
        # Where the bit lands (orbax's file layout varies) decides which check sees it.
        (flip_one_bit, "(does not match its checksum|its arrays cannot be read)"),
        (edit_step, "header was changed after saving"),
        (cut_header, "its header cannot be read"),
        (nan_weights_under_the_old_header, r"array \.head\.weight does not match its checksum"),
    ],
)
def test_damage_is_a_checkpoint_error_naming_the_folder(saved, tmp_path, damage, reason):
    path = copy_of(saved, tmp_path)
    damage(path)
    with pytest.raises(ex.CheckpointError) as info:
        ex.load_checkpoint(path, saved[1])
    message = str(info.value)
    assert message.startswith(f"checkpoint {path.absolute()} is unusable: ")
    assert re.search(reason, message)
    assert "\n" not in message and info.value.path == path.absolute()


def test_other_arrays_and_bad_metadata_are_refused(saved, tmp_path):
    path, _ = saved
    bigger = ex.ModelConfig(
        vocab_size=32, context_length=16, embedding_dim=64, num_heads=4, num_blocks=1
    )
    with pytest.raises(ex.CheckpointError, match=r"float32\[32, 64\] in `like`"):
        ex.load_checkpoint(path, ex.LanguageModel(bigger, key=jax.random.key(0)))
    with pytest.raises(ex.CheckpointError, match="holds .* arrays where `like` has 1"):
        ex.load_checkpoint(path, {"a": jnp.zeros(3)})
    with pytest.raises(ex.CheckpointError, match="is a file"):
        ex.load_checkpoint(largest_file(path), small_model())
    for metadata in ({"loss": float("nan")}, {"bad": object()}):
        with pytest.raises(ValueError, match="`metadata` must be JSON with finite numbers"):
            ex.save_checkpoint(tmp_path / "x", small_model(), metadata)
    assert not (tmp_path / "x").exists()


def test_checksums_see_every_dtype_and_one_flipped_bit():
    from eqx_xlstm.checkpoint import _checksum_strings

    leaves = [
        jnp.arange(6, dtype=dtype).reshape(2, 3)
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.uint32)
    ] + [jnp.array([True, False])]
    sums = _checksum_strings(leaves)
    for leaf, checksum in zip(leaves, sums):
        flat = np.asarray(leaf).reshape(-1).copy()
        bits = flat.view(np.uint8)
        bits[-1] ^= 1  # the lowest bit of the last element's last byte
        assert _checksum_strings([jnp.asarray(flat.reshape(leaf.shape))])[0] != checksum
    # Swapping two elements changes the sum too (the sums weigh positions).
    swapped = jnp.array([1.0, 0.0, 2.0])
    assert _checksum_strings([swapped]) != _checksum_strings([jnp.array([0.0, 1.0, 2.0])])


def test_an_async_save_writes_the_metadata_as_it_was_when_called(tmp_path):
    # A training loop keeps appending to its list of losses while orbax writes in the
    # background: the checkpoint must hold (and its digest cover) the list at save time.
    import orbax.checkpoint as ocp

    metadata = {"step": 2, "losses": [1.0, 2.0]}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        manager.save(2, args=ex.checkpoint_args({"w": jnp.ones((256, 256))}, metadata))
        metadata["losses"].extend([3.0] * 1000)
        metadata["step"] = 1002
        manager.wait_until_finished()
    assert ex.read_checkpoint_metadata(tmp_path / "run" / "2") == {"step": 2, "losses": [1.0, 2.0]}
