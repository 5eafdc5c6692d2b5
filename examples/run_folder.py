"""The `--out` folder of a training run: one run at a time, and its checkpoints.

    out/run.lock               who runs here now (an exclusive `flock`, Linux and macOS)
    out/checkpoints/<step>/    orbax-checkpoint folders, verified when read
    out/damaged/<step>-<time>/ checkpoints that failed verification, kept as evidence

The lock is released by the kernel when its process dies, so a killed run leaves a
lock file that still names it but is free: the next run says so and takes it over.
"""

import fcntl
import os
import pathlib
import shutil
import socket
import sys
import time
from collections.abc import Callable

import eqx_xlstm as ex

LOCK = "run.lock"
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged"


class FolderError(Exception):
    """`--out` cannot be used as asked: in use, not writable, or no usable checkpoint."""


def _lock_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


class RunFolder:
    """`--out`: a context manager that holds its lock while entered."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.stale_lock: str | None = None
        """Set on entering when a run that died holding the lock had left it."""
        self._fd: int | None = None
        self._manager = None

    def _path_problem(self) -> str | None:
        """Why no folder can be written at this path (a file there or above it, or a
        read-only folder), or None."""
        if self.path.exists() and not self.path.is_dir():
            return f"--out {self.path} is a file; give a folder"
        existing = next(p for p in (self.path, *self.path.absolute().parents) if p.exists())
        if not existing.is_dir():
            return f"--out {self.path} cannot be created: {existing} is a file"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"--out {self.path} is not writable ({existing} is read-only to this user)"
        return None

    def problem(self) -> str | None:
        """Why this folder cannot be used now (not writable, or in use), without writing."""
        if problem := self._path_problem():
            return problem
        lock = self.path / LOCK
        if not lock.is_file():
            return None
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return None  # found again, with its reason, when the lock is taken
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"{self.path} is in use by another run ({_lock_holder(fd)})"
        finally:
            os.close(fd)
        return None

    def __enter__(self) -> "RunFolder":
        if problem := self._path_problem():
            raise FolderError(problem)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise FolderError(f"--out {self.path} cannot be written: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise FolderError(f"{self.path} is in use by another run ({holder})") from None
        self.stale_lock = _lock_holder(fd) or None  # a clean exit leaves it empty
        me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{me}: {' '.join(sys.argv)}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._manager is not None:
            self._manager.close()  # waits for a save in flight
            self._manager = None
        os.ftruncate(self._fd, 0)  # the file stays: deleting it would race a new run
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    # Checkpoints ---------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, newest first (orbax writes a checkpoint
        under a temporary name and renames it when complete)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            (int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit()), reverse=True
        )

    def clear(self) -> None:
        """Delete the checkpoints (for `--overwrite`)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def restore(self, like, accept: Callable[[dict], None], set_aside: bool = True):
        """`(tree, metadata)` of the newest checkpoint that verifies.

        `accept(metadata)` raises for a checkpoint of another run, which is refused
        as it is. A damaged newer checkpoint is named in a warning when an older one is
        good, and with `set_aside` moved to `damaged/` (kept as evidence, out of the
        way of the run's next saves); when none is good, a FolderError names the newest
        and nothing is moved.
        """
        damaged = []
        for step in self.steps():
            path = self.checkpoints / str(step)
            try:
                metadata = ex.read_checkpoint_metadata(path)
                accept(metadata)
                tree, metadata = ex.load_checkpoint(path, like)
                if metadata.get("step") != step:
                    raise ex.CheckpointError(path, f"it says step {metadata.get('step')}")
            except ex.CheckpointError as err:
                damaged.append(err)
                continue
            for err in damaged:
                if set_aside:
                    moved = (
                        self.path / DAMAGED / f"{err.path.name}-{time.strftime('%Y%m%dT%H%M%S')}"
                    )
                    moved.parent.mkdir(exist_ok=True)
                    err.path.rename(moved)
                    print(
                        f"warning: {err}; moved to {moved}; resuming from step {step}",
                        file=sys.stderr,
                    )
                else:
                    print(f"warning: {err}; using step {step}", file=sys.stderr)
            return tree, metadata
        if damaged:
            older = f" (and {len(damaged) - 1} older)" if len(damaged) > 1 else ""
            raise FolderError(f"{damaged[0]}{older}; no usable checkpoint in {self.checkpoints}")
        raise FolderError(f"--resume but there is no checkpoint in {self.checkpoints}")

    def save(self, step: int, tree, metadata: dict, keep: int) -> pathlib.Path:
        """Start saving a checkpoint of `step` (orbax writes it in the background and
        deletes all but the newest `keep`); returns the folder it will have."""
        if self._manager is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
            )
            self._manager = ocp.CheckpointManager(self.checkpoints.absolute(), options=options)
        self._manager.save(step, args=ex.checkpoint_args(tree, metadata))
        return self.checkpoints / str(step)

    def wait(self) -> None:
        """Wait for a save in flight to be complete on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()
