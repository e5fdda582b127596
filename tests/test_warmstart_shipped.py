"""The warm starts shipped with ebpo (src/ebpo/train/warmstart_data/<name>) are those of the runs SHIPPED_RUNS
names, and each is used for its key only.

Each shipped file is valid for exactly one cache key: its run's settings,
training problems, ``_VERSION`` and torch/transformers versions.
``test_each_runs_key_is_its_shipped_key`` fails when a code change moves a key
(then re-ship); it runs where the versions are the shipped ones, which is
requirements/lock.txt, CI's main environment. The other tests pretend to have
those versions (or another key), so they run anywhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ebpo.train.trainer as trainer_module
import ebpo.train.warmstart as warmstart
from ebpo.compare import _own_flags
from ebpo.compare import build_parser as compare_parser
from ebpo.models.loading import TinyLlamaSpec, load_policy
from ebpo.tasks.base import Problem
from ebpo.train import cli
from ebpo.train.warmstart import (
    SHIPPED_DIR,
    SHIPPED_RUNS,
    cached_warmstart,
    default_warmstart,
    library_versions,
    run_warmstart,
    train_data_id,
    warmstart_key,
    warmstart_settings,
)

RESHIP = "re-ship the warm starts: python -m ebpo.train.warmstart --ship"
RECORDS = {name: json.loads((SHIPPED_DIR / name / "warmstart.json").read_text()) for name in SHIPPED_RUNS}
SHIPPED = RECORDS["default"]
SHIPPED_VERSIONS = SHIPPED["settings"]["versions"]
LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"

other_versions_skip = pytest.mark.skipif(
    library_versions() != SHIPPED_VERSIONS,
    reason=f"the shipped warm start was made with {SHIPPED_VERSIONS}, this environment has {library_versions()}: "
    "its key differs by design, so the shipped file is not used here; this test runs under requirements/lock.txt "
    "(CI's main environment)",
)


class _Stop(Exception):
    """Raised by a stand-in to stop a run at the point under test."""


def _capture_trainer_call(flags, tmp_path_factory) -> dict:
    """What ``ebpo train <flags>`` passes to cached_warmstart (the run stops there)."""
    captured: dict = {}

    def capture(model, tokenizer, problems, **keywords):
        captured.update(keywords, model=model, tokenizer=tokenizer, problems=problems)
        raise _Stop

    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(_Stop):
        patch.setenv("EBPO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(trainer_module, "cached_warmstart", capture)
        cli.main([*flags, "--out", str(out), "--no-progress", "--threads", "1", "--no-tensorboard"])
    del captured["log"]
    return captured


@pytest.fixture(scope="module", params=list(SHIPPED_RUNS))
def shipped_run(request, tmp_path_factory):
    """(name, what ``ebpo train <its flags>`` passes to cached_warmstart, ``run_warmstart(<its flags>)``)."""
    flags = SHIPPED_RUNS[request.param]
    return request.param, _capture_trainer_call(flags, tmp_path_factory), run_warmstart(flags)


@pytest.fixture(scope="module")
def default_inputs():
    """``default_warmstart()``: the fresh model, tokenizer, problems and keywords that --ship trains."""
    return default_warmstart()


def _settings(tokenizer, keywords) -> dict:
    return warmstart_settings(
        tokenizer, **{k: keywords[k] for k in ("spec", "task_id", "steps", "lr", "batch_size", "seed")}
    )


def test_ship_builds_the_warm_start_that_ebpo_train_does(shipped_run):
    """--ship (run_warmstart of each shipped run's flags) starts from the model, data and settings the trainer
    uses for those flags."""
    name, trainer_call, (model, tokenizer, problems, keywords) = shipped_run
    assert {k: trainer_call[k] for k in keywords} == keywords
    assert [(p.prompt, p.completion_target) for p in trainer_call["problems"]] == [
        (p.prompt, p.completion_target) for p in problems
    ]
    assert _settings(trainer_call["tokenizer"], trainer_call) == _settings(tokenizer, keywords)
    trainer_state, ship_state = trainer_call["model"].state_dict(), model.state_dict()
    assert trainer_state.keys() == ship_state.keys()
    differ = [name for name in ship_state if not torch.equal(trainer_state[name], ship_state[name])]
    assert not differ, (
        f"--ship initialises the model unlike ebpo train ({len(differ)} tensors differ, e.g. {differ[:2]})"
    )


@other_versions_skip
def test_each_runs_key_is_its_shipped_key(shipped_run):
    name, trainer_call, _ = shipped_run
    record = RECORDS[name]
    settings = _settings(trainer_call["tokenizer"], trainer_call)
    changed = sorted(k for k in {*settings, *record["settings"]} if settings.get(k) != record["settings"].get(k))
    differ = ", ".join(changed) or "none, so warmstart._VERSION moved"
    assert warmstart_key(settings) == record["key"], (
        f"ebpo train {' '.join(SHIPPED_RUNS[name])} no longer has the key shipped in {name} "
        f"(settings that differ: {differ}); {RESHIP}"
    )


@other_versions_skip
@pytest.mark.parametrize(
    "compare_flags, name", [([], "default"), (["--pool", "2000"], "pool-2000")], ids=["stream", "pool"]
)
def test_compares_runs_start_from_a_shipped_warm_start(compare_flags, name, tmp_path_factory):
    """The runs of ``ebpo compare`` (default grid, and ``--pool 2000``) warm-start from a shipped file, so the
    figures measured with those commands start from the same weights on every machine."""
    from ebpo.compare import RunSpec, _resolve

    args = _resolve(compare_parser().parse_args(["--methods", "grpo", *compare_flags, "--out", "unused"]))
    flags = _own_flags(RunSpec("grpo", 4, 0), args, Path("unused"))
    flags = flags[: flags.index("--out")]  # the capture sets its own output folder
    call = _capture_trainer_call(flags, tmp_path_factory)
    assert warmstart_key(_settings(call["tokenizer"], call)) == RECORDS[name]["key"], RESHIP


def test_the_shipped_records_are_whole():
    """One folder per shipped run, each with the two files, its key the hash of its settings and its name's flags."""
    folders = sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_dir())
    assert folders == sorted(SHIPPED_RUNS)
    for name, record in RECORDS.items():
        assert sorted(p.name for p in (SHIPPED_DIR / name).iterdir()) == ["model.safetensors", "warmstart.json"]
        assert record["key"] == warmstart_key(record["settings"])
        assert record["train_flags"] == list(SHIPPED_RUNS[name])
        assert record["settings"]["versions"] == SHIPPED_VERSIONS  # every one under the lock


def test_shipped_versions_are_the_locks():
    """The shipped file is made under requirements/lock.txt, so that CI (the lock) runs the key test above."""
    if not LOCK.is_file():
        pytest.skip("no requirements/lock.txt (not a repository checkout)")
    lines = [line.split("#")[0].strip().lower() for line in LOCK.read_text().splitlines()]
    pins = dict(line.split("==", 1) for line in lines if "==" in line)
    locked = {name: pins.get(name) for name in SHIPPED_VERSIONS}
    shipped = {name: version.split("+")[0] for name, version in SHIPPED_VERSIONS.items()}  # the lock drops +cpu
    assert shipped == locked, (
        f"the shipped warm start was made with {SHIPPED_VERSIONS}, the lock has {locked}; {RESHIP}"
    )


@pytest.fixture
def as_shipped(monkeypatch):
    """Pretend this environment has the shipped versions (so the default key is the shipped one)."""
    monkeypatch.setattr(warmstart, "library_versions", lambda: dict(SHIPPED_VERSIONS))


@pytest.fixture
def no_training(monkeypatch):
    """Training the warm start raises _Stop."""

    def refuse(*args, **kwargs):
        raise _Stop("the warm start was trained")

    monkeypatch.setattr(warmstart, "_train_warmstart", refuse)


def test_a_cache_miss_with_a_shipped_key_loads_those_shipped_weights(
    shipped_run, as_shipped, no_training, tmp_path, monkeypatch
):
    """Each shipped run's key finds its own folder among the shipped ones."""
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path))
    name, _, (model, tokenizer, problems, keywords) = shipped_run
    record = RECORDS[name]
    lines: list[str] = []
    loaded, path = cached_warmstart(copy.deepcopy(model), tokenizer, problems, **keywords, log=lines.append)
    assert lines == [
        f"warm start: using the warm start shipped with ebpo (key {record['key']}, "
        f"torch {SHIPPED_VERSIONS['torch']}, transformers {SHIPPED_VERSIONS['transformers']}; cached in {path})"
    ]
    assert Path(path) == tmp_path / "warmstart" / record["key"]
    shipped = load_file(SHIPPED_DIR / name / "model.safetensors")
    state = loaded.state_dict()
    differ = [key for key, tensor in shipped.items() if not torch.equal(state[key], tensor)]
    assert not differ, f"the returned model is not the shipped {name} ({len(differ)} tensors differ, e.g. {differ[:2]})"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert not torch.equal(state["lm_head.weight"], model.state_dict()["lm_head.weight"])  # not the fresh model
    cached = json.loads((Path(path) / "warmstart.json").read_text())
    assert cached["shipped"] is True and cached["versions"] == SHIPPED_VERSIONS
    # The next run reuses the cache it wrote, with the same weights.
    lines.clear()
    reloaded, again = cached_warmstart(copy.deepcopy(model), tokenizer, problems, **keywords, log=lines.append)
    assert again == path and lines == [f"warm start: reusing {path}"]
    assert all(torch.equal(reloaded.state_dict()[key], tensor) for key, tensor in shipped.items())


def test_the_shipped_warm_starts_differ():
    """Two runs, two models: a folder copied over another would pass the key tests but start the pool wrong."""
    digests = {record["sha256"] for record in RECORDS.values()}
    assert len(digests) == len(RECORDS)
    assert len({record["key"] for record in RECORDS.values()}) == len(RECORDS)


@pytest.mark.parametrize(
    "change",
    [
        {
            "versions": {
                **SHIPPED_VERSIONS,
                "transformers": "5.25.0" if SHIPPED_VERSIONS["transformers"] != "5.25.0" else "5.24.0",
            }
        },
        {"steps": 999},
        {"task_id": {"task": "stepwise", "train_problems": 1, "train_sha256": "0" * 64}},
    ],
    ids=["other-versions", "other-steps", "other-data"],
)
def test_another_key_trains_instead(change, default_inputs, as_shipped, no_training, tmp_path, monkeypatch):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path))
    if "versions" in change:
        monkeypatch.setattr(warmstart, "library_versions", lambda: dict(change["versions"]))
    model, tokenizer, problems, keywords = default_inputs
    lines: list[str] = []
    with pytest.raises(_Stop, match="trained"):
        cached_warmstart(
            copy.deepcopy(model),
            tokenizer,
            problems,
            **{**keywords, **{k: v for k, v in change.items() if k != "versions"}},
            log=lines.append,
        )
    assert not any("shipped" in line for line in lines), lines


def test_a_damaged_shipped_file_is_not_used(default_inputs, as_shipped, no_training, tmp_path, monkeypatch):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    damaged = tmp_path / "warmstart_data"
    shutil.copytree(SHIPPED_DIR, damaged)
    weights = bytearray((damaged / "default" / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight
    (damaged / "default" / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.setattr(warmstart, "SHIPPED_DIR", damaged)
    model, tokenizer, problems, keywords = default_inputs
    lines: list[str] = []
    with pytest.raises(_Stop, match="trained"):
        cached_warmstart(copy.deepcopy(model), tokenizer, problems, **keywords, log=lines.append)
    assert lines == [
        f"warning: the shipped warm start {damaged / 'default' / 'model.safetensors'} does not match its sha256 in "
        f"{damaged / 'default' / 'warmstart.json'}; training the warm start"
    ]


def _small_run(flags):
    """A stand-in for run_warmstart: a few steps on a few problems, which depend on the flags (the shipping
    machinery, not the runs)."""
    spec = TinyLlamaSpec()
    model, tokenizer = load_policy("builtin:tiny", device=torch.device("cpu"), dtype="float32", spec=spec, seed=0)
    problems = [Problem(id=str(i), prompt=f"{i}+{len(flags)}=", answer=str(i + len(flags))) for i in range(20)]
    keywords = dict(spec=spec, task_id=train_data_id("t", problems), steps=3, lr=1e-3, batch_size=4, seed=0)
    return model, tokenizer, problems, keywords


def test_ship_writes_a_folder_per_run_that_a_cache_miss_uses(tmp_path, monkeypatch, capsys):
    runs = {"small": (), "other": ("--a-flag", "x")}
    monkeypatch.setattr(warmstart, "SHIPPED_RUNS", runs)
    monkeypatch.setattr(warmstart, "run_warmstart", _small_run)
    monkeypatch.setattr(warmstart, "_lock_mismatch", lambda: None)
    out = tmp_path / "pkg" / "warmstart_data"
    (out / "small").mkdir(parents=True)
    (out / "small" / "stale.json").write_text("{}")  # a previous ship's folder is replaced whole
    (out / "kept").mkdir()  # a folder ship was not asked for is left alone
    assert warmstart.main(["--ship", "--out", str(out)]) == 0  # no names: every run
    printed = capsys.readouterr().out.splitlines()
    keys = {}
    for name, flags in runs.items():
        model, tokenizer, problems, keywords = _small_run(flags)
        keys[name] = warmstart_key(_settings(tokenizer, keywords))
        assert f"shipped warm start {name} ({keys[name]}) in {out / name}" in printed
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "warmstart.json"]
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())
        assert folder.stat().st_mode & 0o777 == 0o755
        record = json.loads((folder / "warmstart.json").read_text())
        assert record["key"] == keys[name] == warmstart_key(record["settings"])
        assert record["train_flags"] == list(flags)
        assert record["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert len(set(keys.values())) == 2
    assert sorted(p.name for p in out.iterdir()) == ["kept", "other", "small"]  # no temporary folder left
    assert sorted(p.name for p in tmp_path.joinpath("pkg").iterdir()) == ["warmstart_data"]
    # A cache miss with either key takes that run's shipped weights, without training.
    monkeypatch.setattr(warmstart, "SHIPPED_DIR", out)
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(warmstart, "_train_warmstart", lambda *a, **k: pytest.fail("trained instead of shipped"))
    for name, flags in runs.items():
        model, tokenizer, problems, keywords = _small_run(flags)
        lines: list[str] = []
        loaded, _ = cached_warmstart(model, tokenizer, problems, **keywords, log=lines.append)
        assert len(lines) == 1
        assert lines[0].startswith(f"warm start: using the warm start shipped with ebpo (key {keys[name]},")
        shipped = load_file(out / name / "model.safetensors")
        assert all(torch.equal(loaded.state_dict()[key], tensor) for key, tensor in shipped.items())


def test_ship_names_one_run_and_refuses_an_unknown_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(warmstart, "SHIPPED_RUNS", {"small": (), "other": ("--a-flag", "x")})
    monkeypatch.setattr(warmstart, "run_warmstart", _small_run)
    monkeypatch.setattr(warmstart, "_lock_mismatch", lambda: None)
    assert warmstart.main(["--ship", "other", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    with pytest.raises(SystemExit) as exit_:
        warmstart.main(["--ship", "pool", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "unknown shipped warm start 'pool'; the shipped ones are small, other" in capsys.readouterr().err


def test_ship_refuses_other_versions_than_the_locks(monkeypatch, capsys):
    monkeypatch.setattr(warmstart, "_lock_mismatch", lambda: "transformers 9.9.9 (lock: 5.24.0)")
    monkeypatch.setattr(warmstart, "ship", lambda *a, **k: pytest.fail("shipped anyway"))
    assert warmstart.main(["--ship"]) == 2
    assert "this environment has transformers 9.9.9 (lock: 5.24.0)" in capsys.readouterr().err


@pytest.mark.slow  # each warm start: 1000 steps, 2-5 minutes on one thread
@other_versions_skip
@pytest.mark.parametrize("name", list(SHIPPED_RUNS))
def test_regenerating_a_shipped_warm_start_gives_the_shipped_weights(name, tmp_path):
    """Bit-identical: same versions, one thread, the same CPU kernels. (Another CPU's kernels may round
    differently; then the file differs while the key does not, and this test says so.)"""
    out = tmp_path / "warmstart_data"
    command = [sys.executable, "-m", "ebpo.train.warmstart", "--ship", name, "--out", str(out), "--threads", "1"]
    result = subprocess.run([*command, "--ignore-lock"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / name / "warmstart.json").read_text())
    assert record["key"] == RECORDS[name]["key"], RESHIP
    regenerated = load_file(out / name / "model.safetensors")
    shipped = load_file(SHIPPED_DIR / name / "model.safetensors")
    assert regenerated.keys() == shipped.keys()
    differ = [key for key in shipped if not torch.equal(regenerated[key], shipped[key])]
    assert not differ, (
        f"same key, other weights ({len(differ)} tensors differ, e.g. {differ[:3]}): if the warm-start procedure "
        f"changed, bump warmstart._VERSION (caches hold the old weights under this key) and {RESHIP}; if this CPU is "
        "not the one that shipped it, its kernels may round differently"
    )
    assert record["sha256"] == RECORDS[name]["sha256"]
