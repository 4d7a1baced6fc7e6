"""What a person sees in TensorBoard: a real TensorBoard process on 127.0.0.1, asked
through its HTTP data API for the dashboards of one finished run."""

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from conftest import free_port, quick, read_summaries

from mnist_cnn import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """One short run, and TensorBoard serving its logdir: (base url, run name). Beside it,
    run "k3" trains three steps per call (--steps-per-execution 3)."""
    logs = tmp_path_factory.mktemp("tb")
    run = train.fit(quick(logs, epochs=2, steps_per_epoch=3, run_name="r1"), verbose=0)
    train.fit(quick(logs, epochs=1, steps_per_epoch=3, run_name="k3", steps_per_execution=3), verbose=0)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run.run_dir.parent), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited: {proc.stderr.read()[-2000:]}")
            try:
                if {"r1/train", "k3/train"} <= set(get(base, "/data/runs")):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("tensorboard did not list the run in 90 s")
        yield base, "r1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(base: str, path: str, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return json.loads(body) if response.headers.get_content_type() == "application/json" else body


def post(base: str, path: str, payload: dict):
    request = urllib.request.Request(base + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_dashboards_a_person_opens_are_there(board):
    base, _ = board
    plugins = get(base, "/data/plugins_listing")
    for name in ("scalars", "images", "graphs", "hparams", "histograms"):
        assert plugins[name]["enabled"], name


def test_epoch_curves_for_train_and_validation(board):
    base, run = board
    for split in ("train", "validation"):
        points = get(base, "/data/plugin/scalars/scalars", run=f"{run}/{split}", tag="epoch_loss")
        assert [step for _, step, _ in points] == [0, 1], split
    steps = get(base, "/data/plugin/scalars/scalars", run=f"{run}/train", tag="batch_loss")
    assert [step for _, step, _ in steps] == list(range(1, 7))


def test_pictures_of_validation_per_epoch_and_test_once(board):
    base, run = board
    tags = get(base, "/data/plugin/images/tags")[f"{run}/images"]
    assert {"train/samples", "validation/misclassified", "validation/confusion_matrix",
            "test/misclassified", "test/confusion_matrix"} <= set(tags)
    images = get(base, "/data/plugin/images/images", run=f"{run}/images", tag="test/confusion_matrix", sample=0)
    png = get(base, "/data/plugin/images/individualImage?" + images[0]["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_graphs_tab_shows_the_training_step(board):
    base, run = board
    info = get(base, "/data/plugin/graphs/info")
    assert "train_step" in info[f"{run}/train"]["tags"]
    graph = get(base, "/data/plugin/graphs/graph", run=f"{run}/train", tag="train_step", conceptual="false")
    text = graph.decode()
    assert "Conv2D" in text and "MaxPool" in text and "MatMul" in text  # the CNN's ops, and its training
    assert "Conv2DBackpropFilter" in text


def test_the_graphs_tab_shows_the_step_when_steps_run_several_per_call(board):
    base, _ = board
    graph = get(base, "/data/plugin/graphs/graph", run="k3/train", tag="train_step", conceptual="false").decode()
    assert "Conv2D" in graph and "Conv2DBackpropFilter" in graph and "MatMul" in graph


def test_hparams_lists_the_run_as_finished(board):
    base, run = board
    experiment = post(base, "/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"learning_rate", "batch_size", "validation_split", "recipe"} <= names
    groups = post(base, "/data/plugin/hparams/session_groups",
                  {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING",
                                                             "STATUS_UNKNOWN"],
                   "colParams": [], "startIndex": 0, "sliceSize": 10})
    sessions = {s["name"]: s for g in groups["sessionGroups"] for s in g["sessions"]}
    assert sorted(sessions) == sorted([run, "k3"]) and sessions[run]["status"] == "STATUS_SUCCESS"


def test_hparams_name_the_data_source_auto_chose(tmp_path, monkeypatch):
    """--data auto resolves to a source; the HParams dashboard shows that source, not "auto"."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    from mnist_cnn import data

    monkeypatch.setattr(data, "resolve", lambda source, data_dir=None: "sample")  # what auto picks offline
    run = train.fit(quick(tmp_path, data="auto", epochs=1, steps_per_epoch=2), verbose=0)
    assert json.loads((run.run_dir / "config.json").read_text())["data"] == "auto"
    (_, _, value), = read_summaries(run.run_dir)["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
    assert start.hparams["data"].string_value == "sample"
