"""bench.py's tools for finding where a step's time goes: the kernel floor and the levers."""

import dataclasses
import os

import pytest
from conftest import run_python

from mnist_cnn.bench import levers, measure, profile, report
from mnist_cnn.config import TrainConfig
from mnist_cnn.model import CNN


def test_the_step_kernels_carry_every_flop_of_a_training_step():
    """Forward and weight gradients of every conv and dense layer and the input gradient
    of all but the first: 3x the forward FLOPs less the first layer's input gradient."""
    model, batch = CNN(), 4
    kernels = profile.step_kernels(model, batch)
    flops = sum(f for _, f in kernels.values())
    first_conv = 2 * 5 * 5 * 1 * 32 * 28 * 28 * batch
    assert flops == 3 * measure.forward_flops(model) * batch - first_conv
    assert "conv1 backward-input" not in kernels and "conv2 backward-input" in kernels
    assert {"pool1 forward and backward", "pool2 forward and backward", "Adam update (all weights)"} <= set(kernels)
    # timed at the bench's batch, where conv2's and dense1's forward kernels take ~1-2 ms against a call's
    # ~0.1 ms: at batch 4 a loaded machine (the suite's three workers on two cores) timed them at 0 once
    floor = profile.kernel_floor(batch_size=50, rounds=2)
    assert set(floor["kernels"]) == set(kernels)
    assert all(row["ms"] >= 0 for row in floor["kernels"].values())  # tiny ones can vanish in the call's cost
    assert all(floor["kernels"][name]["ms"] > 0 for name in ("conv2 forward", "dense1 forward"))
    assert floor["ms"] == pytest.approx(sum(row["ms"] for row in floor["kernels"].values()))
    assert floor["kernels"]["conv2 forward"]["gflop_per_s"] > 0
    assert floor["kernels"]["Adam update (all weights)"]["gflop_per_s"] is None  # no FLOPs counted


def test_each_lever_runs_in_its_own_process_with_its_setting_applied_or_is_reported_unavailable():
    nchw = next(lever for lever in levers.LEVERS if lever.channels_first)
    without_onednn = dataclasses.replace(nchw, env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert "NCHW" in levers.unavailable(without_onednn)
    chosen = (levers.Lever("default"), levers.Lever("one thread", intra_threads=1, inter_threads=1,
                                                    steps_per_execution=2, env={"TF_ENABLE_ONEDNN_OPTS": "0"}),
              without_onednn)
    rows = levers.measure(rounds=1, steps=3, log=lambda _: None, batch_size=8, levers=chosen)  # 3 = 2 + 1
    ratio = rows["default"]["ms_per_step"] / rows["one thread"]["ms_per_step"]  # > 1: the lever is faster
    assert rows["one thread"]["vs_default"] == pytest.approx(ratio)
    applied = rows["one thread"]["applied"]
    assert (applied["intra_threads"], applied["inter_threads"], applied["steps_per_execution"]) == (1, 1, 2)
    assert applied["env"] == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert rows["default"]["applied"]["steps_per_execution"] == TrainConfig().steps_per_execution
    assert rows["one thread"]["ms_per_step"] > 0
    assert rows["default"]["applied"]["data_format"] == "channels_last"
    # a lever this CPU cannot run is a row that says why, not a failure
    assert rows[nchw.name] == {"unavailable": levers.unavailable(without_onednn)}
    text = "\n".join(levers.lines(rows, default_onednn=False))
    assert f"not on this CPU: {levers.unavailable(without_onednn)}" in text
    assert "the default runs with oneDNN off" in text


def test_a_failing_lever_names_itself_and_the_workers_error():
    bad = levers.Lever("bad XLA flag", jit=True, env={"XLA_FLAGS": "--xla_no_such_flag"})
    with pytest.raises(RuntimeError, match="lever 'bad XLA flag': the worker failed: .*xla_no_such_flag"):
        levers.measure(rounds=1, steps=2, log=lambda _: None, batch_size=8, levers=(bad,))


def test_the_report_places_the_floor_against_the_ceiling_and_model_fit():
    floor = {"batch_size": 50, "call_ms": 0.2, "ms": 20.0,
             "kernels": {"conv2 forward": {"ms": 3.0, "gflop_per_s": 330.0}, "Adam update (all weights)":
                         {"ms": 17.0, "gflop_per_s": None}}}
    results = {"forward_mflop": 20.0, "peak": {"float32": 300.0}, "kernel_floor": floor,
               "training": {50: {"model.fit [FusedAdam]": {"ms_per_step": 25.0}}},
               "levers": {"default": {"ms_per_step": 25.0, "vs_default": 1.0, "spread_pct": 3.0}}}
    text = "\n".join(report.where_time_goes(results))
    # 3 x 20 MFLOP x 50 = 3 GFLOP in 20 ms = 150 GFLOP/s = 50 % of 300; 20 of model.fit's 25 ms in kernels
    assert "sum: 20.0 ms a step = 150 GFLOP/s = 50% of the float32 ceiling at most; model.fit takes 25.0 ms (80%" \
        in text
    assert "conv2 forward" in text and "330 GFLOP/s" in text
    assert text.count("GFLOP/s") == 2  # the kernel with none shows no speed
    assert "default" in text and "1.00x" in text


CHANNELS_FIRST = """
import keras, numpy as np

from mnist_cnn.bench import lever_worker, levers
from mnist_cnn.model import CNN
lever, params = next(lever for lever in levers.LEVERS if lever.channels_first), CNN().count_params()
model = lever_worker.build(lever)
convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
assert [c.data_format for c in convs] == ["channels_first"] * 2
assert model.count_params() == params
assert model.predict(np.zeros((3, 28, 28, 1), "float32"), verbose=0).shape == (3, 10)
print("NCHW OK")
"""


def test_the_channels_first_lever_is_the_same_network_on_nchw_tensors():
    """Run where it can run: TensorFlow's CPU convolutions take NCHW only with oneDNN on."""
    proc = run_python(CHANNELS_FIRST, env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}, lean=True)
    assert proc.stdout.split() == ["NCHW", "OK"], proc.stderr[-2000:]


def test_the_levers_measure_onednn_both_ways_whatever_the_default():
    onednn = {lever.env.get("TF_ENABLE_ONEDNN_OPTS") for lever in levers.LEVERS if not lever.jit}
    assert {"0", "1"} <= onednn


def test_the_serving_load_test_reports_errors_latency_and_memory(tmp_path):
    from mnist_cnn import export, train
    from mnist_cnn.bench import serving
    from mnist_cnn.keras_file import load_cnn

    run = train.fit(train.TrainConfig(data="sample", epochs=1, steps_per_epoch=2, logdir=str(tmp_path)), verbose=0)
    model_dir = export.export_savedmodel(load_cnn(run.model_path), tmp_path / "served")
    result = serving.load_test(model_dir, clients=2, requests=3, idle=5, trickling=2, trickle_every=0.5,
                               batch_clients=2, batch_requests=1, stalled=5, silent=20)
    single, batch, bombs = result["single"], result["batch"], result["bombs"]
    assert (single["requests"], single["errors"], batch["requests"], batch["errors"]) == (6, 0, 2, 0)
    assert 0 < single["median_ms"] <= single["p99_ms"] and single["peak_mb"] > 50
    assert bombs["statuses"] == [400] * 4 and max(bombs["bytes"]) < 400_000
    assert result["jpeg_bombs"]["statuses"] == [400] * 4 and min(result["jpeg_bombs"]["bytes"]) < 1100
    assert (result["stalled"]["requests"], result["stalled"]["errors"], result["stalled"]["stalled"]) == (3, 0, 5)
    assert (result["flood"]["requests"], result["flood"]["errors"], result["flood"]["opened"]) == (3, 0, 20)
    result["batching"] = gain = serving.batching_gain(model_dir, n=4, rounds=2)
    assert gain["images"] == 4 and gain["one_by_one_ms"] > 0 and gain["batched_ms"] > 0
    text = report.serving_lines(result)
    assert "2 clients x 3 requests of 1 image, with 5 idle and 2 trickling connections open: 0 errors" in text
    assert "2 clients x 1 requests of 256 images: 0 errors" in text
    assert "4 image bombs at once (" in text and "statuses [400, 400, 400, 400]" in text
    assert "3 gRPC Predicts of 1 image while 5 stalled gRPC calls are held: 0 errors" in text
    assert "3 predicts of 1 image among 20 silent sockets that reconnect when closed" in text


def test_versus_trains_a_config_file_against_a_recipe_seed_for_seed(tmp_path):
    """bench.py --versus best.json: each contender's options, seeds 0, 1, ..., the test split the one given
    (here the sample's own); the rows in the report are named by contender."""
    tiny = {"epochs": 1, "steps_per_epoch": 2, "validation_split": "100"}
    contenders = {"--recipe tutorial": {"recipe": "tutorial", **tiny},
                  "--config best.json": {**tiny, "dropout": 0.5, "logdir": "elsewhere", "run_name": "trial-0003"}}
    logged = []
    results = {"accuracy": measure.accuracy(2, None, logged.append, contenders)}
    runs = results["accuracy"]["recipes"]
    assert list(runs) == list(contenders) and all(len(r) == 2 for r in runs.values())
    assert "fast_vs_tutorial" not in results["accuracy"]
    assert [r["epochs"] for r in runs["--config best.json"]] == [1, 1] and logged[1].startswith("  round 1: --config")
    lines = report.accuracy_lines(results)
    assert lines[1].startswith("  --recipe tutorial ") and lines[2].startswith("  --config best.json ")
    assert not (tmp_path / "elsewhere").exists() and not os.path.exists("elsewhere")


def test_the_pytorch_peer_is_the_same_cnn_or_says_in_one_line_why_it_is_left_out(monkeypatch, tmp_path):
    from mnist_cnn.bench import torch_peer

    if torch_peer.unavailable() is None:  # torch installed ([compare]): the same network, and it runs
        code = (f"import runpy; peer = runpy.run_path({torch_peer.__file__!r}); "  # (never beside TensorFlow)
                "print(sum(p.numel() for p in peer['model']().parameters()))")
        assert run_python(code).stdout.split()[-1] == str(CNN().count_params()) == "3274634"
        (images, labels), _, _ = measure.data.load_arrays("sample", with_test=False)
        per_step = torch_peer.measure(images[:500], labels[:500], 50, rounds=2, steps=3)
        assert len(per_step) == 2 and all(0 < s < 60 for s in per_step)
    (tmp_path / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the probe's interpreter finds no torch, as where it is absent
    reason = torch_peer.unavailable()
    assert reason == ("PyTorch contender left out: torch cannot be imported (ModuleNotFoundError: No module named "
                      "'torch'); pip install '.[compare]'")
    row = {"contender": "x", "optimizer": "x", "images_per_s": 1, "vs_notebook": 1, "gflop_per_s": 1, "spread_pct": 0}
    rows = {report.FIT_ROW: {**row, "ms_per_step": 20.0}, report.TORCH_ROW: {**row, "ms_per_step": 33.0}}
    evaluation = {"images": 1, "seconds": {"model.evaluate": 1, "tutorial batch-wise predict": 1}, "speedup": 1}
    lines = report.report({"forward_mflop": 1.0, "training": {50: rows}, "torch": reason, "evaluation": evaluation})
    assert "model.fit [FusedAdam] against PyTorch (the same CNN, Adam, batch, threads): 1.65x its speed" in lines
    assert f"  ({reason})" in lines
