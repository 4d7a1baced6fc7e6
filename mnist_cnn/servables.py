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
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2

from mnist_cnn.errors import ModelFileError
from mnist_cnn.export import export_savedmodel, version_folders
from mnist_cnn.keras_file import load_cnn
from mnist_cnn.model import IMAGE_SHAPE as IMAGE

log = logging.getLogger(__name__)

MODEL_NAME = "mnist"
SIGNATURES = {"serving_default": np.float32, "serve_uint8": np.uint8}
MAX_GRAPH_BYTES = 64 << 20  # a saved_model.pb larger than this is not ours (ours: ~0.3 MB)
POLL_SECONDS = 1.0  # TensorFlow Serving's --file_system_poll_wait_seconds default


@dataclass
class Servable:
    """One loaded version: ``run(signature, images)`` -> its outputs as arrays."""

    version: int
    path: Path
    signature_defs: dict  # name -> SignatureDef proto (every signature, as TF Serving lists them)
    functions: dict = field(default_factory=dict)  # our signatures: name -> concrete function
    owner: object = None  # the loaded SavedModel the functions' variables belong to

    def run(self, signature: str, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.functions[signature](images=tf.constant(images))
        return {name: value.numpy() for name, value in outputs.items()}

    def method_name(self, signature: str) -> str:
        return self.signature_defs[signature].method_name


def _signature_defs(folder: Path) -> dict:
    """The SignatureDefs of a SavedModel's ``serve`` graph, read from ``saved_model.pb``."""
    pb = folder / "saved_model.pb"
    size = pb.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise ModelFileError(f"{pb}: {size:,} bytes, more than the {MAX_GRAPH_BYTES:,} a model of this package has")
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(pb.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelFileError(f"{pb}: not a SavedModel ({type(e).__name__})") from None
    for graph in saved.meta_graphs:
        if "serve" in graph.meta_info_def.tags:
            return dict(graph.signature_def)
    raise ModelFileError(f"{pb}: no graph tagged 'serve'")


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
    """The SavedModel in ``folder`` as version ``version``, its signatures checked."""
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
    return Servable(version, folder, signature_defs, functions, owner=loaded)


def load_keras(path: Path) -> Servable:
    """A ``.keras`` file served as version 1: exported as the SavedModel ``mnist-cnn-export``
    writes (so it answers exactly as its export would), loaded, the temporary copy removed."""
    model = load_cnn(path)
    with tempfile.TemporaryDirectory(prefix="mnist_cnn-serve-") as folder:
        servable = load_version(export_savedmodel(model, folder, version=1), 1)
    servable.path = path
    return servable


def _stamp(folder: Path) -> tuple:
    """What changes when a version folder's files change (a failed load is retried then)."""
    try:
        pb = (folder / "saved_model.pb").stat()
        return pb.st_size, pb.st_mtime_ns, folder.stat().st_mtime_ns
    except OSError:
        return ()


class Model:
    """The versions served under one name: ``current()``, ``get(version)``, ``poll()``."""

    def __init__(self, path: str | Path, name: str = MODEL_NAME):
        self.name = name
        self.path = Path(path)
        self.base: Path | None = None  # polled for new versions
        self._served: Servable | None = None
        self._failed: dict[int, tuple] = {}  # version -> its folder's stamp when it failed to load
        self._lock = threading.Lock()  # poll() runs in a worker thread

    # -- loading --------------------------------------------------------------------------

    def load(self) -> Servable:
        """The first version to serve; ModelFileError (one line) if there is none."""
        path = self.path
        if path.is_file():
            self._served = load_keras(path)
        elif not path.is_dir():
            raise ModelFileError(f"{path}: not found")
        elif (path / "saved_model.pb").is_file():
            self._served = load_version(path, int(path.name) if path.name.isdigit() else 1)
        else:
            self.base = path
            if not version_folders(path):
                raise ModelFileError(f"{path}: neither a .keras file, a SavedModel nor a base folder of version "
                                     f"folders (<N>/saved_model.pb)")
            skipped = []
            self._served = self._newest_loadable(skipped)
            if self._served is None:
                raise ModelFileError(f"{path}: no version loads ({'; '.join(str(e) for _, e in skipped)})")
            for version, e in skipped:
                log.warning("skipping version %d: %s", version, e)
        return self._served

    def _newest_loadable(self, skipped: list, above: int = 0) -> Servable | None:
        """The newest version above ``above`` that loads; those newer that do not are added
        to ``skipped`` as (version, error)."""
        for version, folder in sorted(version_folders(self.base).items(), reverse=True):
            if version <= above:
                return None
            if self._failed.get(version) == _stamp(folder):
                continue
            try:
                return load_version(folder, version)
            except ModelFileError as e:
                self._failed[version] = _stamp(folder)
                skipped.append((version, e))
        return None

    def poll(self) -> Servable | None:
        """Load a newer complete version of a base folder, if one appeared, and serve it;
        the old version is dropped once no request holds it. Returns the new version or None."""
        if self.base is None:
            return None
        with self._lock:
            skipped = []
            newer = self._newest_loadable(skipped, above=self._served.version)
            for version, e in skipped:
                log.warning("skipping version %d: %s", version, e)
            if newer is not None:
                old, self._served = self._served, newer
                log.info("serving version %d (%s); version %d unloaded", newer.version, newer.path, old.version)
            return newer

    # -- what requests see ------------------------------------------------------------------

    def current(self) -> Servable:
        return self._served

    def get(self, version: int | None) -> Servable | None:
        served = self._served
        return served if version is None or version == served.version else None

    def status(self) -> dict:
        """TensorFlow Serving's ``GetModelStatus`` answer."""
        return {"model_version_status": [{"version": str(self._served.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

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
