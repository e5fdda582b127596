"""``--report-to``: what TensorBoard, wandb (offline) and mlflow (a local store) hold after a short ``ebpo train``.

Each backend is read back with its own reader (TensorBoard's event
accumulator, the records of wandb's offline run file, mlflow's client) and
compared with ``metrics.jsonl`` and ``config.yaml`` of the same run: the same
metric names at the same steps with the same values, the config once. A
resumed run continues the same wandb / mlflow run and sends no step twice.
No network: wandb runs with ``WANDB_MODE=offline``, mlflow to a directory.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct

import pytest
import yaml

from ebpo.cli import main
from ebpo.train.trackers import mlflow_metric_name, parse_report_to
from ebpo.train.tracking import read_metrics

TINY = [
    "--task",
    "arithmetic",
    "--warmstart-steps",
    "0",
    "--task-options",
    "{num_train: 64, num_eval: 8, max_terms: 1, max_digits: 2}",
    "--prompts-per-step",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "4",
    "--eval-samples",
    "0",
    "--log-every",
    "1",
    "--no-progress",
    "--threads",
    "1",
    "--device",
    "cpu",
]
# Two steps with a checkpoint after each, so a resume can start from step 1 after step 2 was logged.
TWO_STEPS = ["--steps", "2", "--save-every", "1", "--keep-checkpoints", "2", *TINY]


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """No user settings leak in: a session warm-start cache, and none of the trackers' own variables."""
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ebpo-cache"))
    for name in list(os.environ):
        if name.startswith(("WANDB_", "MLFLOW_")):
            monkeypatch.delenv(name)


def _jsonl_points(run_dir) -> dict[tuple[int, str], float]:
    """``{(step, metric): value}`` of metrics.jsonl; no two rows of one step share a metric (checked)."""
    points: dict[tuple[int, str], float] = {}
    for row in read_metrics(str(run_dir / "metrics.jsonl")):
        for key, value in row.items():
            if key != "step":
                assert (row["step"], key) not in points, (row["step"], key)
                points[(row["step"], key)] = value
    return points


def _config(run_dir) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _resume_from_step_1(run_dir) -> None:
    """As if killed after step 2 was logged but before its checkpoint was written."""
    shutil.rmtree(run_dir / "checkpoints" / "step-000002")


# ------------------------------------------------------------------ choices and errors
def test_report_to_parsing():
    assert parse_report_to("tensorboard") == ("tensorboard",)
    assert parse_report_to("wandb, mlflow,wandb") == ("wandb", "mlflow")
    assert parse_report_to("none") == ()
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_report_to("none,wandb")
    with pytest.raises(ValueError, match="one or more of tensorboard, wandb, mlflow"):
        parse_report_to("")


def test_unknown_backend_fails_before_the_run_directory_naming_the_choices(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--report-to", "tensorboard,wandbb", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "one or more of tensorboard, wandb, mlflow (comma-separated), or none" in err and "wandbb" in err
    assert not out.exists()


def test_missing_library_says_which_pip_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    out = tmp_path / "run"
    assert main(["train", "--report-to", "tensorboard,mlflow", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'ebpo train: error: --report-to mlflow needs the mlflow package: pip install "ebpo[track]"'
    assert not out.exists()


# ------------------------------------------------------------------ TensorBoard
@pytest.mark.parametrize("flags", [["--report-to", "none"], ["--no-tensorboard"]], ids=["none", "no-tensorboard"])
def test_none_writes_no_tensorboard(tmp_path, flags):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), *TINY, *flags]) == 0
    assert (out / "metrics.jsonl").is_file()
    assert not (out / "tensorboard").exists() and not (out / "trackers.json").exists()


def test_default_writes_tensorboard_with_the_jsonl_names_and_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *TINY]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = _jsonl_points(out)
    assert {step for step, _ in expected} == {1, 2}
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-30, nan_ok=True)  # TensorBoard stores float32


# ------------------------------------------------------------------ wandb
def _wandb_records(path: str):
    """The protobuf records of a wandb run file: leveldb's log format (32 KiB blocks of chunks, each with a
    7-byte header: crc32, length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4) after a 7-byte ':W&B' header."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_offline_runs(wandb_dir) -> list[dict]:
    """Each offline run under ``wandb_dir``, oldest first: its id, project, name, config, ``{(step, key): value}``."""
    runs = []
    for path in glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb")):
        run: dict = {"config": {}, "points": {}, "rows": 0}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name)
                run["start"] = record.run.start_time.ToNanoseconds()
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            elif kind == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                step = items.pop("_step")
                run["rows"] += 1
                for key, value in items.items():
                    if not key.startswith("_"):  # _timestamp, _runtime: wandb's own
                        run["points"][(step, key)] = value
                continue
            else:
                continue
            run["config"].update({u.key: json.loads(u.value_json) for u in updates if not u.key.startswith("_")})
        runs.append(run)
    return sorted(runs, key=lambda run: run["start"])


def test_wandb_offline_run_holds_the_config_and_the_jsonl_metrics_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "rl-tests")  # overrides the default project 'ebpo'
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    out = tmp_path / "run"
    assert main(["train", "--report-to", "wandb", "--out", str(out), *TWO_STEPS]) == 0
    (first,) = _wandb_offline_runs(out)  # WANDB_DIR unset: under the run directory
    assert (first["project"], first["name"]) == ("rl-tests", "run")
    assert first["config"] == _config(out)
    first_points = _jsonl_points(out)
    assert first["points"] == first_points
    assert first["rows"] == 2  # the final evaluation shares step 2's row

    _resume_from_step_1(out)
    assert main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    earlier, resumed = _wandb_offline_runs(out)
    assert resumed["id"] == first["id"] and earlier["points"] == first["points"]
    assert resumed["config"]["steps"] == 3 and resumed["config"] == _config(out)
    # Step 2 was recomputed from the step-1 checkpoint but not sent again: the run already held it.
    assert {step for step, _ in resumed["points"]} == {3}
    assert resumed["points"] == {p: v for p, v in _jsonl_points(out).items() if p[0] == 3}
    assert json.loads((out / "trackers.json").read_text())["wandb"] == {
        "run_id": first["id"],
        "project": "rl-tests",
        "last_step": 3,
    }


# ------------------------------------------------------------------ mlflow
def _mlflow_run(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    histories = [m for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)]
    points = {(m.step, m.key): m.value for m in histories}
    assert len(points) == len(histories), "a (step, metric) logged twice"
    return run, points


def test_mlflow_local_store_holds_the_config_and_the_jsonl_metrics_and_a_resume_continues_it(tmp_path, monkeypatch):
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a directory store without it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rl-tests")
    out = tmp_path / "run"
    assert main(["train", "--report-to", "mlflow,tensorboard", "--out", str(out), *TWO_STEPS]) == 0
    assert (out / "tensorboard").is_dir()
    run, points = _mlflow_run(uri, "rl-tests")
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    config = _config(out)
    assert set(run.data.params) == set(config)
    for key, value in config.items():  # strings as they are, everything else as JSON
        assert (run.data.params[key] if isinstance(value, str) else json.loads(run.data.params[key])) == value, key
    first_points = _jsonl_points(out)
    assert {step for step, _ in first_points} == {1, 2}
    assert points == first_points  # every name as in metrics.jsonl: none needed mlflow_metric_name's renaming

    _resume_from_step_1(out)
    assert main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    resumed, points = _mlflow_run(uri, "rl-tests")  # still one run: the same one
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.params["steps"] == "2"  # mlflow params are immutable; config.yaml has 3
    expected = {**first_points, **{p: v for p, v in _jsonl_points(out).items() if p[0] == 3}}
    assert points == expected  # step 2 once, with the first attempt's values; step 3 added


def test_mlflow_metric_names_are_made_valid_and_builtin_names_kept(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    assert mlflow_metric_name("adv/zero_signal_frac") == "adv/zero_signal_frac"
    assert mlflow_metric_name("verifier/bad key!") == "verifier/bad key_"
    assert mlflow_metric_name("verifier//..:x") == "verifier/_/.._x"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    run_id = client.create_run(client.create_experiment("names")).info.run_id
    names = [mlflow_metric_name(n) for n in ("verifier/bad key!", "verifier//..:x", "/lead", "a/./b", "x?y#z")]
    client.log_batch(run_id, metrics=[Metric(name, 1.0, 0, 1) for name in names])  # raises on an invalid name


def test_other_ranks_open_no_backend(tmp_path, monkeypatch):
    """The Tracker of a rank other than 0 (``enabled=False``) opens no backend and writes nothing anywhere."""
    from ebpo.train.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker(
        str(run_dir),
        enabled=False,
        report_to=("tensorboard", "wandb", "mlflow"),
        config={"seed": 0},
        resume_step=0,
        echo=print,
    )
    tracker.log(1, {"reward/mean": 0.5})
    tracker.close()
    assert list(run_dir.iterdir()) == [] and not (tmp_path / "mlruns").exists()
