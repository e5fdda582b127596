"""Where the trainer's metrics go besides ``metrics.jsonl``: ``--report-to tensorboard,wandb,mlflow`` or ``none``.

Each backend is a small class with one interface, ``Backend(run_dir, *,
config, resume_step, record, echo)``, ``.log(step, metrics)``, ``.close()``,
looked up by name in :data:`BACKENDS`. :class:`~ebpo.train.tracking.Tracker`
opens them on rank 0 only and hands each step's flat dict of namespaced
scalars (``reward/mean``, ``adv/zero_signal_frac``) to every one, with the RL
step as the step.

Weights & Biases and MLflow are called through their own libraries, not
through ``accelerate.tracking`` (read at accelerate 1.16), because:

* ``WandBTracker(run_name)`` passes its name to ``wandb.init`` as ``project=``,
  an explicit argument that overrides ``WANDB_PROJECT``;
* ``MLflowTracker`` drives mlflow's fluent API, whose active run is a process
  global (``mlflow.start_run``/``mlflow.end_run``), and silently drops config
  values over mlflow's length limit; :class:`mlflow.MlflowClient` with an
  explicit run id holds no global state;
* neither keeps the run id for ``--resume`` nor skips the steps a run
  already holds, which is most of the code here; the rank-0 gate is the
  Tracker's already. What remains of the wrappers is one library call each.

Resume: the wandb and mlflow backends store their run id and the last step
they sent in ``<run_dir>/trackers.json``. ``ebpo train --resume`` continues
that run and does not send again the steps it already holds (those between
the checkpoint and where the earlier attempt stopped): a resumed run
recomputes them equal to the uninterrupted run's (``time/`` metrics aside),
and wandb refuses steps below its current one while mlflow would append
duplicates to each metric's history.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["BACKENDS", "Backend", "RunRecord", "mlflow_metric_name", "open_backends", "parse_report_to", "selected"]

NONE = "none"
_INSTALL = 'pip install "ebpo[track]"'


class Backend(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class RunRecord:
    """``<run_dir>/trackers.json``: per backend, its run id and the last step it was sent (written atomically)."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, "trackers.json")
        self.entries: dict[str, dict[str, Any]] = {}
        if os.path.exists(self.path):
            with open(self.path) as handle:
                self.entries = json.load(handle)

    def get(self, backend: str) -> dict[str, Any]:
        return dict(self.entries.get(backend, {}))

    def update(self, backend: str, **values: Any) -> None:
        self.entries.setdefault(backend, {}).update(values)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.entries, handle, indent=2)
        os.replace(tmp, self.path)


class TensorBoardBackend:
    """Event files in ``<run_dir>/tensorboard``; a resumed run purges the events after its checkpoint's step."""

    module = "tensorboard"

    def __init__(self, run_dir: str, *, config: Mapping[str, Any], resume_step: int, record: RunRecord, echo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def _run_name(run_dir: str) -> str:
    return os.path.basename(os.path.abspath(run_dir))


class WandbBackend:
    """A Weights & Biases run: project ``$WANDB_PROJECT`` or ``ebpo``, name ``$WANDB_NAME`` or the run directory's
    basename, local files in ``$WANDB_DIR`` or the run directory; every other ``WANDB_*`` variable
    (``WANDB_MODE=offline``, ``WANDB_ENTITY``, ``WANDB_API_KEY``, ...) is read by wandb itself."""

    module = "wandb"

    def __init__(self, run_dir: str, *, config: Mapping[str, Any], resume_step: int, record: RunRecord, echo) -> None:
        import wandb

        self.record = record
        project = os.environ.get("WANDB_PROJECT") or "ebpo"
        earlier = record.get("wandb")
        if earlier and earlier.get("project") != project:  # the same id in another project would be another run
            echo(
                f"wandb: run {earlier['run_id']} is in project {earlier.get('project')!r}; starting a new run in {project!r}"
            )
            earlier = {}
        self.sent_through = earlier.get("last_step", 0)  # steps this run already holds
        self.run = wandb.init(
            project=project,
            name=os.environ.get("WANDB_NAME") or _run_name(run_dir),
            dir=os.environ.get("WANDB_DIR") or run_dir,
            config=dict(config),
            id=earlier.get("run_id"),
            resume="allow" if earlier.get("run_id") else None,
            allow_val_change=True,  # a resumed run may change e.g. steps; the config then holds the new values
        )
        record.update("wandb", run_id=self.run.id, project=self.run.project, last_step=self.sent_through)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step <= self.sent_through:
            return
        # An explicit step: calls with the same step (the final evaluation) fill the same row.
        self.run.log(dict(metrics), step=step)
        self.record.update("wandb", last_step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^/\w.\- ]")  # mlflow's allowed characters (the Windows set, so without ':')


def mlflow_metric_name(name: str) -> str:
    """``name`` as mlflow accepts it: characters other than letters, digits, ``_ - . / space`` become ``_``, and
    empty, ``.`` or ``..`` path segments become ``_``. Every built-in metric name is returned unchanged."""
    parts = _MLFLOW_BAD.sub("_", name).split("/")
    return "/".join(part if part not in ("", ".", "..") else "_" for part in parts)


def _mlflow_param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class MlflowBackend:
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_ID`` or ``$MLFLOW_EXPERIMENT_NAME`` (default ``ebpo``),
    named after the run directory, at ``$MLFLOW_TRACKING_URI``, else the store of the run being resumed, else
    mlflow's default. The config is logged as params (dicts as JSON); metric names go through
    :func:`mlflow_metric_name`."""

    module = "mlflow"

    def __init__(self, run_dir: str, *, config: Mapping[str, Any], resume_step: int, record: RunRecord, echo) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        self.record, self.echo, self.batch = record, echo, MAX_METRICS_PER_BATCH
        earlier = record.get("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or earlier.get("tracking_uri") or mlflow.get_tracking_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            run = self._resumable(earlier, uri, MlflowException)
        except MlflowException as exc:
            # mlflow-skinny has no sqlite store (mlflow's default) and mlflow 3 refuses a directory without
            # MLFLOW_ALLOW_FILE_STORE=true; its own message is a paragraph, this says what to change.
            raise RuntimeError(
                f"--report-to mlflow: cannot use the tracking store {uri!r} ({type(exc).__name__}, above). "
                "Set MLFLOW_TRACKING_URI to a tracking server (http://host:5000), or to a local directory "
                "(file:/path/mlruns) with MLFLOW_ALLOW_FILE_STORE=true, or install full mlflow for its sqlite default."
            ) from exc
        given = {key: _mlflow_param(value) for key, value in config.items()}
        if run is None:
            run = self.client.create_run(
                self._experiment_id(),
                run_name=_run_name(run_dir),
                tags={"ebpo.run_dir": os.path.abspath(run_dir)},
            )
            self.sent_through, held = 0, {}
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            self.sent_through, held = earlier.get("last_step", 0), run.data.params
            changed = sorted(k for k in given if k in held and held[k] != given[k])
            if changed:  # mlflow params cannot change; config.yaml in the run directory has the current values
                echo(
                    f"mlflow keeps the first values of params {changed}; the run directory's config.yaml has the new ones"
                )
        self.run_id = run.info.run_id
        new = [Param(key, value) for key, value in given.items() if key not in held]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        record.update("mlflow", run_id=self.run_id, tracking_uri=uri, last_step=self.sent_through)
        self.renamed: set[str] = set()

    def _resumable(self, earlier: dict[str, Any], uri: str, error: type[Exception]) -> Any:
        """The earlier attempt's run when this store holds it, else None (a new run is started)."""
        if not earlier.get("run_id"):
            return None
        if earlier.get("tracking_uri") != uri:
            self.echo(
                f"mlflow: run {earlier['run_id']} was logged to {earlier.get('tracking_uri')}; starting a new run at {uri}"
            )
            return None
        try:
            return self.client.get_run(earlier["run_id"])
        except error as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise  # the store failed, not the lookup
            self.echo(f"mlflow: run {earlier['run_id']} is not in {uri} any more; starting a new run")
            return None

    def _experiment_id(self) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ebpo"
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment is not None else self.client.create_experiment(name)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.sent_through:
            return
        stamp = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            name = mlflow_metric_name(key)
            if name != key and key not in self.renamed:
                self.renamed.add(key)
                self.echo(f"mlflow: metric {key!r} is logged as {name!r} (characters mlflow does not accept)")
            rows.append(Metric(name, float(value), stamp, step))
        for start in range(0, len(rows), self.batch):
            self.client.log_batch(self.run_id, metrics=rows[start : start + self.batch])
        self.record.update("mlflow", last_step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


#: ``--report-to`` names and their backends.
BACKENDS: dict[str, type] = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend, "mlflow": MlflowBackend}


def parse_report_to(text: str) -> tuple[str, ...]:
    """The backends named by ``--report-to`` (comma-separated), checked: known names, ``none`` alone, libraries
    installed. ValueError otherwise, raised by :func:`ebpo.train.config.validate` before anything is written."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    choices = f"one or more of {', '.join(BACKENDS)} (comma-separated), or {NONE}"
    unknown = [name for name in names if name not in BACKENDS and name != NONE]
    if unknown or not names:
        raise ValueError(f"report_to must be {choices}; got {text!r}")
    if NONE in names:
        if len(names) > 1:
            raise ValueError(f"report_to: {NONE!r} cannot be combined with other backends, got {text!r}")
        return ()
    for name in names:
        if importlib.util.find_spec(BACKENDS[name].module) is None:
            raise ValueError(f"--report-to {name} needs the {BACKENDS[name].module} package: {_INSTALL}")
    return names


def selected(report_to: str, tensorboard: bool = True) -> tuple[str, ...]:
    """The backends a run uses: ``report_to``'s, less TensorBoard when the older ``--no-tensorboard`` is given."""
    return tuple(name for name in parse_report_to(report_to) if tensorboard or name != "tensorboard")


def open_backends(
    names: Sequence[str],
    run_dir: str,
    *,
    config: Mapping[str, Any],
    resume_step: int,
    echo: Callable[[str], None],
) -> list[Backend]:
    """Open each named backend in order; if one fails, close those already open and raise."""
    record = RunRecord(run_dir)
    opened: list[Backend] = []
    try:
        for name in names:
            opened.append(BACKENDS[name](run_dir, config=config, resume_step=resume_step, record=record, echo=echo))
    except BaseException:
        for backend in opened:
            backend.close()
        raise
    return opened
