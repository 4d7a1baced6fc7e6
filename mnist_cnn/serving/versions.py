"""What ``mnist-cnn-serve`` serves: versions of the model, loaded, checked and swapped as
TensorFlow Serving does it.

- A ``.keras`` file is exported to a SavedModel (in a temporary folder) and served as
  version 1; a SavedModel version folder is served as its number.
- A base folder of version folders (``exported/1``, ``exported/2`` ...) is polled every
  ``poll_seconds`` (TensorFlow Serving's ``--file_system_poll_wait_seconds``, default 1):
  the newest version that loads is served; when a newer one appears and loads, it serves
  and the old one is unloaded. A broken or half-written version folder is skipped with one
  log line (and tried again only when its files change).
- A signature must take ``images`` ``[N, 28, 28, 1]`` (float32 for ``serving_default``,
  uint8 for ``serve_uint8``) and give ``probabilities`` ``[N, 10]``: anything else is
  refused when the version loads, never at the first request.
- ``metadata()`` is TensorFlow Serving's ``GetModelMetadata`` answer: every SignatureDef of
  the SavedModel as TensorInfo JSON, read from its ``saved_model.pb``.
"""

from __future__ import annotations

import inspect
import logging
import os
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2

from mnist_cnn import warmup
from mnist_cnn.errors import ModelFileError, UsageError
from mnist_cnn.export import export_savedmodel, version_folders
from mnist_cnn.files import read_regular
from mnist_cnn.keras_file import load_cnn
from mnist_cnn.model import IMAGE_SHAPE as IMAGE

log = logging.getLogger(__name__)

MODEL_NAME = "mnist"
SIGNATURES = {"serving_default": np.float32, "serve_uint8": np.uint8}
MAX_GRAPH_BYTES = 64 << 20  # a saved_model.pb larger than this is not ours (ours: ~0.3 MB)
MAX_VERSION_BYTES = 256 << 20  # a version folder's files in all (ours: ~13 MB)
MAX_FOLDER_ENTRIES = 1000  # files and folders in a version folder (ours: 6)
WARM_IMAGES = 256  # images in one warm-up request
POLL_SECONDS = 1.0  # TensorFlow Serving's --file_system_poll_wait_seconds default


@dataclass
class Servable:
    """One loaded version: ``run(signature, images)`` -> its outputs as arrays."""

    version: int
    path: Path
    signature_defs: dict  # name -> SignatureDef proto (every signature, as TF Serving lists them)
    functions: dict = field(default_factory=dict)  # our signatures: name -> concrete function
    owner: object = None  # the loaded SavedModel the functions' variables belong to
    warm_requests: list | None = None  # its assets.extra/tf_serving_warmup_requests, if it has them

    def run(self, signature: str, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.functions[signature](images=tf.constant(images))
        return {name: value.numpy() for name, value in outputs.items()}

    def warm_up(self) -> int:
        """Replay the version's warm-up requests (TensorFlow Serving's file), or a request of one
        image and one of eight through each signature when it has none; the number replayed. A
        request of the file that does not fit the model fails the version (as TF Serving fails it)."""
        own = self.warm_requests is not None
        replayed = 0
        for signature, inputs in (self.warm_requests if own else
                                  [(name, {"images": x}) for name, x in warmup.requests()]):
            images = inputs.get("images")
            fits = (signature in self.functions and set(inputs) == {"images"} and images.ndim == 4
                    and images.shape[1:] == IMAGE and 1 <= len(images) <= WARM_IMAGES
                    and images.dtype == SIGNATURES[signature])
            if not fits:
                if own:
                    raise ModelFileError(f"{self.path}: a warm-up request for {signature[:60]!r} does not fit the "
                                         f"model (inputs {sorted(inputs)[:3]})")
                continue
            self.run(signature, images)
            replayed += 1
        return replayed

    def method_name(self, signature: str) -> str:
        return self.signature_defs[signature].method_name


def _signature_defs(folder: Path) -> dict:
    """The SignatureDefs of a SavedModel's ``serve`` graph, read from ``saved_model.pb`` (a
    regular file of at most ``MAX_GRAPH_BYTES``, counted as it is read)."""
    pb = folder / "saved_model.pb"
    try:
        data = read_regular(pb, "SavedModel graph (saved_model.pb)", MAX_GRAPH_BYTES)
    except FileNotFoundError:
        raise ModelFileError(f"{pb}: not found") from None
    except UsageError as e:
        raise ModelFileError(str(e)) from None
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelFileError(f"{pb}: not a SavedModel ({type(e).__name__})") from None
    for graph in saved.meta_graphs:
        if "serve" in graph.meta_info_def.tags:
            return dict(graph.signature_def)
    raise ModelFileError(f"{pb}: no graph tagged 'serve'")


def scan_folder(folder: Path) -> tuple[tuple, str | None]:
    """A version folder's files, looked at (``lstat``) before TensorFlow opens any: (stamp,
    problem). The stamp lists every entry as (path, kind, size, mtime): it changes whenever a
    file is added, removed or rewritten, and a version that failed is tried again only then.
    The problem (None if there is none) is the first thing that is not a SavedModel of this
    package: anything but real folders and regular files (a symbolic link -- so nothing outside
    the folder --, a FIFO, a device or a socket), more than ``MAX_FOLDER_ENTRIES`` entries or
    ``MAX_VERSION_BYTES`` in all, or no ``saved_model.pb`` and ``variables/variables.index``."""
    entries, problems, total, pending = [], [], 0, [(folder, 0)]
    while pending and len(entries) <= MAX_FOLDER_ENTRIES:
        current, depth = pending.pop()
        try:
            listing = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            problems.append(f"{current}: cannot list the folder ({e.strerror or e})")
            continue
        for entry in listing[:MAX_FOLDER_ENTRIES + 1]:
            path = Path(entry.path)
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError as e:
                problems.append(f"{path}: {e.strerror or e}")
                continue
            kind = stat.S_IFMT(info.st_mode)
            entries.append((str(path.relative_to(folder)), kind, info.st_size, info.st_mtime_ns))
            if kind == stat.S_IFDIR and depth < 3:
                pending.append((path, depth + 1))
            elif kind != stat.S_IFREG:
                what = "a symbolic link" if kind == stat.S_IFLNK else "not a regular file or folder"
                problems.append(f"{path}: {what}; a version folder holds only its own files")
            else:
                total += info.st_size
    names = {name for name, *_ in entries}
    missing = [name for name in ("saved_model.pb", os.path.join("variables", "variables.index")) if name not in names]
    if len(entries) > MAX_FOLDER_ENTRIES:
        problems.insert(0, f"{folder}: more than {MAX_FOLDER_ENTRIES} files; not a SavedModel of this package")
    if total > MAX_VERSION_BYTES:
        problems.append(f"{folder}: {total:,} bytes, more than the {MAX_VERSION_BYTES:,} a model of this package has")
    if missing:
        problems.append(f"{folder}: no {missing[0]} (an empty or half-written version folder)")
    return tuple(entries), (problems[0] if problems else None)


def _check_signature(path: Path, name: str, function, dtype) -> None:
    """A signature must take ``images`` (None, 28, 28, 1) of ``dtype`` and give probabilities (None, 10)."""
    inputs = function.structured_input_signature[1]
    spec = inputs.get("images")
    if set(inputs) != {"images"} or spec.dtype != tf.as_dtype(dtype) or spec.shape.as_list() != [None, *IMAGE]:
        shown = {k: f"{v.dtype.name}{v.shape.as_list()}" for k, v in inputs.items()}
        raise ModelFileError(f"{path}: signature {name} takes {shown}, not images {tf.as_dtype(dtype).name}"
                             f"[None, 28, 28, 1]")
    outputs = function.structured_outputs
    probabilities = outputs.get("probabilities") if isinstance(outputs, dict) else None
    if (probabilities is None or probabilities.shape.as_list() != [None, 10]
            or set(outputs) - {"probabilities", "digits"}):
        raise ModelFileError(f"{path}: signature {name} must give probabilities [None, 10] (and digits), "
                             f"gives {sorted(outputs) if isinstance(outputs, dict) else outputs}")


def load_version(folder: Path, version: int) -> Servable:
    """The SavedModel in ``folder`` as version ``version``, its files and signatures checked."""
    _, problem = scan_folder(folder)
    if problem:
        raise ModelFileError(problem)
    signature_defs = _signature_defs(folder)
    try:
        loaded = tf.saved_model.load(str(folder))
    except (OSError, ValueError, RuntimeError, tf.errors.OpError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelFileError(f"{folder}: cannot load the SavedModel ({first})") from None
    if "serving_default" not in loaded.signatures:
        raise ModelFileError(f"{folder}: the SavedModel has no serving_default signature")
    functions = {}
    for name, dtype in SIGNATURES.items():
        if name in loaded.signatures:
            _check_signature(folder, name, loaded.signatures[name], dtype)
            functions[name] = loaded.signatures[name]
    return Servable(version, folder, signature_defs, functions, owner=loaded, warm_requests=warmup.read(folder))


def load_keras(path: Path) -> Servable:
    """A ``.keras`` file served as version 1: exported as the SavedModel ``mnist-cnn-export``
    writes (so it answers exactly as its export would), loaded, the temporary copy removed."""
    model = load_cnn(path)
    with tempfile.TemporaryDirectory(prefix="mnist_cnn-serve-") as folder:
        servable = load_version(export_savedmodel(model, folder, version=1), 1)
    servable.path = path
    return servable


def versions_of(base: Path) -> dict[int, Path]:
    """``export.version_folders`` of a base folder that must be there (``ModelFileError`` otherwise)."""
    try:
        return version_folders(base, missing_ok=False)
    except OSError as e:
        raise ModelFileError(f"{base}: cannot list the base folder ({e.strerror or e})") from None


KEPT_ENDED = 4  # unloaded versions still reported (state END)


class Model:
    """The versions served under one name: ``current()``, ``get(version)``, ``poll()``, and each
    version's state as TensorFlow Serving reports it (``states``: LOADING while it loads and warms
    up, AVAILABLE while it serves, UNLOADING during a drain, END once unloaded). ``warm`` turns
    true once the first version has replayed its warm-up requests (``warm_up``)."""

    def __init__(self, path: str | Path, name: str = MODEL_NAME):
        self.name = name
        self.path = Path(path)
        self.base: Path | None = None  # polled for new versions
        self.states: dict[int, str] = {}
        self.warm = False
        self._served: Servable | None = None
        self._failed: dict[int, tuple] = {}  # version -> its folder's stamp when it failed to load
        self._poll_problem: str | None = None  # the base folder's last problem, logged once
        self._lock = threading.Lock()  # poll() runs in a worker thread

    # -- loading --------------------------------------------------------------------------

    def load(self) -> Servable:
        """The first version to serve; ModelFileError (one line) if there is none."""
        path = self.path
        if path.is_file():
            self._served = load_keras(path)
        elif not path.is_dir():
            raise ModelFileError(f"{path}: not found")
        elif (path / "saved_model.pb").exists() or (path / "saved_model.pb").is_symlink():
            self._served = load_version(path, int(path.name) if path.name.isdigit() and len(path.name) <= 19 else 1)
        else:
            self.base = path
            if not versions_of(path):
                raise ModelFileError(f"{path}: neither a .keras file, a SavedModel nor a base folder of version "
                                     f"folders (<N>/saved_model.pb)")
            skipped = []
            self._served = self._newest_loadable(skipped)
            if self._served is None:
                raise ModelFileError(f"{path}: no version loads ({'; '.join(m for _, m in skipped)[:2000]})")
            for version, message in skipped:
                log.warning("skipping version %d: %s", version, message)
        self.states[self._served.version] = "LOADING"
        return self._served

    def warm_up(self) -> int:
        """Warm the first version up (``Servable.warm_up``): the number of requests replayed. It turns
        AVAILABLE with ``ready_up``, which the server calls on its event loop once every face says so."""
        return self._served.warm_up()

    def ready_up(self) -> None:
        self.states[self._served.version] = "AVAILABLE"
        self.warm = True

    def _newest_loadable(self, skipped: list, above: int = 0, warm: bool = False) -> Servable | None:
        """The newest version above ``above`` that loads (and, with ``warm``, warms up). One that
        does not is added to ``skipped`` as (version, why), and tried again only when its folder
        changes."""
        for version, folder in sorted(versions_of(self.base).items(), reverse=True):
            if version <= above:
                return None
            if folder.is_symlink():
                stamp, problem = ("link", str(folder.readlink())), (
                    f"{folder}: a symbolic link; version folders must be real folders inside {self.base}")
            else:
                stamp, problem = scan_folder(folder)
            if self._failed.get(version) == stamp:
                continue
            try:
                if problem:
                    raise ModelFileError(problem)
                servable = load_version(folder, version)
                if warm:
                    self.states[version] = "LOADING"
                    servable.warm_up()
                return servable
            except Exception as e:  # whatever a folder holds, the next version is still looked at
                message = str(e) if isinstance(e, ModelFileError) else f"{folder}: {type(e).__name__}: {e}"[:300]
                self._failed[version] = stamp
                self.states.pop(version, None)
                skipped.append((version, message))
        return None

    def poll(self) -> Servable | None:
        """Load a newer complete version of a base folder, if one appeared, and serve it;
        the old version is dropped once no request holds it. Returns the new version or None.
        Never raises: a base folder that cannot be read is one log line (once per problem)."""
        if self.base is None:
            return None
        with self._lock:
            skipped = []
            try:
                newer = self._newest_loadable(skipped, above=self._served.version, warm=True)
                self._poll_problem = None
            except Exception as e:
                message = str(e) if isinstance(e, ModelFileError) else f"{type(e).__name__}: {e}"[:300]
                if message != self._poll_problem:
                    log.warning("cannot poll %s: %s", self.base, message)
                self._poll_problem = message
                return None
            finally:
                for version, message in skipped:
                    log.warning("skipping version %d: %s", version, message)
            if newer is not None:
                old, self._served = self._served, newer
                self.states[newer.version], self.states[old.version] = "AVAILABLE", "END"
                ended = [v for v, state in self.states.items() if state == "END"]
                for version in sorted(ended)[:-KEPT_ENDED]:
                    del self.states[version]
                log.info("serving version %d (%s); version %d unloaded", newer.version, newer.path, old.version)
            return newer

    # -- what requests see ------------------------------------------------------------------

    def current(self) -> Servable:
        return self._served

    def get(self, version: int | None) -> Servable | None:
        served = self._served
        return served if version is None or version == served.version else None

    def status(self, version: int | None = None) -> dict:
        """TensorFlow Serving's ``GetModelStatus`` answer: every version it knows, newest first (or
        ``version`` alone)."""
        return {"model_version_status": [
            {"version": str(v), "state": state, "status": {"error_code": "OK", "error_message": ""}}
            for v, state in sorted(self.states.items(), reverse=True) if version is None or v == version]}

    def metadata(self, servable: Servable) -> dict:
        """TensorFlow Serving's ``GetModelMetadata`` answer (REST): every SignatureDef as its JSON."""
        return {"model_spec": {"name": self.name, "signature_name": "", "version": str(servable.version)},
                "metadata": {"signature_def": {"signature_def": {
                    name: signature_json(signature) for name, signature in sorted(servable.signature_defs.items())}}}}


def signature_json(signature) -> dict:
    """A SignatureDef as TensorFlow Serving prints it (proto3 JSON, field names as in the
    proto, fields at their defaults printed too)."""
    return json_format.MessageToDict(signature, preserving_proto_field_name=True,
                                     **{_PRINT_DEFAULTS: True})


def _print_defaults_argument() -> str:
    """protobuf renamed ``including_default_value_fields`` in 5.26."""
    names = inspect.signature(json_format.MessageToDict).parameters
    return "always_print_fields_with_no_presence" if "always_print_fields_with_no_presence" in names \
        else "including_default_value_fields"


_PRINT_DEFAULTS = _print_defaults_argument()
