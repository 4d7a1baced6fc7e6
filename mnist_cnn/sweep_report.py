"""What a person (or a machine) sees of a sweep: a line per trial, the summary table, ``--json``,
and ``Outcome``, what ``tune.run`` returns. Light: Optuna's trials are read through their attributes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mnist_cnn.space import OBJECTIVES


@dataclass
class Outcome:
    """A study after ``run``: its trials (Optuna's FrozenTrials) and the best complete one."""

    study_name: str
    storage: str
    objective: str
    trials: list
    best: object | None  # FrozenTrial
    best_config: Path | None


def _seconds(frozen) -> float | None:
    if frozen.datetime_start and frozen.datetime_complete:
        return (frozen.datetime_complete - frozen.datetime_start).total_seconds()
    return None


def _value(frozen) -> float | None:
    if frozen.value is not None:
        return frozen.value
    return frozen.intermediate_values[max(frozen.intermediate_values)] if frozen.intermediate_values else None


def _param(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def line(frozen, objective: str, note: str = "") -> str:
    """One line per trial: number, state, objective, epochs, seconds, options."""
    value, seconds = _value(frozen), _seconds(frozen)
    params = " ".join(f"{k}={_param(v)}" for k, v in frozen.params.items())
    return (f"trial {frozen.number:>3}  {frozen.state.name:<8}  {objective} "
            f"{'-' if value is None else f'{value:.4f}'}  {len(frozen.intermediate_values)} epochs run  "
            f"{'-' if seconds is None else f'{seconds:.0f} s'}  {params}{f'  ({note})' if note else ''}")


def table(trials, objective: str) -> str:
    """The summary: every trial, the best first."""
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    sign = -1 if OBJECTIVES[objective] == "maximize" else 1
    done = sorted(trials, key=lambda t: (t.state.name != "COMPLETE", math.inf if _value(t) is None
                                         else sign * _value(t), t.number))
    rows = [["trial", "state", objective, "epochs_run", "seconds", *names]]
    for t in done:
        value, seconds = _value(t), _seconds(t)
        rows.append([str(t.number), t.state.name, "-" if value is None else f"{value:.4f}",
                     str(len(t.intermediate_values)), "-" if seconds is None else f"{seconds:.0f}",
                     *(_param(t.params[n]) if n in t.params else "" for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def as_json(outcome: Outcome) -> dict:
    """``--json``: the study for machines."""
    def trial(t):
        return {"number": t.number, "state": t.state.name, "value": _value(t), "params": t.params,
                "epochs": len(t.intermediate_values), "seconds": _seconds(t), "run_dir": t.user_attrs.get("run_dir")}

    return {"study": outcome.study_name, "storage": outcome.storage, "objective": outcome.objective,
            "direction": OBJECTIVES[outcome.objective], "trials": [trial(t) for t in outcome.trials],
            "best": None if outcome.best is None else trial(outcome.best),
            "best_config": None if outcome.best_config is None else str(outcome.best_config)}
