"""Checkpoints: a JSON header line, then `eqx.tree_serialise_leaves` of a pytree."""

import json
import os
import pathlib
from typing import Any

import equinox as eqx
from jaxtyping import PyTree


def save_checkpoint(path: str | os.PathLike, tree: PyTree, metadata: dict[str, Any]) -> None:
    """Write `metadata` (JSON-serialisable) and the leaves of `tree` to `path`.

    The file is written beside `path` first and renamed into place, so an
    interrupted save never leaves a half-written checkpoint.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(json.dumps(metadata, sort_keys=True).encode() + b"\n")
        eqx.tree_serialise_leaves(fh, tree)
    os.replace(partial, path)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored by `save_checkpoint`; a FileNotFoundError if absent."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    with open(path, "rb") as fh:
        return json.loads(fh.readline())


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Read a checkpoint into the structure of `like`; returns `(tree, metadata)`."""
    metadata = read_checkpoint_metadata(path)
    with open(path, "rb") as fh:
        fh.readline()
        tree = eqx.tree_deserialise_leaves(fh, like)
    return tree, metadata
