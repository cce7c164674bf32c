"""The study's storage, pruner and bookkeeping (lost trials, what ``n_trials`` counts), and its results: the table
of trials, ``best.yaml`` and the plots."""

from __future__ import annotations

import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_lightning.errors import UsageError

if TYPE_CHECKING:
    import optuna

PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S = 60  # RDB storages: a trial whose process stops beating for 2 minutes is lost (see lost)
HOST, PID = socket.gethostname(), os.getpid()


def make_storage(url: str | None, study_dir: Path) -> Any:
    """An Optuna storage: ``journal://PATH`` a journal file (``journal:///abs/file.log``), any other URL an
    ``RDBStorage`` (``sqlite:///...``, ``postgresql://...``), None the study folder's ``study.db``. RDB storages get
    Optuna's heartbeat, so a trial whose process died on another machine is found and run again."""
    import optuna

    if url and url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if not url:
        study_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    # SQLite: wait for another worker's write for up to a minute instead of failing at once ("database is locked").
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, heartbeat_stale_trial_callback=retry
            )
        except Exception as err:  # a URL SQLAlchemy cannot read, a driver not installed, a database it cannot open
            # Workers started together race to create a new database's tables: the loser tries again.
            if attempt < 2 and type(err).__name__ in ("OperationalError", "IntegrityError", "ProgrammingError"):
                time.sleep(1 + attempt)
                continue
            raise UsageError(
                f"--storage {url!r}: {type(err).__name__}: {str(err).splitlines()[0]} (use "
                "sqlite:///FILE, postgresql://USER:PASSWORD@HOST/DB or journal://FILE)"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """``median`` (Optuna's MedianPruner: below the median of earlier trials at the same epoch, after 5 trials),
    ``hyperband`` (HyperbandPruner) or ``none``."""
    import optuna

    if name not in PRUNERS:
        raise UsageError(f"unknown pruner {name!r}: use one of {', '.join(PRUNERS)}")
    return {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }[name]()


def lost(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that did not end on its own: its process died (no ``reason``: the heartbeat or ``fail_dead``
    failed it) or was interrupted. It is run again (``retry``) and does not count toward ``n_trials``."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    return trial.state == TrialState.FAIL and ("reason" not in attrs or bool(attrs.get("interrupted")))


def retry(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial) -> None:
    """Queue a lost trial's parameters to run again, once (Optuna's ``RetryHeartbeatStaleTrialCallback`` idea, with
    the original's number in ``retry_of``). A trial lost before it had drawn all its parameters has nothing to run
    again: it stays failed, uncounted, and a new trial is sampled in its place."""
    if trial.user_attrs.get("retry_of") is None and trial.user_attrs.get("params_drawn"):
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def fail_dead(study: optuna.Study) -> None:
    """Fail the trials left running by a process of this machine that no longer exists (killed), and queue them
    again. Without this a killed trial would stay RUNNING until the heartbeat's 2 minutes (RDB storages) or for
    ever (journal files), and a resumed study would wait for it or count it."""
    import optuna
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != HOST or attrs.get("pid") in (None, PID) or _alive(int(attrs["pid"])):
            continue
        try:  # another worker may fail it first: the storage refuses the second, and only one queues it again
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        retry(study, trial)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials ``n_trials`` counts: every one (running and queued included) except lost ones (``lost``)."""
    return [t for t in study.get_trials(deepcopy=False) if not lost(t)]


def claim(study: optuna.Study, recipe: str, monitor: str) -> None:
    """Mark a new study with its recipe and metric; a study of another recipe or metric stops with one line."""
    attrs = study.user_attrs
    if not attrs:
        study.set_user_attr("recipe", recipe)
        study.set_user_attr("monitor", monitor)
    elif (attrs.get("recipe"), attrs.get("monitor")) != (recipe, monitor):
        raise UsageError(
            f"study {study.study_name!r} in this storage tunes recipe {attrs.get('recipe')!r} on "
            f"{attrs.get('monitor')!r}, not {recipe!r} on {monitor!r}: pass another --study name"
        )


# --- results ---
def print_trials(study: optuna.Study, monitor: str, last: int | None = None) -> None:
    """A table of the study's trials (the ``last`` ones and the best, when given): number, state, value, params,
    duration and why a trial failed or was pruned."""
    from optuna.trial import TrialState
    from rich.console import Console
    from rich.table import Table

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = (max if study.direction.name == "MAXIMIZE" else min)(done, key=lambda t: t.value) if done else None
    shown = (
        trials
        if last is None or len(trials) <= last
        else [t for t in trials if t is best or t.number >= trials[-last].number]
    )
    retried = {t.user_attrs["retry_of"]: t for t in trials if t.user_attrs.get("retry_of") is not None}
    table = Table(
        title=f"study {study.study_name}: {len(done)} complete of {len(trials)} trials"
        + (f" (showing {len(shown)})" if len(shown) < len(trials) else ""),
        title_justify="left",
    )
    for column in ("trial", "state", monitor, "params", "time", "note"):
        table.add_column(column, overflow="fold", justify="right" if column in ("trial", monitor, "time") else "left")
    for t in shown:
        value = f"{t.value:.4f}" if t.value is not None else ""
        # A queued trial's parameters are the ones it was queued with (Optuna's enqueue_trial).
        fixed = t.system_attrs.get("fixed_params", {}) if t.state == TrialState.WAITING else t.params
        params = "  ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in fixed.items())
        end = t.datetime_complete or (datetime.now() if t.datetime_start else None)  # running: so far
        took = (end - t.datetime_start).total_seconds() if end and t.datetime_start else None
        note = t.user_attrs.get("reason", "")
        if lost(t):
            note = note or "its process died"
            again = retried.get(t.number)
            if again is not None:
                note += f"; {'queued' if again.state == TrialState.WAITING else 'ran'} again as trial {again.number}"
        elif t.state == TrialState.RUNNING:
            note = f"on {t.user_attrs.get('host', '?')} (pid {t.user_attrs.get('pid', '?')})"
        elif t.user_attrs.get("retry_of") is not None and not note:
            note = f"re-run of trial {t.user_attrs['retry_of']}"
        if t is best:
            note = f"best; {note}" if note else "best"
        table.add_row(str(t.number), t.state.name.lower(), value, params, _wall(took) if took else "", note)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the params, as print_summary
        console = Console(width=160)
    console.print(table)


def _wall(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"  # as summary.format_wall, without importing torch


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_best(study: optuna.Study, study_dir: Path, monitor: str) -> Path | None:
    """``study_dir/best.yaml``: the best trial's ``config.yaml`` (SaveConfigCallback's, every resolved value) without
    the trial's ``test_after_fit: false``, so ``fit -c best.yaml`` trains and tests it. None before any trial
    completed, or when the best trial ran on another machine (its run folder is there)."""
    import yaml

    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    source = Path(best.user_attrs.get("run_dir", "")) / "config.yaml"
    if not source.is_file():
        return None
    config = yaml.safe_load(source.read_text()) or {}
    config.pop("test_after_fit", None)  # back to fit's default: test the best checkpoint after training
    target = study_dir / "best.yaml"
    header = (
        f"# best trial {best.number} of study {study.study_name!r}: {monitor} {best.value:.4f}, from "
        f"{source}\n# rerun it: python -m peft_lightning fit -c {target}\n"
    )
    tmp = target.with_name(f".best.{PID}.yaml")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, target)  # several workers may write it at once: each write is whole
    return target


def write_plots(study: optuna.Study, study_dir: Path, monitor: str) -> list[Path]:
    """``history.png`` (Optuna's optimisation history) and, with 2+ complete trials and 2+ parameters,
    ``importance.png`` (PED-ANOVA importances: Optuna's default fANOVA needs scikit-learn, not a dependency)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only, as peft_lightning.output.plots
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    plots = [("history.png", lambda: vis.plot_optimization_history(study, target_name=monitor))]
    if len(done) >= 2 and len({k for t in done for k in t.params}) >= 2:
        plots.append(
            (
                "importance.png",
                lambda: vis.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target_name=monitor),
            )
        )
    written = []
    for filename, draw in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            figure = axes.figure
            figure.set_size_inches(8, 4.5)
            figure.tight_layout()
            figure.savefig(study_dir / filename, dpi=110)
            plt.close(figure)
            written.append(study_dir / filename)
        except Exception as err:  # the study is saved: a plot must not lose it, but say what happened
            print(f"could not draw {filename}: {type(err).__name__}: {err}")
    return written
