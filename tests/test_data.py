import logging
import socket

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import write_folder

from mnist_cnn import data
from mnist_cnn.errors import DataError


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No prepared tfds MNIST and a download host that refuses connections."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connect() is refused at once
    monkeypatch.setattr(data, "TFDS_HOST", closed.getsockname())
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    yield
    closed.close()


def test_sample_split_is_stratified_disjoint_and_deterministic(sample):
    (x_train, y_train), (x_test, y_test) = sample
    assert x_train.shape == (4000, 28, 28) and x_test.shape == (1000, 28, 28)
    assert x_train.dtype == np.uint8 and x_train.max() == 255
    assert np.bincount(y_test).tolist() == [100] * 10
    assert np.bincount(y_train).tolist() == [400] * 10
    train_rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in train_rows for row in x_test)
    (again, _), (again_test, _) = data.sample_arrays()
    np.testing.assert_array_equal(again, x_train)
    np.testing.assert_array_equal(again_test, x_test)


def test_pipelines_scale_batch_and_shuffle_only_the_train_part(tmp_path):
    written = write_folder(tmp_path, n_train=30, n_test=7)
    datasets = data.load(str(tmp_path), batch_size=4, seed=3, validation="0")
    assert datasets.info == data.DataInfo(str(tmp_path), 30, 7)
    assert datasets.validation is datasets.test  # no validation split: the test split scores epochs
    x, y = next(iter(datasets.train))
    assert x.shape == (4, 28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0

    test_labels = np.concatenate([y.numpy() for _, y in datasets.test])
    np.testing.assert_array_equal(test_labels, written["test"][1])  # file order, never shuffled
    test_images = np.concatenate([x.numpy() for x, _ in datasets.test])[..., 0]
    np.testing.assert_allclose(test_images, written["test"][0] / 255.0, rtol=1e-6)
    assert next(iter(datasets.test))[0].shape[0] == 7  # evaluation batches: up to data.EVAL_BATCH

    def two_epochs(seed):
        loaded = data.load(str(tmp_path), batch_size=4, seed=seed, validation="0")
        assert loaded.steps_per_pass == 8  # 30 digits: 7 batches of 4 and one of 2
        first = np.concatenate([y.numpy() for _, y in loaded.train])  # an epoch: from position 0
        loaded.position.assign(8)  # as the trainer does when epoch 2 starts
        return first, np.concatenate([y.numpy() for _, y in loaded.train])

    epoch1, epoch2 = two_epochs(seed=3)
    assert sorted(epoch1) == sorted(written["train"][1])  # each epoch sees every digit once
    assert not np.array_equal(epoch1, written["train"][1])  # shuffled
    assert not np.array_equal(epoch1, epoch2)  # reshuffled per epoch
    again1, again2 = two_epochs(seed=3)  # the same seed, the same order
    np.testing.assert_array_equal(again1, epoch1)
    np.testing.assert_array_equal(again2, epoch2)
    assert not np.array_equal(two_epochs(seed=4)[0], epoch1)


def test_an_epoch_is_steps_per_epoch_batches_of_the_stream(tmp_path):
    write_folder(tmp_path, n_train=8, n_test=2)
    datasets = data.load(str(tmp_path), batch_size=4, validation="0", steps_per_epoch=5)  # past one pass
    assert len(list(datasets.train)) == 5 and int(datasets.train.cardinality()) == 5
    assert len(list(data.endless(str(tmp_path), 4).take(10))) == 10


def test_tfds_source_on_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        datasets = data.load("tfds", batch_size=5, validation="0")
        assert datasets.info == data.DataInfo("tfds", 12, 12)
        batches = list(datasets.train)
        assert [int(x.shape[0]) for x, _ in batches] == [5, 5, 2]
        x, y = batches[0]
        assert x.shape[1:] == (28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
        assert float(tf.reduce_max(x)) <= 1.0


def test_auto_falls_back_to_the_sample_offline_with_one_warning(offline, caplog):
    with caplog.at_level(logging.WARNING, logger="mnist_cnn"):
        assert data.resolve("auto") == "sample"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "download host is unreachable" in message and "--data PATH" in message


def test_auto_uses_prepared_tfds_without_asking_the_network(offline, tmp_path, caplog):
    info = tmp_path / "tfds" / "mnist" / "3.0.1" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    with caplog.at_level(logging.WARNING, logger="mnist_cnn"):
        assert data.resolve("auto") == "tfds"
    assert not caplog.records


def test_auto_uses_tfds_when_the_download_host_answers(monkeypatch, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(data, "TFDS_HOST", server.getsockname())
        monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
        assert data.resolve("auto") == "tfds"


def test_explicit_tfds_offline_fails_fast_with_a_clear_error(offline):
    with pytest.raises(DataError, match=r"tfds: cannot load mnist .* download host is unreachable"):
        data.load("tfds")


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"data source 'mnist': expected auto, tfds, sample or an existing"):
        data.resolve("mnist")
    with pytest.raises(DataError, match=r"missing train-images-idx3-ubyte"):
        data.load(str(tmp_path))  # an empty folder


def test_without_the_test_split_its_files_are_never_opened(tmp_path):
    """A tuning trial's data (with_test=False): the same training digits, and the test files not read
    (here they are not MNIST files at all); with the test split they are."""
    write_folder(tmp_path / "idx", n_train=30, n_test=5)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "idx" / name).write_bytes(b"not an IDX file")
    trial = data.load(str(tmp_path / "idx"), batch_size=10, with_test=False, validation="10")
    assert trial.info.num_test == 0 and trial.info.num_train == 20 and trial.info.num_validation == 10
    assert list(trial.test) == []
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        data.load(str(tmp_path / "idx"), batch_size=10, validation="10")
    # the sample trains on all 5,000 digits when the test split is another folder's, read or not
    elsewhere = data.load("sample", test_source=str(tmp_path / "idx"), with_test=False)
    assert elsewhere.info.num_train + elsewhere.info.num_validation == 5000 and elsewhere.info.num_test == 0


def labels_of(dataset):
    return np.concatenate([y.numpy() for _, y in dataset])


def rows_of(dataset):
    return {row.tobytes() for x, _ in dataset for row in x.numpy()}


def test_the_validation_split_is_stratified_disjoint_and_the_same_every_run():
    datasets = data.load("sample", batch_size=50, seed=0)
    assert datasets.info == data.DataInfo("sample", 3500, 1000, 500)
    assert np.bincount(labels_of(datasets.validation)).tolist() == [50] * 10  # stratified
    one_pass = datasets.train
    assert np.bincount(labels_of(one_pass)).tolist() == [350] * 10
    validation, train, test = rows_of(datasets.validation), rows_of(one_pass), rows_of(datasets.test)
    assert len(validation) == 500 and not validation & train and not validation & test and not train & test
    assert len(validation) + len(train) + len(test) == 5000  # the three partition the sample
    other_seed = data.load("sample", batch_size=50, seed=9)  # another training seed, or a resume
    assert rows_of(other_seed.validation) == validation


@pytest.mark.parametrize(
    "spec, num_train, expected",
    [("auto", 60_000, 5000), ("auto", 4000, 500), ("auto", 12, 2), ("0.1", 4000, 400), ("300", 4000, 300),
     ("0", 4000, 0)],
)
def test_validation_size(spec, num_train, expected):
    assert data.validation_size(spec, num_train) == expected


def test_a_validation_split_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(DataError, match="4,000 of 4,000 training digits leaves none to train on"):
        data.validation_size("4000", 4000)


def test_a_tfds_that_cannot_be_imported_is_one_line_naming_the_way_out(monkeypatch, tmp_path):
    """As with TensorFlow 2.16 and tensorflow-metadata built for protobuf 5 (cannot import name
    'runtime_version'): --data tfds is a DataError, not a traceback."""
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "tensorflow_datasets":
            raise ImportError("cannot import name 'runtime_version' from 'google.protobuf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(DataError, match=r"tensorflow-datasets cannot be imported here \(ImportError: cannot import "
                                        r"name 'runtime_version'.*tensorflow-metadata<1.17.*--data sample"):
        data.load("tfds", batch_size=5, data_dir=str(tmp_path))


def test_the_pipelines_functions_are_traced_without_autograph(sample, capsys):
    """Every function the pipelines hand tf.data skips AutoGraph (``data.plain``): none has Python
    control flow on tensors to convert, and converting them cost ~0.15 CPU-s of every run's start.
    With them converted, AutoGraph's log (verbosity 3, on stdout) had ~1,600 lines here."""
    (x, y), _ = sample
    tf.autograph.set_verbosity(3, alsologtostdout=True)
    try:
        batches = data.epoch_batches(x[:100], y[:100], 50, 2, tf.Variable(0, dtype=tf.int64), augment=True,
                                     elastic=True)
        evaluation = data.pipeline(x[:100], y[:100], 50)
    finally:
        tf.autograph.set_verbosity(0)
    assert capsys.readouterr().out == ""
    assert [len(b) for b, _ in batches] == [50, 50] and [len(b) for b, _ in evaluation] == [50, 50]
