"""The run folder: its layout, the lock, and the state a killed run resumes from.

``RunDir`` is the one owner of a run folder's files; docs/run-folder.md draws the layout and
states the guarantees. Every file is written whole or not at all (``files.write_atomic``); a
kill leaves at worst a temporary file, which the next process that opens the run sweeps away.
``resume.json`` (``ResumeState``) is the commit point of an epoch and carries the run's
identity: digests of config.json, of the committed history and of the resume checkpoint,
checked before a resume trusts any of them.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_cnn.config import TrainConfig, check_name
from mnist_cnn.errors import UsageError
from mnist_cnn.events import drop_events
from mnist_cnn.files import json_digest, read_json, read_regular, sha256, temp_name, write_json

log = logging.getLogger(__name__)

_TEMP = re.compile(r"^\..+\.tmp-[0-9a-f]{32}(\.keras)?$")  # (.keras: model_bytes' scratch copy)
_CHECKPOINT = re.compile(r"^(?P<kind>epoch|resume)-(?P<epoch>[0-9]{2,9})\.keras$")  # any other name is not ours
MAX_CHECKPOINT = 1 << 30  # bytes: a resume checkpoint of the largest CNN the bounds allow is ~0.6 GB


def resume_checkpoint_name(epochs: int) -> str:
    """The resume checkpoint of ``epochs`` finished epochs, relative to the run folder."""
    return f"checkpoints/resume-{epochs:02d}.keras"


def _is_int(value) -> bool:
    return type(value) is int


@dataclass(frozen=True)
class ResumeState:
    """What the last finished epoch left: the run resumes from here."""

    epochs: int  # finished epochs
    steps: int  # the optimizer's step count after them
    checkpoint: str  # relative to the run folder
    config_sha256: str  # the run's identity: config.json as it was written when the run was created ...
    history_sha256: str  # ... its first ``epochs`` history entries (``files.json_digest``) ...
    checkpoint_sha256: str  # ... and the checkpoint's bytes: all must agree before a resume steers anything
    exported: bool = False  # the --export SavedModel was written
    random: dict = dataclasses.field(default_factory=dict)  # the model's random generators' states

    @classmethod
    def from_json(cls, raw, path: Path, max_epochs: int | None = None) -> ResumeState:
        """``resume.json``'s content, checked field by field before it steers anything."""
        def bad(problem):
            return UsageError(f"{path}: {problem}")

        if not isinstance(raw, dict):
            raise bad(f"expected a JSON object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        if raw.keys() - names or not {"epochs", "steps", "checkpoint"} <= raw.keys():
            raise bad(f"expected the keys {sorted(names)}, got {sorted(raw)}")
        epochs, steps = raw["epochs"], raw["steps"]
        if not _is_int(epochs) or epochs < 1 or (max_epochs is not None and epochs > max_epochs):
            most = max_epochs if max_epochs is not None else "--epochs"
            raise bad(f"epochs must be a whole number from 1 to {most}, got {epochs!r}")
        if not _is_int(steps) or steps < epochs:
            raise bad(f"steps must be a whole number of at least one per epoch, got {steps!r}")
        if raw["checkpoint"] != resume_checkpoint_name(epochs):
            raise bad(f"checkpoint must be {resume_checkpoint_name(epochs)}, got {str(raw['checkpoint'])[:80]!r}")
        if required - raw.keys():
            raise bad(f"expected the keys {sorted(names)}, missing {sorted(required - raw.keys())}")
        for key in ("config_sha256", "history_sha256", "checkpoint_sha256"):
            if not isinstance(raw[key], str) or not re.fullmatch(r"[0-9a-f]{64}", raw[key]):
                raise bad(f"{key} must be a SHA-256 in hex, got {str(raw[key])[:80]!r}")
        if type(raw.get("exported", False)) is not bool:
            raise bad(f"exported must be true or false, got {raw['exported']!r}")
        random = raw.get("random", {})
        if not isinstance(random, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(map(_is_int, v))
                for k, v in random.items()):
            raise bad("random must map generator names to two whole numbers")
        return cls(**raw)


class RunDir:
    """One run folder: paths, atomic writes, the lock, resume state."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    # -- layout ------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def history(self) -> Path:
        return self.path / "history.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def model(self) -> Path:
        return self.path / "model.keras"

    @property
    def resume_file(self) -> Path:
        return self.path / "resume.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.keras"

    def epoch_checkpoint(self, epoch: int) -> Path:
        """The model after ``epoch`` finished epochs (1-based): weights, no optimizer state."""
        return self.checkpoints / f"epoch-{epoch:02d}.keras"

    def resume_checkpoint(self, epoch: int) -> Path:
        """The full training state after ``epoch`` epochs (model + optimizer): what --resume loads."""
        return self.path / resume_checkpoint_name(epoch)

    def _checkpoints(self, kind: str) -> list[tuple[int, Path]]:
        """(epoch, path) of this run's checkpoints of ``kind``, by epoch; files of other names
        (``epoch-abc.keras``, a folder, a link) are not the run's and are left alone."""
        found = []
        for path in self.checkpoints.glob(f"{kind}-*.keras"):
            match = _CHECKPOINT.match(path.name)
            if match and match["kind"] == kind and path.is_file() and not path.is_symlink():
                found.append((int(match["epoch"]), path))
        return sorted(found)

    def epoch_checkpoints(self) -> list[Path]:
        return [path for _, path in self._checkpoints("epoch")]

    def resume_checkpoints(self) -> list[Path]:
        return [path for _, path in self._checkpoints("resume")]

    def read_config(self) -> TrainConfig:
        """The config the run was started with (its ``config.json``), type-checked and validated."""
        try:
            saved = read_json(self.config, "run config")  # a regular file, at most 16 MB
        except FileNotFoundError:
            raise UsageError(f"--resume {self.path}: not a run folder (no config.json)") from None
        except UsageError as e:
            raise UsageError(f"--resume {e}") from None
        return TrainConfig.from_dict(saved, f"--resume {self.path}: config.json")

    @property
    def finished(self) -> bool:
        return self.metrics.exists()

    # -- creating and opening ------------------------------------------------------

    @classmethod
    def create(cls, logdir: str, run_name: str | None) -> RunDir:
        """A new, empty, locked run folder; never an existing one.

        Without a name the folder is a timestamp, with -2, -3, ... appended when
        another run took that second (mkdir is atomic, so concurrent runs never share).
        """
        root = Path(logdir)
        if run_name:
            check_name("--run-name", run_name)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if run_name:
                try:
                    (root / run_name).mkdir()
                except FileExistsError:
                    raise UsageError(
                        f"--run-name {run_name}: {root / run_name} already exists; choose another name"
                    ) from None
                return cls(root / run_name).lock()
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for n in range(1, 10_000):
                path = root / (stamp if n == 1 else f"{stamp}-{n}")
                try:
                    path.mkdir()
                    return cls(path).lock()
                except FileExistsError:
                    continue
        except OSError as e:
            raise UsageError(f"--logdir {logdir}: cannot create a run folder there ({e.strerror or e})") from None
        raise UsageError(f"--logdir {logdir}: no free run folder name for {stamp}")

    def lock(self) -> RunDir:
        """Take the run's lock: one process writes a run at a time."""
        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"{self.path}: cannot write the run folder ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(f"{self.path}: another process is training this run right now") from None
            raise UsageError(f"{self.path}: cannot lock the run folder ({e.strerror or e})") from None
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        """Release the lock; a finished run keeps no lock file (any later process
        that opens it refuses the finished run, so removing it races with nothing)."""
        if self._lock_fd is not None:
            if self.finished:
                (self.path / ".lock").unlink(missing_ok=True)
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def sweep(self) -> list[Path]:
        """Delete temporary files a killed process left, in the run folder and every folder
        under it (``train/``, ``validation/``, ``checkpoints/``, ...; only under the lock)."""
        swept = []
        for p in self.path.rglob(".*.tmp-*"):
            if _TEMP.match(p.name) and p.is_file():
                p.unlink()
                swept.append(p)
        if swept:
            log.info("Removed %d temporary file(s) left by a killed process", len(swept))
        return swept

    def check_no_links(self) -> None:
        """Nothing inside the run folder is a symbolic link: a resumed run writes its checkpoints,
        logs and pictures inside its own folder, never through a link to somewhere else."""
        for path in sorted(self.path.rglob("*")):  # (rglob does not follow links into folders)
            if path.is_symlink():
                raise UsageError(f"{path}: a symbolic link; a run's files stay inside its folder (put the "
                                 f"folder or file it points to in its place)")

    def check_writable(self) -> None:
        """Fail now, with the reason, if this folder cannot take new files."""
        probe = temp_name(self.path / "probe")
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"{self.path}: cannot write the run folder ({e.strerror or e})") from None

    # -- history -------------------------------------------------------------------

    def read_history(self) -> list[dict]:
        """``history.json``: one entry per finished epoch, checked (a list of objects with
        ``epoch`` 0, 1, 2, ... and finite numbers) before it steers a resume."""
        try:
            entries = read_json(self.history, "history file")
        except FileNotFoundError:
            return []
        if not isinstance(entries, list):
            raise UsageError(f"{self.history}: expected a list of epochs, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("epoch") != i or type(entry["epoch"]) is not int:
                raise UsageError(f"{self.history}: entry {i} is not epoch {i}'s record")
            if not all(isinstance(v, (int, float)) and type(v) is not bool and math.isfinite(v)
                       for v in entry.values()):
                raise UsageError(f"{self.history}: entry {i} holds a value that is not a finite number")
        return entries

    def write_history(self, entries: list[dict]) -> None:
        write_json(self.history, entries)

    # -- resume state --------------------------------------------------------------

    def read_resume_state(self, max_epochs: int | None = None) -> ResumeState | None:
        """The last committed epoch (checked: at most ``max_epochs``), or None when no epoch
        finished. Before it steers anything, resume.json, config.json, history.json and the
        resume checkpoint must agree: the digests resume.json carries must be theirs."""
        try:
            raw = read_json(self.resume_file, "resume state")
        except FileNotFoundError:
            return None
        state = ResumeState.from_json(raw, self.resume_file, max_epochs)
        checkpoint = self.path / state.checkpoint
        try:
            checkpoint_bytes = read_regular(checkpoint, "resume checkpoint", MAX_CHECKPOINT)
        except FileNotFoundError:
            raise UsageError(f"{self.resume_file}: its checkpoint {state.checkpoint} is missing") from None
        history = self.read_history()
        if len(history) < state.epochs:
            raise UsageError(f"{self.history}: holds {len(history)} epoch(s); {self.resume_file} says "
                             f"{state.epochs} finished")
        for name, digest, want in (
                ("config.json", sha256(self._config_bytes()), state.config_sha256),
                ("history.json", json_digest(history[: state.epochs]), state.history_sha256),
                (state.checkpoint, sha256(checkpoint_bytes), state.checkpoint_sha256)):
            if digest != want:
                raise UsageError(f"{self.path / name}: not the one this run committed with epoch {state.epochs} "
                                 f"({self.resume_file}); edited, or copied from another run")
        return state

    def _config_bytes(self) -> bytes:
        try:
            return read_regular(self.config, "run config")
        except FileNotFoundError:
            raise UsageError(f"{self.path}: not a run folder (no config.json)") from None

    def commit_epoch(self, epochs: int, steps: int, keep: int, random: dict | None = None) -> ResumeState:
        """Make ``epochs`` finished epochs the state a resume starts from (its resume
        checkpoint, and the model's ``random`` generator states), with the digests that tie
        config.json, history.json and the checkpoint to it; then drop older resume
        checkpoints and the epoch checkpoints beyond the newest ``keep``."""
        checkpoint = self.resume_checkpoint(epochs)
        state = ResumeState(epochs, steps, str(checkpoint.relative_to(self.path)),
                            config_sha256=sha256(self._config_bytes()),
                            history_sha256=json_digest(self.read_history()[:epochs]),
                            checkpoint_sha256=sha256(read_regular(checkpoint, "resume checkpoint", MAX_CHECKPOINT)),
                            random=random or {})
        write_json(self.resume_file, dataclasses.asdict(state))
        for old in self.resume_checkpoints():
            if old != checkpoint:
                old.unlink()
        kept = self.epoch_checkpoints()
        for old in kept[: max(0, len(kept) - keep)]:  # (keep may exceed what there is)
            old.unlink()
        return state

    def mark_exported(self, state: ResumeState) -> None:
        write_json(self.resume_file, dataclasses.asdict(dataclasses.replace(state, exported=True)))

    def close_resume_state(self) -> None:
        """The run is finished (metrics.json exists): the resume state has done its job."""
        self.resume_file.unlink(missing_ok=True)
        for checkpoint in self.resume_checkpoints():
            checkpoint.unlink()

    def rollback(self, epochs: int, steps: int) -> None:
        """Forget what a killed process wrote after its last committed epoch.

        ``epochs`` finished epochs and ``steps`` optimizer steps stay; later history
        entries, epoch checkpoints and TensorBoard events go, so that the resumed
        run writes each epoch and step exactly once.
        """
        history = self.read_history()
        if len(history) != epochs or any(e["epoch"] >= epochs for e in history):
            self.write_history([e for e in history if e["epoch"] < epochs])
        for epoch, checkpoint in self._checkpoints("epoch") + self._checkpoints("resume"):
            if epoch > epochs:
                checkpoint.unlink()
        for events in self.path.rglob("events.out.tfevents.*"):
            if "plugins" not in events.parts and events.is_file() and not events.is_symlink():
                drop_events(events, epochs, steps)  # (a folder or link of that name is not the run's)
