"""A run's TensorBoard event files: which tags are indexed by step or written once, and the events
a resume drops (``RunDir.rollback``: what a killed process wrote past its last committed epoch)."""

from __future__ import annotations

from pathlib import Path

from mnist_cnn.errors import StorageError
from mnist_cnn.files import temp_name, write_atomic

# TensorBoard tags indexed by optimizer step (everything else is indexed by epoch) ...
STEP_TAG_PREFIX = "batch_"
# ... and the ones written once, by the run's first process only.
SAMPLES_TAG = "train/samples"
ONCE_TAGS = (SAMPLES_TAG, "_hparams_/session_start_info")
SESSION_END_TAG = "_hparams_/session_end_info"


def drop_events(path: Path, epochs: int, steps: int) -> None:
    """Rewrite one TensorBoard event file without the events past the committed epoch/step."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    kept, dropped = [], 0
    try:
        for record in tf.data.TFRecordDataset(str(path), buffer_size=1 << 18):  # (unset, TF logs a line)
            raw = record.numpy()
            event = event_pb2.Event.FromString(raw)
            if event.HasField("summary") and not _keep(event, epochs, steps):
                dropped += 1
            else:
                kept.append(raw)
    except tf.errors.DataLossError:  # the killed process's last record was cut short
        dropped += 1
    if not dropped:
        return
    tmp = temp_name(path)  # TFRecordWriter frames the records; write_atomic puts them in place
    try:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for raw in kept:
                writer.write(raw)
        payload = tmp.read_bytes()
    except (OSError, tf.errors.OpError) as e:
        message = e.strerror if isinstance(e, OSError) else e.message.replace(str(tmp), "")
        reason = " ".join(str(message).split()).strip("; ")[:200]
        raise StorageError(f"cannot write {path}: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(path, payload)


def _keep(event, epochs: int, steps: int) -> bool:
    tags = [value.tag for value in event.summary.value]
    if SESSION_END_TAG in tags:
        return False  # the resumed process ends the session anew
    if any(tag in ONCE_TAGS for tag in tags):
        return True
    if any(tag.startswith(STEP_TAG_PREFIX) for tag in tags):
        return event.step <= steps
    return event.step < epochs
