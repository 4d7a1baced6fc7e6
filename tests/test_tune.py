"""mnist-cnn-tune: sweeps on Optuna whose trials are ordinary run folders, scored on validation
digits only, pruned early, resumed after a kill, shared by processes (mnist_cnn.tune, mnist_cnn.space)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, fit_here, read_summaries, write_folder
from tensorboard.plugins.hparams import plugin_data_pb2

from mnist_cnn import console, space, tune
from mnist_cnn.cli import tune as tune_cli
from mnist_cnn.config import TrainConfig
from mnist_cnn.errors import UsageError

pytestmark = pytest.mark.slow
TUNE = [sys.executable, str(REPO / "scripts" / "tune.py")]
SMALL_SPACE = {"learning_rate": {"low": 3e-4, "high": 3e-3, "log": True}, "dropout": {"choices": [0.0, 0.5]}}
# two epochs of three steps on the sample, scored on 100 validation digits: ~1 s a trial
TINY = ["--data", "sample", "--epochs", "2", "--steps-per-epoch", "3", "--validation-split", "100", "--seed", "3"]


def tune_here(capsys, *args):
    """``scripts/tune.py ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = tune_cli.main([*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def space_file(tmp_path, content=None, name="space.json"):
    path = tmp_path / name
    path.write_text(json.dumps(SMALL_SPACE if content is None else content) if name.endswith(".json") else content)
    return path


def trials_of(logdir, study):
    import optuna

    storage = f"sqlite:///{logdir / study / 'study.db'}"
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


# -- the space and bad input ------------------------------------------------------------------


def test_the_default_space_is_valid_and_a_toml_space_reads_as_its_json_twin(tmp_path):
    assert {d.name for d in space.read(None)} >= {"learning_rate", "lr_schedule", "dropout", "batch_size", "epochs",
                                                  "augment", "augment_rotation", "ema", "label_smoothing"}
    toml = space_file(tmp_path, '[learning_rate]\nlow = 3e-4\nhigh = 3e-3\nlog = true\n\n'
                                '[dropout]\nchoices = [0.0, 0.5]\n\n[ema]\nchoices = ["none", 0.99]\n', "space.toml")
    twin = space_file(tmp_path, {**SMALL_SPACE, "ema": {"choices": [None, 0.99]}})
    assert space.as_json(space.read(str(toml))) == space.as_json(space.read(str(twin)))


def test_a_typed_flag_fixes_its_option_for_every_trial():
    assert "epochs" not in {d.name for d in space.read(None, fixed=("epochs", "seed"))}
    assert "dropout" in {d.name for d in space.read(None, fixed=("epochs",))}
    sweep, base, _ = tune_cli.parse_args(["--epochs", "3", "--dropout", "0.2", "--recipe", "best"])
    assert set(sweep.fixed) == {"epochs", "dropout", "recipe"} and base.epochs == 3 and base.augment  # (the recipe's)
    assert not {"epochs", "dropout"} & {d.name for d in space.read(sweep.space, sweep.fixed)}


def test_a_space_file_that_names_a_typed_option_is_refused(tmp_path, capsys):
    code, out, err = tune_here(capsys, "--space", space_file(tmp_path), "--dropout", "0.3", "--logdir", tmp_path)
    assert (code, out) == (2, "") and err == (f"tune.py: error: --space {tmp_path}/space.json: dropout also typed as "
                                              "a flag: vary it in the space or fix it with the flag, not both\n")


@pytest.mark.parametrize("content, message", [
    ({"learning_rat": {"low": 1e-4, "high": 1e-3}}, "'learning_rat' is not an option of mnist-cnn-fit"),
    ({"seed": {"low": 0, "high": 9}}, "seed is not tuned"),
    ({"dropout": {"low": 0.5, "high": 0.1}}, "dropout: reversed range, low 0.5 > high 0.1"),
    ({"dropout": {"low": 0.3, "high": 0.3}}, "dropout: empty range, low = high = 0.3"),
    ({"dropout": {"low": 0.0, "high": 0.5, "log": True}}, "dropout: a log range needs low > 0, got 0.0"),
    ({"dropout": {"low": 0.0, "high": 1.0}}, "dropout: high is outside what the option takes: it must be in"),
    ({"epochs": {"low": 1.5, "high": 3}}, "epochs: low must be a whole number, got 1.5"),
    ({"lr_schedule": {"choices": ["cosine", "linear"]}}, "choice 'linear': must be one of constant, cosine"),
    ({"augment": {"low": 0, "high": 1}}, "augment is on or off: give it choices"),
    ({"batch_size": {"choices": []}}, "batch_size: choices must be a non-empty list"),
    ({"epochs": {"low": 2, "high": 4, "steps": 1}}, "epochs: unknown key(s) steps"),
])
def test_a_bad_space_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    code, out, err = tune_here(capsys, "--space", space_file(tmp_path, content), "--logdir", tmp_path / "logs", *TINY)
    assert code == 2 and out == ""
    assert err.startswith("tune.py: error: --space ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "logs").exists()  # nothing was created


def test_a_storage_that_cannot_be_opened_and_a_changed_study_are_one_line(tmp_path, capsys):
    logdir = tmp_path / "logs"
    code, _, err = tune_here(capsys, "--storage", f"sqlite:///{tmp_path}/no/such/folder/study.db", "--logdir", logdir,
                             "--space", space_file(tmp_path), *TINY)
    assert code == 2 and err.startswith(f"tune.py: error: --storage sqlite:///{tmp_path}/no/such/folder/study.db: "
                                        "cannot open it (OperationalError") and err.count("\n") == 1
    code, _, err = tune_here(capsys, "--storage", "postgresql+psycopg2://tuner:secret@127.0.0.1:1/sweeps", "--space",
                             space_file(tmp_path), "--logdir", logdir, *TINY)
    assert code == 2 and "--storage postgresql+psycopg2://tuner:***@127.0.0.1:1/sweeps: cannot open it" in err
    assert "secret" not in err  # (no driver here, or no server: either way one line, and no password shown)
    # a study, then the same study asked to search another space or from other base options
    assert tune_here(capsys, "--study", "s", "--trials", "0", "--space", space_file(tmp_path), "--logdir", logdir,
                     *TINY)[0] == 0
    wider = space_file(tmp_path, {**SMALL_SPACE, "dropout": {"choices": [0.0, 0.25, 0.5]}}, "wider.json")
    code, _, err = tune_here(capsys, "--study", "s", "--space", wider, "--logdir", logdir, *TINY)
    assert (code, err) == (2, "tune.py: error: --study s: its search space changed (dropout); a study keeps its "
                              "search space (start another with a new --study, or run it as it was)\n")
    code, _, err = tune_here(capsys, "--study", "s", "--space", space_file(tmp_path), "--logdir", logdir,
                             *TINY, "--epochs", "3")
    assert code == 2 and "its base options changed (epochs)" in err
    code, _, err = tune_here(capsys, "--study", "s", "--space", space_file(tmp_path), "--logdir", logdir,
                             "--objective", "val_loss", *TINY)
    assert code == 2 and "it selects on val_accuracy, not val_loss" in err
    code, _, err = tune_here(capsys, "--validation-split", "0", "--logdir", logdir, *TINY[:-4])
    assert code == 2 and "--validation-split 0 would score the trials on the test split" in err


# -- a study -----------------------------------------------------------------------------------


def test_a_study_trains_runs_that_never_read_the_test_split_and_best_json_trains_the_winner_again(
        tmp_path, capsys):
    """Trials are run folders with HParams and no test score: the test split here is not MNIST at all,
    and the study does not notice. best.json trains the best trial again, bit for bit on its validation
    digits, and that run reads the test split (and fails on it here, then scores a real one)."""
    broken, real = tmp_path / "broken-test", tmp_path / "real-test"
    write_folder(real, n_train=1, n_test=20)
    broken.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (broken / name).write_bytes(b"not an IDX file")
    logdir = tmp_path / "logs"
    args = ["--study", "lr", "--trials", "3", "--space", space_file(tmp_path), "--logdir", logdir, *TINY,
            "--test-data", broken, "--pruner", "none"]
    code, out, err = tune_here(capsys, *args, "--json")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("trial ")]
    assert [line.split()[:3] for line in lines] == [["trial", str(n), "COMPLETE"] for n in range(3)]
    summary = json.loads(out)
    assert summary["study"] == "lr" and summary["direction"] == "maximize" and len(summary["trials"]) == 3
    best = max(summary["trials"], key=lambda t: (t["value"], -t["number"]))
    assert summary["best"]["number"] == best["number"] and summary["best_config"] == str(logdir / "lr" / "best.json")
    for trial in summary["trials"]:
        run_dir = logdir / "lr" / f"trial-{trial['number']:04d}"
        assert trial["run_dir"] == str(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["test_accuracy"] is None and metrics["trial"] == {"trial": trial["number"], "study": "lr",
                                                                          "objective": "val_accuracy"}
        assert metrics["history"]["val_accuracy"][-1] == trial["value"]
        (_, _, value), = read_summaries(run_dir)["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
        hparams = hparams.session_start_info.hparams
        assert hparams["trial"].number_value == trial["number"] and hparams["study"].string_value == "lr"
        assert hparams["learning_rate"].number_value == pytest.approx(trial["params"]["learning_rate"])

    # the dashboard's columns: the trial, what the space varies, the validation metrics
    (_, _, value), = read_summaries(logdir / "lr")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).experiment
    assert [h.name for h in experiment.hparam_infos] == ["trial", "learning_rate", "dropout"]
    assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == [("validation", "epoch_accuracy"),
                                                                           ("validation", "epoch_loss")]
    best_json = json.loads((logdir / "lr" / "best.json").read_text())
    assert best_json["learning_rate"] == best["params"]["learning_rate"] and "run_name" not in best_json
    again = fit_here("--config", logdir / "lr" / "best.json", "--logdir", tmp_path / "again")
    assert again.returncode == 2 and "t10k-images-idx3-ubyte" in again.stderr  # fit reads the test split
    again = fit_here("--config", logdir / "lr" / "best.json", "--logdir", tmp_path / "again", "--test-data", real)
    assert again.returncode == 0, again.stderr
    run_dir, = (tmp_path / "again").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history"]["val_accuracy"][-1] == best["value"]  # the same run, bit for bit
    assert metrics["data"]["num_test"] == 20 and 0 <= metrics["test_accuracy"] <= 1

    # continued with more trials: the three are kept, numbered on; --best trains nothing
    code, out, _ = tune_here(capsys, *args[:3], "4", *args[4:])
    assert code == 0 and [t.number for t in trials_of(logdir, "lr")] == [0, 1, 2, 3]
    code, out, _ = tune_here(capsys, *args, "--best")
    assert code == 0 and len(trials_of(logdir, "lr")) == 4 and "best: trial " in out
    # (called from Python: the installed command is named)
    assert f"train it again and score it on the test split: mnist-cnn-fit --config {logdir}/lr/best.json\n" in out


def test_seeded_studies_propose_the_same_trials_and_other_seeds_others(tmp_path, capsys):
    def params(study, seed, pruner="none"):
        argv = ["--study", study, "--trials", "2", "--space", space_file(tmp_path), "--logdir", tmp_path, *TINY,
                "--seed", seed, "--pruner", pruner]
        assert tune_here(capsys, *argv)[0] == 0
        return [(t.params, t.value) for t in trials_of(tmp_path, study)]

    first = params("a", 5)
    assert params("b", 5) == first
    assert [p for p, _ in params("c", 6, "hyperband")] != [p for p, _ in first]
    assert isinstance(tune.pruner(tune.Sweep(pruner="hyperband", prune_after_epochs=2)),
                      tune.optuna.pruners.HyperbandPruner)
    assert isinstance(tune.pruner(tune.Sweep(pruner="none")), tune.optuna.pruners.NopPruner)


def test_a_hopeless_trial_is_pruned_at_once_and_its_run_folder_says_so(tmp_path, capsys):
    """The median pruner, after one finished trial, stops a trial whose first epochs score below it:
    a learning rate of 1e-9 learns nothing."""
    hopeless = space_file(tmp_path, {"learning_rate": {"choices": [2e-3, 1e-9]}})
    argv = ["--study", "p", "--trials", "4", "--space", hopeless, "--logdir", tmp_path, *TINY[:2], "--epochs", "4",
            *TINY[4:], "--prune-after-trials", "1", "--prune-after-epochs", "1"]
    code, out, err = tune_here(capsys, *argv)
    assert code == 0, err
    trials = trials_of(tmp_path, "p")
    states = {t.number: (t.state.name, t.params["learning_rate"], len(t.intermediate_values)) for t in trials}
    pruned = [n for n, (state, lr, epochs) in states.items() if state == "PRUNED"]
    assert pruned and all(states[n][1] == 1e-9 and states[n][2] == 2 for n in pruned), states
    assert any(state == "COMPLETE" and epochs == 4 for state, _, epochs in states.values())
    for n in pruned:
        run_dir = tmp_path / "p" / f"trial-{n:04d}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["trial"]["pruned_at_epoch"] == 2 and metrics["epochs_run"] == 2
        assert f"trial {n:>3}  PRUNED " in out


# -- kills, restarts, processes ---------------------------------------------------------------


def test_a_killed_study_continues_its_interrupted_trial_bit_for_bit(tmp_path, capsys):
    """kill -9 while trial 1 trains (after its first epoch): the same command again resumes trial 1
    from its checkpoint, counts it once, and the study ends as the uninterrupted one does."""
    argv = ["--study", "k", "--trials", "3", "--space", space_file(tmp_path), *TINY[:2], "--epochs", "3",
            "--steps-per-epoch", "20", *TINY[6:], "--pruner", "none"]
    proc = subprocess.Popen([*TUNE, *argv, "--logdir", tmp_path / "killed"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    resume_file = tmp_path / "killed" / "k" / "trial-0001" / "resume.json"
    deadline = time.monotonic() + 240
    while not resume_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert resume_file.exists(), "trial 1 never committed an epoch"
    assert not (tmp_path / "killed" / "k" / "trial-0001" / "metrics.json").exists(), "killed too late"
    code, out, err = tune_here(capsys, *argv, "--logdir", tmp_path / "killed")
    assert code == 0, err
    assert "trial   1  COMPLETE" in out and "(resumed after epoch " in out
    killed = trials_of(tmp_path / "killed", "k")
    assert [t.state.name for t in killed] == ["COMPLETE"] * 3
    assert tune_here(capsys, *argv, "--logdir", tmp_path / "whole")[0] == 0
    whole = trials_of(tmp_path / "whole", "k")
    assert [(t.params, t.value, t.intermediate_values) for t in killed] == \
           [(t.params, t.value, t.intermediate_values) for t in whole]


def test_trials_left_before_their_run_folder_was_written_are_trained_anew_never_twice(tmp_path, capsys):
    """A process killed right after asking for a trial (its options half drawn, no run folder), and one
    killed between its run folder's mkdir and its config.json: the next process trains both, once each,
    with the options they had drawn, and sets the half-written folder aside."""
    import optuna

    argv = ["--study", "gap", "--space", space_file(tmp_path), "--logdir", tmp_path, *TINY, "--pruner", "none"]
    assert tune_here(capsys, *argv, "--trials", "0")[0] == 0
    study = optuna.load_study(study_name="gap", storage=f"sqlite:///{tmp_path / 'gap' / 'study.db'}")
    first = study.ask()
    first.suggest_float("learning_rate", 3e-4, 3e-3, log=True)  # killed before dropout was drawn
    second = study.ask()
    second.set_user_attr("host", tune.HOST)
    (tmp_path / "gap" / "trial-0001").mkdir()  # killed before its config.json
    code, out, err = tune_here(capsys, *argv, "--trials", "3")
    assert code == 0, err
    trials = trials_of(tmp_path, "gap")
    assert [(t.number, t.state.name, sorted(t.params)) for t in trials] == [
        (n, "COMPLETE", ["dropout", "learning_rate"]) for n in range(3)]
    assert trials[0].params["learning_rate"] == first.params["learning_rate"]
    assert "trial   0  COMPLETE" in out and "(trained anew: its process died first)" in out
    assert "(trained anew: no epoch had started)" in out
    assert len(list((tmp_path / "gap").glob("trial-0001.incomplete-*"))) == 1


def test_two_processes_share_a_journal_study_and_train_exactly_the_trials_asked(tmp_path):
    """--jobs 2 on Optuna's journal file: two processes, 4 trials between them, none twice."""
    journal = tmp_path / "study.journal"
    argv = [*TUNE, "--study", "j", "--trials", "4", "--jobs", "2", "--storage", f"journal:{journal}", "--space",
            space_file(tmp_path), "--logdir", tmp_path, *TINY, "--pruner", "none"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import optuna
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="j", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and {t.state.name for t in trials} == {"COMPLETE"}
    assert sorted(p.name for p in (tmp_path / "j").glob("trial-*")) == [f"trial-{n:04d}" for n in range(4)]
    assert sum(line.startswith("trial ") for line in done.stdout.splitlines()) == 4 + 1  # a line each, the table's
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # head


def test_sigterm_stops_a_study_that_the_same_command_continues(tmp_path):
    argv = [*TUNE, "--study", "t", "--trials", "2", "--space", space_file(tmp_path), "--logdir", tmp_path,
            *TINY[:4], "--steps-per-epoch", "200", *TINY[6:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "t" / "trial-0000"
    deadline = time.monotonic() + 120
    while not (run_dir / "train").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "tune.py: interrupted; the study continues (its running trials from their last epoch) with: python " in err
    assert trials_of(tmp_path, "t")[0].state.name == "RUNNING"  # to be resumed by the next process
    assert os.path.exists(run_dir / "config.json")
    # started as our command (scripts/tune.py was not, until CI lost this SIGTERM in jax's gc callback)
    assert not [line for line in err.splitlines() if console.is_known(line)], err[-2000:]


def test_no_trial_starts_after_the_timeout(tmp_path, capsys):
    code, out, _ = tune_here(capsys, "--study", "late", "--timeout", "0.001", "--trials", "5", "--logdir", tmp_path,
                             "--space", space_file(tmp_path), *TINY)
    assert code == 0 and out.startswith("study late: 0 trials in ") and trials_of(tmp_path, "late") == []


def test_sigterm_to_a_jobs_parent_stops_its_workers_and_leaves_no_process(tmp_path):
    argv = [*TUNE, "--study", "jt", "--trials", "4", "--jobs", "2", "--space", space_file(tmp_path), "--logdir",
            tmp_path, *TINY[:4], "--steps-per-epoch", "200", *TINY[6:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("jt/trial-*/train"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    training = len(list(tmp_path.glob("jt/trial-*/train")))
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "mnist_cnn.cli.tune"], capture_output=True,
                             text=True).stdout.split()  # (the other child: the filter of TensorFlow's lines)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert (training, len(workers), proc.returncode) == (2, 2, 130), err[-3000:]
    assert err.count("interrupted; the study continues") == 1 and "--worker" not in err, err[-3000:]  # the parent's
    assert err.strip().splitlines()[-1].endswith(" ".join(map(str, argv[2:])))  # the command as typed
    deadline = time.monotonic() + 10  # the filter ends once it has passed on the parent's last lines
    while any(os.path.exists(f"/proc/{pid}") for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in children if os.path.exists(f"/proc/{pid}")] == []
    assert sorted(t.state.name for t in trials_of(tmp_path, "jt")) == ["RUNNING", "RUNNING"]


def test_tune_is_listed_with_the_sweep_options_and_fit_s(capsys):
    with pytest.raises(SystemExit):
        tune_cli.parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--trials", "--timeout", "--study", "--seed", "--jobs", "--space", "--objective", "--pruner",
                 "--storage", "--best", "--json", "--learning-rate", "--recipe", "--data", "--config"):
        assert f"  {flag}" in text, flag
    assert "--worker" not in text and "  --resume" not in text


def test_a_sweep_refuses_fit_options_a_trial_cannot_take():
    for overrides, message in (({"run_name": "x"}, "--run-name is not available in a sweep"),
                               ({"export": "out"}, "--export is not available in a sweep"),
                               ({"validation_split": "0"}, "--validation-split 0 would score")):
        with pytest.raises(UsageError, match=message):
            tune.check(tune.Sweep(), TrainConfig(**overrides))
