"""Training options beyond the tutorial: precision, XLA, augmentation, schedule, dropout, recipes."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import quick, read_summaries, write_folder

from mnist_cnn import CNN, augment, cpu, data, train
from mnist_cnn.bench import measure, profile, report
from mnist_cnn.cli import fit as fit_cli
from mnist_cnn.config import TrainConfig
from mnist_cnn.errors import UsageError


def losses_of(model, x, y, epochs=3):
    return model.fit(x, y, batch_size=50, epochs=epochs, verbose=0, shuffle=False).history["loss"]


def test_mixed_precision_trains_like_float32_and_keeps_float32_weights(tiny):
    x, y = tiny
    blocked = cpu.bfloat16_blocked()
    if blocked:  # ONEDNN_MAX_CPU_ISA below bfloat16 on a bfloat16 CPU (how the suite stands in for AVX2 CPUs)
        with pytest.raises(UsageError, match=re.escape(f"--mixed-precision: {blocked}")):
            train.build_model(TrainConfig(mixed_precision=True), steps_per_epoch=4)
        return
    results = {}
    for mixed in (False, True):
        keras.utils.set_random_seed(0)
        model = train.build_model(TrainConfig(mixed_precision=mixed), steps_per_epoch=4)
        results[mixed] = losses_of(model, x, y)
        assert all(w.dtype == "float32" for w in model.weights)
        assert model(x[:2]).dtype == "float32"  # the softmax stays float32
        assert model.conv1.compute_dtype == ("bfloat16" if mixed else "float32")  # CPU policy
    assert results[True][-1] < 0.7 * results[True][0]
    assert results[True][-1] == pytest.approx(results[False][-1], rel=0.15)


def test_float16_loss_scaling_keeps_updates_full_size(tiny):
    """Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer; gradient_step
    must scale the loss, or apply() would shrink every SGD update by the scale (32768)."""
    x, y = tiny
    deltas = {}
    for policy in ("float32", "mixed_float16"):
        keras.utils.set_random_seed(0)
        model = CNN(dense_units=64, dtype=policy)
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        model.build()
        before = model.dense2.kernel.numpy().copy()
        model.fit(x[:50], y[:50], batch_size=50, epochs=1, verbose=0)
        deltas[policy] = np.abs(model.dense2.kernel.numpy() - before).mean()
        assert model.dense2.kernel.dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert deltas["mixed_float16"] == pytest.approx(deltas["float32"], rel=0.1)


def test_xla_compiled_fit_trains(tiny):
    x, y = tiny
    model = train.build_model(TrainConfig(jit_compile="on"), steps_per_epoch=4)
    assert model.jit_compile is True
    losses = losses_of(model, x, y, epochs=2)
    assert losses[-1] < losses[0]


def test_augmentation_changes_training_images_only(tmp_path):
    write_folder(tmp_path, n_train=20, n_test=5)
    plain = data.load(str(tmp_path), batch_size=20, seed=1)
    augmented = data.load(str(tmp_path), batch_size=20, seed=1, augment=True)
    (x0, y0), (x1, y1) = next(iter(plain.train)), next(iter(augmented.train))
    np.testing.assert_array_equal(y0, y1)  # same shuffle, same labels
    assert x1.shape == x0.shape and x1.dtype == tf.float32
    assert float(tf.reduce_min(x1)) >= 0.0 and float(tf.reduce_max(x1)) <= 1.0 + 1e-6
    assert float(tf.reduce_mean(tf.abs(x1 - x0))) > 0.01
    for (a, _), (b, _) in zip(plain.test, augmented.test, strict=True):
        np.testing.assert_array_equal(a, b)


def test_augmented_digits_stay_recognisable(exported_run, sample):
    """The transforms are small: a model trained on clean digits (the shared run: 0.97 of these 500
    clean, 0.78 augmented on 2026-12-06) still reads augmented ones."""
    (x_train, y_train), _ = sample
    model = keras.saving.load_model(exported_run.model_path)
    x = x_train[..., None].astype("float32") / 255.0
    images = tf.convert_to_tensor(x[:500])
    shifted = augment.augment_batch(images, seed=tf.constant([3, 0], tf.int64))
    clean_acc = (model.predict(images, verbose=0).argmax(1) == y_train[:500]).mean()
    aug_acc = (model.predict(shifted, verbose=0).argmax(1) == y_train[:500]).mean()
    assert clean_acc > 0.9 and aug_acc > 0.6  # broken transforms (huge angles, reflections) fall near chance
    moved = np.abs(shifted.numpy() - images.numpy()).mean(axis=(1, 2, 3))
    assert (moved > 0.01).mean() > 0.9  # nearly every digit was moved, rotated or zoomed


def test_augmentation_strengths_set_how_far_digits_move(sample):
    """--augment-rotation/-shift/-zoom: at 0 the transform is the identity (bilinear sampling at whole
    pixels), and a stronger setting moves the digits further than the default."""
    (x_train, _), _ = sample
    images = tf.convert_to_tensor(x_train[:64, ..., None].astype("float32") / 255.0)
    seed = tf.constant([3, 0], tf.int64)
    still = augment.augment_batch(images, seed, augment.Strengths(rotation=0, shift=0, zoom=0))
    np.testing.assert_allclose(still.numpy(), images.numpy(), atol=1e-5)

    def moved(strengths):
        return float(tf.reduce_mean(tf.abs(augment.augment_batch(images, seed, strengths) - images)))

    assert moved(augment.Strengths(rotation=30, shift=0.2, zoom=0.3)) > 1.3 * moved(augment.Strengths())
    config = TrainConfig(augment=True, augment_rotation=0.0, augment_shift=0.0, augment_zoom=0.0, data="sample")
    datasets = train.load_data(config, 20)
    x, _ = next(iter(datasets.train))
    plain = train.load_data(TrainConfig(data="sample"), 20)
    np.testing.assert_allclose(x.numpy(), next(iter(plain.train))[0].numpy(), atol=1e-5)


def test_cosine_schedule_decays_to_zero():
    model = train.build_model(TrainConfig(lr_schedule="cosine", epochs=2), steps_per_epoch=10)
    schedule = model.optimizer.learning_rate
    lr = model.optimizer._learning_rate
    assert float(lr(0)) == pytest.approx(1e-3) and float(lr(10)) == pytest.approx(5e-4, rel=1e-3)
    assert float(lr(20)) == pytest.approx(0.0, abs=1e-9)
    assert float(schedule) == pytest.approx(1e-3)


def test_dropout_is_a_constructor_argument_active_only_in_training(tiny):
    x, _ = tiny
    model = CNN(dropout=0.5)
    model.build()
    assert model.count_params() == 3_274_634  # dropout adds no weights
    assert CNN.from_config(model.get_config()).dropout == 0.5
    np.testing.assert_array_equal(model(x[:4], training=False), model(x[:4], training=False))
    assert not np.allclose(model(x[:4], training=True), model(x[:4], training=False))
    assert CNN().drop is None  # the tutorial's CNN has none


def test_recipes_set_defaults_that_flags_override():
    best, _ = fit_cli.parse_args(["--recipe", "best"])
    assert (best.epochs, best.augment, best.lr_schedule, best.dropout) == (120, True, "cosine", 0.5)
    assert (best.augment_rotation, best.augment_shift, best.augment_zoom, best.label_smoothing) == (15, 0.15, 0.15, 0.1)
    custom, _ = fit_cli.parse_args(["--recipe", "best", "--epochs", "3", "--no-augment", "--dropout", "0.2",
                                    "--label-smoothing", "0"])
    assert (custom.epochs, custom.augment, custom.lr_schedule, custom.dropout) == (3, False, "cosine", 0.2)
    assert (custom.augment_rotation, custom.label_smoothing) == (15, 0.0)
    seed, _ = fit_cli.parse_args([])
    assert seed == TrainConfig()


def test_options_reach_the_saved_run(tmp_path):
    mixed = cpu.bfloat16_blocked() is None  # (where bfloat16 cannot run, that is tested above and below)
    config = quick(tmp_path, epochs=1, augment=True, lr_schedule="cosine", dropout=0.3, mixed_precision=mixed)
    result = train.fit(config, verbose=0)
    model = keras.saving.load_model(result.model_path)
    assert model.dropout == 0.3 and model.dtype_policy.name == ("mixed_bfloat16" if mixed else "float32")
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert (saved["augment"], saved["lr_schedule"], saved["mixed_precision"]) == (True, "cosine", mixed)


def test_mixed_precision_where_onednn_is_capped_below_bfloat16_is_one_line_before_any_run(tmp_path, monkeypatch,
                                                                                         capsys):
    """A bfloat16 CPU with oneDNN capped at AVX2: TensorFlow would send bfloat16 convolutions to oneDNN,
    which has none, and stop with "could not create a primitive descriptor" mid-run."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}))
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    code = fit_cli.main(["--dry-run", "--data", "sample", "--mixed-precision", "--logdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err == ("fit.py: error: --mixed-precision: oneDNN is capped at ONEDNN_MAX_CPU_ISA=AVX2, "
                                 "which has no bfloat16 convolutions, while this CPU's bfloat16 flags send them to "
                                 "oneDNN; unset ONEDNN_MAX_CPU_ISA or train in float32\n")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert cpu.bfloat16_blocked() is None
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # Eigen keeps bfloat16: it runs
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu.bfloat16_blocked() is None


def test_sample_with_an_official_test_folder_uses_all_5000(tmp_path):
    write_folder(tmp_path, n_train=3, n_test=9)
    datasets = data.load("sample", test_source=str(tmp_path))
    assert (datasets.info.num_train, datasets.info.num_validation, datasets.info.num_test) == (4375, 625, 9)
    assert datasets.info.source == f"sample, tested on {tmp_path}"


def test_forward_flops_counted_from_the_layer_shapes():
    assert measure.forward_flops(CNN()) == 2 * (28 * 28 * 32 * 25 + 14 * 14 * 64 * 25 * 32 + 3136 * 1024 + 1024 * 10)
    assert measure.forward_flops(CNN()) / 1e6 == pytest.approx(27.8, abs=0.05)


def test_the_fast_recipe_picks_its_precision_and_epochs_by_what_the_hardware_runs_natively(monkeypatch):
    """12 mixed-precision epochs where bfloat16 (or a GPU's float16) is native, else 10 float32 ones;
    issue #29: on an AVX512_VNNI CPU without bfloat16 the 12 float32 epochs took 2.7x the tutorial."""
    from mnist_cnn import config

    shared = ("augment", "lr_schedule", "dropout", "learning_rate", "label_smoothing", "steps_per_execution",
              "validation_split")
    monkeypatch.setattr(config, "native_mixed_precision", lambda: True)
    native = TrainConfig.from_recipe("fast")
    assert (native.epochs, native.mixed_precision) == (12, True)
    assert [getattr(native, name) for name in shared] == [True, "cosine", 0.5, 2e-3, 0.1, 10, "0.05"]
    monkeypatch.setattr(config, "native_mixed_precision", lambda: False)
    emulated = TrainConfig.from_recipe("fast")
    assert (emulated.epochs, emulated.mixed_precision) == (10, False)
    assert [getattr(emulated, name) for name in shared] == [getattr(native, name) for name in shared]
    assert TrainConfig.from_recipe("fast", epochs=12).epochs == 12  # a typed flag wins
    assert TrainConfig.from_recipe("fast", mixed_precision=True).mixed_precision is True
    monkeypatch.undo()
    if not tf.config.list_physical_devices("GPU") and cpu.is_x86():  # on a CPU: its bfloat16 that oneDNN uses
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "amx_bf16"}))
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # (the suite may run capped)
        assert TrainConfig.from_recipe("fast").mixed_precision is True
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # the CPU, on this one
        capped = TrainConfig.from_recipe("fast")
        assert (capped.epochs, capped.mixed_precision) == (10, False)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
        assert TrainConfig.from_recipe("fast").mixed_precision is False


def test_bench_reports_each_contender_against_its_precisions_ceiling():
    peaks = {"float32": 200.0, "bfloat16": 400.0}
    assert profile.contender_precision("model.fit", peaks) == "float32"
    assert profile.contender_precision("model.fit, mixed precision", peaks) == "bfloat16"
    assert profile.matmul_peak("float32", n=256, rounds=2, per_window=2) > 1.0  # GFLOP/s, measured for real
    row = {"contender": "model.fit", "optimizer": "FusedAdam", "ms_per_step": 20.0, "images_per_s": 2500,
           "vs_notebook": 2.3, "gflop_per_s": 150.0, "spread_pct": 5, "peak_fraction": 0.75}
    text = report.report({"forward_mflop": 27.77, "peak": peaks, "training": {50: {"model.fit [FusedAdam]": row}},
                         "evaluation": {"images": 10, "seconds": {"model.evaluate": 1.0,
                                                                  "tutorial batch-wise predict": 2.0}, "speedup": 2.0}})
    assert "matmul ceiling (2048x2048): float32 200 GFLOP/s, bfloat16 400 GFLOP/s" in text
    assert "of peak" in text and "     75%" in text
    assert "  model.fit                    FusedAdam      20.0" in text and "2.30x" in text


def test_the_op_profile_splits_a_real_training_step_by_op_class():
    by_class = profile.op_class_profile(steps=5)
    assert set(by_class) == {*profile.OP_CLASSES, "other"}
    for kind in ("conv forward", "conv backward-input", "conv backward-filter", "dense (forward and backward)",
                 "optimizer update"):
        assert by_class[kind] > 0, kind  # each class really was found in the trace


def test_steps_per_execution_changes_speed_not_the_training(tmp_path):
    """--steps-per-execution 3 on 5 steps an epoch (a partial last call): the same
    optimizer steps, weights and epoch numbers as one step per call, and the same per-step
    TensorBoard curve: a point at every step (written by the step itself), the same values."""
    write_folder(tmp_path / "idx", n_train=46, n_test=5)  # 6 held out, 40 train: 5 steps of 8
    runs = {}
    for k in (1, 3):
        config = quick(tmp_path, data=str(tmp_path / "idx"), batch_size=8, steps_per_epoch=None,
                       steps_per_execution=k, run_name=f"k{k}")
        runs[k] = train.fit(config, verbose=0)
    metrics = {k: json.loads((r.run_dir / "metrics.json").read_text()) for k, r in runs.items()}
    assert metrics[1]["optimizer_steps"] == metrics[3]["optimizer_steps"] == 2 * 5
    np.testing.assert_allclose(runs[3].history["loss"], runs[1].history["loss"], rtol=1e-5)
    weights = {k: keras.models.load_model(r.model_path).get_weights() for k, r in runs.items()}
    for a, b in zip(weights[1], weights[3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    curves = {k: read_summaries(r.run_dir / "train") for k, r in runs.items()}
    for tag in ("batch_loss", "batch_accuracy"):
        points = {k: sorted((step, float(tf.make_ndarray(v.tensor))) for step, _, v in c[tag])
                  for k, c in curves.items()}
        assert [s for s, _ in points[3]] == [s for s, _ in points[1]] == list(range(1, 11)), tag  # not 3, 5, 8, 10
        np.testing.assert_allclose([v for _, v in points[3]], [v for _, v in points[1]], rtol=1e-5, err_msg=tag)
    assert TrainConfig.from_recipe("fast").steps_per_execution > 1
