"""``.keras`` files: the package's one reader and writer of them.

Keras documents the format as a zip archive holding ``config.json`` (the model's config),
``metadata.json`` and ``model.weights.h5`` (an HDF5 file of the weights). This module writes
through Keras' public ``model.save`` only, and reads the archive only through that documented
layout: ``config.json`` before Keras sees a file (so that an oversized or foreign model is
refused before anything is allocated), and the weights file as a set of arrays -- never by
Keras' internal key names -- to check that every weight was loaded.

- ``model_bytes``: a model saved by Keras, as bytes, for ``files.write_atomic``;
- ``inference_copy`` / ``save_model``: the model without its optimizer and compile config
  (what predicting, evaluating, exporting and fine-tuning need; 13 MB instead of 39);
- ``load_cnn`` / ``load_weights_strict``: loading where anything that does not fit is a
  ``ModelFileError`` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import zipfile
import zlib
from pathlib import Path

import h5py
import keras
import numpy as np

from mnist_cnn.errors import ModelFileError, StorageError
from mnist_cnn.files import temp_name, write_atomic
from mnist_cnn.model import CNN, check_build_config, check_sizes, parameter_count

MAX_CONFIG_BYTES = 1 << 20
MAX_METADATA_BYTES = 1 << 16
WEIGHTS_SLACK_BYTES = 1 << 20  # HDF5's own structures around the arrays
# what model.save writes into a .keras zip; an archive with anything else is refused before Keras
# unpacks it (Keras extracts every member)
MEMBERS = ("config.json", "metadata.json", "model.weights.h5")


# -- writing ------------------------------------------------------------------------------


def model_bytes(model: keras.Model, beside: str | os.PathLike) -> bytes:
    """``model.save``'s ``.keras`` file as bytes.

    Keras saves to a temporary name beside ``beside`` (the file the bytes are for: the same
    disk, limits and permissions), read back and removed, so that the file itself is written
    by ``write_atomic``: Keras writes in place through h5py, which leaves a truncated file on
    a kill and fails half-way on a full disk. A kill leaves at most the temporary file, which
    the next resume sweeps (``rundir.RunDir.sweep``).
    """
    beside = Path(beside)
    tmp = temp_name(beside)
    tmp = tmp.with_name(tmp.name + ".keras")  # Keras saves only to names ending in .keras
    try:
        model.save(tmp)
        return tmp.read_bytes()
    except OSError as e:
        raise StorageError(f"cannot write {beside}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def inference_copy(model: CNN) -> CNN:
    """A new, uncompiled CNN of ``model``'s config with the weights a user gets: the optimizer's
    moving average when it keeps one (``use_ema``), else the model's own. What it saves is the
    model without the optimizer's state (``keras.saving.load_model`` opens it as an uncompiled
    model, without warnings). ``model`` itself is left as it was."""
    copy = CNN.from_config(model.get_config())
    copy.build()
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.use_ema and optimizer.built:
        raw = model.get_weights()
        optimizer.finalize_variable_values(model.trainable_variables)  # the average, into the model ...
        copy.set_weights(model.get_weights())
        model.set_weights(raw)  # ... and back
    else:
        copy.set_weights(model.get_weights())
    return copy


def save_model(path: str | os.PathLike, model: CNN) -> Path:
    """A run's model file, atomically: config and weights, no optimizer state."""
    return write_atomic(path, model_bytes(inference_copy(model), path))


# -- reading ------------------------------------------------------------------------------


def _member(archive: zipfile.ZipFile, name: str, limit: int, path: Path, keep: bool = True) -> bytes:
    """A member of the archive, inflated in small pieces and counted as it inflates: refused
    past ``limit`` bytes whatever its zip header says (and on a wrong CRC, which zipfile checks
    at the end). Not kept unless ``keep``: a check costs a piece, not the member."""
    size = archive.getinfo(name).file_size
    if size > limit:
        raise ModelFileError(f"{path}: {name} is {size:,} bytes; at most {limit:,} are read")
    parts, count = [], 0
    with archive.open(name) as f:
        while part := f.read(1 << 20):  # zipfile inflates at most what is asked for
            count += len(part)
            if count > limit:
                raise ModelFileError(f"{path}: {name} inflates past {limit:,} bytes; at most {limit:,} are read")
            if keep:
                parts.append(part)
    return b"".join(parts)


def read_config(path: Path) -> dict:
    """The model config inside a ``.keras`` zip, checked to be a CNN of sane size, and the
    whole archive checked before Keras unpacks it: only the members ``model.save`` writes,
    each inflated (and counted) within the size the config allows."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            unexpected = sorted(set(names) - set(MEMBERS))
            if unexpected or len(names) != len(set(names)):
                shown = ", ".join(n[:60] for n in unexpected[:3]) or "a member twice"
                raise ModelFileError(f"{path}: the archive holds {shown}{' ...' if len(unexpected) > 3 else ''}; "
                                     f"a .keras model file holds only {', '.join(MEMBERS)}")
            saved = json.loads(_member(archive, "config.json", MAX_CONFIG_BYTES, path))
            most = _check_config(saved, path)
            if "metadata.json" in names:
                _member(archive, "metadata.json", MAX_METADATA_BYTES, path, keep=False)
            if "model.weights.h5" in names:
                _member(archive, "model.weights.h5", most, path, keep=False)
    except ModelFileError:
        raise
    except KeyError:
        raise ModelFileError(f"{path}: not a .keras model file (no config.json inside)") from None
    except (zipfile.BadZipFile, OSError, ValueError, RecursionError, EOFError, zlib.error) as e:
        raise ModelFileError(f"{path}: cannot read the model file ({type(e).__name__}: {e})"[:300]) from None
    return saved


def _check_config(saved, path: Path) -> int:
    """``saved`` (config.json) must be a CNN within the size bounds: the bytes its weights may take."""
    if not isinstance(saved, dict):
        raise ModelFileError(f"{path}: config.json is not a model config")
    name = saved.get("class_name")
    if name != "CNN" or saved.get("registered_name", "mnist_cnn>CNN") != "mnist_cnn>CNN":
        if '"Lambda"' in json.dumps(saved):
            raise ModelFileError(f"{path}: it contains Python code (a Lambda layer), refused in safe mode")
        raise ModelFileError(f"{path}: holds a {name}, not a mnist_cnn CNN")
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    try:
        check_sizes(config)
        check_build_config(saved.get("build_config"))
    except (ValueError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{path}: config.json: {e}") from None
    # the weights are float32 (an optimizer's state in a resume checkpoint at most doubles them, twice)
    return 3 * 4 * parameter_count(config) + WEIGHTS_SLACK_BYTES


def _stored_arrays(store: h5py.File, shapes: set[tuple]) -> list:
    """The datasets of an HDF5 weights file whose shape is one of ``shapes`` (read lazily:
    an array of another shape is never read)."""
    found = []
    store.visititems(lambda _, item: found.append(item) if isinstance(item, h5py.Dataset)
                     and tuple(item.shape) in shapes else None)
    return found


def _check_weights_loaded(model: keras.Model, path: Path) -> None:
    """Every weight of ``model`` equals one stored in the file (each stored array matched at
    most once): Keras skips some weights with only a warning, and a CNN with fresh random
    weights must never pass."""
    weights = [np.asarray(w) for w in model.get_weights()]
    with _stored_weights(path) as store:
        unmatched = _stored_arrays(store, {w.shape for w in weights})
        for variable, value in zip(model.weights, weights, strict=True):
            match = next((i for i, item in enumerate(unmatched) if np.array_equal(item[()], value)), None)
            if match is None:
                raise ModelFileError(f"{path}: weight {variable.path} was not loaded from the file")
            del unmatched[match]


@contextlib.contextmanager
def _stored_weights(path: Path):
    """The weights of a ``.keras`` zip (read in place: a stored member seeks, never read whole) or
    of a ``.weights.h5``, as an open ``h5py.File``; ``ModelFileError`` if it cannot be opened."""
    with contextlib.ExitStack() as stack:
        try:
            if zipfile.is_zipfile(path):
                archive = stack.enter_context(zipfile.ZipFile(path))
                store = h5py.File(stack.enter_context(archive.open("model.weights.h5")), "r")
            else:
                store = h5py.File(path, "r")
            stack.enter_context(store)
        except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise ModelFileError(f"{path}: cannot read the stored weights ({_first_line(e)})") from None
        yield store


def check_stored_shapes(path: str | os.PathLike, model: keras.Model) -> None:
    """Every array stored in ``path`` (a ``.keras`` file or ``.weights.h5``) has the shape of
    one of ``model``'s weights (or is a scalar: an optimizer's step count) and a dtype of at most
    8 bytes, read from HDF5's metadata before Keras reads a byte of data: Keras believes a
    dataset's declared shape and allocates it (a never-written chunked dataset of 2^28 floats
    keeps the file at 13 MB and costs gigabytes)."""
    path = Path(path)
    shapes = {tuple(w.shape) for w in model.weights} | {()}
    most = 4 * len(model.weights) + 16  # the weights, an optimizer's two moments and its average, scalars
    found = []
    with _stored_weights(path) as store:
        try:
            store.visititems(lambda name, item: found.append((name, item.shape, item.dtype))
                             if isinstance(item, h5py.Dataset) else None)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{path}: cannot read the stored weights ({_first_line(e)})") from None
    if len(found) > most:
        raise ModelFileError(f"{path}: {len(found):,} stored arrays; a CNN of this config has at most {most}")
    for name, shape, dtype in found:
        if tuple(shape or ()) not in shapes or dtype.kind not in "fiub" or dtype.itemsize > 8:
            raise ModelFileError(f"{path}: stored array {name[:100]} is {dtype} {tuple(shape or ())}, not one of "
                                 f"the model's weights")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_weights_strict(model: keras.Model, path: str | os.PathLike) -> None:
    """``model.load_weights(path)``, where a weight that does not match is an error (and every
    stored array's shape is checked before its data is read)."""
    check_stored_shapes(path, model)
    try:
        with warnings.catch_warnings():
            # Keras only warns when it skips the optimizer's state: a failure here
            warnings.filterwarnings("error", message=".*(Skipping variable loading|could not be loaded)")
            model.load_weights(path)
    except Exception as e:  # Keras raises ValueError, UserWarning, OSError ... for files that do not fit
        raise ModelFileError(f"{path}: cannot load the weights: {_first_line(e)}") from None


def load_cnn(path: str | os.PathLike) -> CNN:
    """Load a ``.keras`` file saved from a ``CNN``, refusing anything else.

    Before Keras sees it, the archive's config must be a CNN whose sizes are within
    ``CONFIG_BOUNDS``, and every stored array must have the shape of one of the weights that
    config builds (HDF5 metadata only, no data read); loading is always ``safe_mode=True`` (a file whose layers carry
    Python code is refused rather than executed); afterwards every weight must be
    the one stored in the file. Every failure is a ``ModelFileError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a .keras model file (expected the zip archive model.save() writes)")
    saved = read_config(path)
    empty = CNN.from_config(saved["config"])  # what the config builds: the stored shapes are checked against it
    empty.build()
    check_stored_shapes(path, empty)
    del empty
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # Keras raises ValueError, KeyError, TypeError, OSError ... for bad archives
        reason = _first_line(e)
        if "safe_mode" in str(e) or "Lambda" in str(e):
            reason = "it contains Python code (a Lambda layer), refused in safe mode"
        raise ModelFileError(f"{path}: cannot load the model: {reason}") from None
    if not isinstance(model, CNN):
        raise ModelFileError(f"{path}: holds a {type(model).__name__}, not a mnist_cnn CNN")
    _check_weights_loaded(model, path)
    return model
