"""The warm start shipped with ebpo (src/ebpo/train/warmstart_data) is the default run's, and is used for its key only.

The shipped weights are valid for exactly one cache key: ``ebpo train``'s
default settings, training problems, ``_VERSION`` and torch/transformers
versions. ``test_default_runs_key_is_the_shipped_key`` fails when a code change
moves that key (then re-ship); it runs where the versions are the shipped ones,
which is requirements/lock.txt, CI's main environment. The other tests pretend
to have those versions (or another key), so they run anywhere.
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
from ebpo.models.loading import TinyLlamaSpec, load_policy
from ebpo.tasks.base import Problem
from ebpo.train import cli
from ebpo.train.warmstart import (
    SHIPPED_DIR,
    cached_warmstart,
    default_warmstart,
    library_versions,
    train_data_id,
    warmstart_key,
    warmstart_settings,
)

RESHIP = "re-ship the warm start: python -m ebpo.train.warmstart --ship"
SHIPPED = json.loads((SHIPPED_DIR / "warmstart.json").read_text())
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


@pytest.fixture(scope="module")
def trainer_call(tmp_path_factory):
    """What ``ebpo train`` with no settings flags passes to cached_warmstart (the run stops there)."""
    captured: dict = {}

    def capture(model, tokenizer, problems, **keywords):
        captured.update(keywords, model=model, tokenizer=tokenizer, problems=problems)
        raise _Stop

    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(_Stop):
        patch.setenv("EBPO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(trainer_module, "cached_warmstart", capture)
        cli.main(["--out", str(out), "--no-progress", "--threads", "1", "--no-tensorboard"])
    del captured["log"]
    return captured


@pytest.fixture(scope="module")
def default_inputs():
    """``default_warmstart()``: the fresh model, tokenizer, problems and keywords that --ship trains."""
    return default_warmstart()


def _settings(tokenizer, keywords) -> dict:
    return warmstart_settings(
        tokenizer, **{k: keywords[k] for k in ("spec", "task_id", "steps", "lr", "batch_size", "seed")}
    )


def test_ship_builds_the_warm_start_that_ebpo_train_does(trainer_call, default_inputs):
    """--ship (default_warmstart) starts from the model, data and settings the trainer's default run uses."""
    model, tokenizer, problems, keywords = default_inputs
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
def test_default_runs_key_is_the_shipped_key(trainer_call):
    settings = _settings(trainer_call["tokenizer"], trainer_call)
    changed = sorted(k for k in {*settings, *SHIPPED["settings"]} if settings.get(k) != SHIPPED["settings"].get(k))
    differ = ", ".join(changed) or "none, so warmstart._VERSION moved"
    assert warmstart_key(settings) == SHIPPED["key"], (
        f"ebpo train's default warm start no longer has the shipped key (settings that differ: {differ}); {RESHIP}"
    )


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


def test_a_cache_miss_with_the_shipped_key_loads_the_shipped_weights(
    default_inputs, as_shipped, no_training, tmp_path, monkeypatch
):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path))
    model, tokenizer, problems, keywords = default_inputs
    lines: list[str] = []
    loaded, path = cached_warmstart(copy.deepcopy(model), tokenizer, problems, **keywords, log=lines.append)
    assert lines == [
        f"warm start: using the warm start shipped with ebpo (key {SHIPPED['key']}, "
        f"torch {SHIPPED_VERSIONS['torch']}, transformers {SHIPPED_VERSIONS['transformers']}; cached in {path})"
    ]
    assert Path(path) == tmp_path / "warmstart" / SHIPPED["key"]
    shipped = load_file(SHIPPED_DIR / "model.safetensors")
    state = loaded.state_dict()
    differ = [name for name, tensor in shipped.items() if not torch.equal(state[name], tensor)]
    assert not differ, f"the returned model is not the shipped one ({len(differ)} tensors differ, e.g. {differ[:2]})"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert not torch.equal(state["lm_head.weight"], model.state_dict()["lm_head.weight"])  # not the fresh model
    record = json.loads((Path(path) / "warmstart.json").read_text())
    assert record["shipped"] is True and record["versions"] == SHIPPED_VERSIONS
    # The next run reuses the cache it wrote, with the same weights.
    lines.clear()
    reloaded, again = cached_warmstart(copy.deepcopy(model), tokenizer, problems, **keywords, log=lines.append)
    assert again == path and lines == [f"warm start: reusing {path}"]
    assert all(torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in shipped.items())


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
    weights = bytearray((damaged / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight
    (damaged / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.setattr(warmstart, "SHIPPED_DIR", damaged)
    model, tokenizer, problems, keywords = default_inputs
    lines: list[str] = []
    with pytest.raises(_Stop, match="trained"):
        cached_warmstart(copy.deepcopy(model), tokenizer, problems, **keywords, log=lines.append)
    assert lines == [
        f"warning: the shipped warm start {damaged / 'model.safetensors'} does not match its sha256 in "
        f"{damaged / 'warmstart.json'}; training the warm start"
    ]


def _small_default():
    """A stand-in for default_warmstart: a few steps on a few problems (the shipping machinery, not the run)."""
    spec = TinyLlamaSpec()
    model, tokenizer = load_policy("builtin:tiny", device=torch.device("cpu"), dtype="float32", spec=spec, seed=0)
    problems = [Problem(id=str(i), prompt=f"{i}+1=", answer=str(i + 1)) for i in range(20)]
    keywords = dict(spec=spec, task_id=train_data_id("t", problems), steps=3, lr=1e-3, batch_size=4, seed=0)
    return model, tokenizer, problems, keywords


def test_ship_writes_a_folder_that_a_cache_miss_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(warmstart, "default_warmstart", _small_default)
    monkeypatch.setattr(warmstart, "_lock_mismatch", lambda: None)
    folder = tmp_path / "pkg" / "warmstart_data"
    folder.mkdir(parents=True)
    (folder / "stale.json").write_text("{}")  # a previous ship's folder is replaced whole
    assert warmstart.main(["--ship", "--out", str(folder)]) == 0
    model, tokenizer, problems, keywords = _small_default()
    key = warmstart_key(_settings(tokenizer, keywords))
    assert capsys.readouterr().out.splitlines()[-1] == f"shipped warm start {key} in {folder}"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["warmstart_data"]  # no temporary folder left
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "warmstart.json"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir()) and folder.stat().st_mode & 0o777 == 0o755
    record = json.loads((folder / "warmstart.json").read_text())
    assert record["key"] == key == warmstart_key(record["settings"])
    assert record["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    # A cache miss with that key takes the shipped weights, without training.
    monkeypatch.setattr(warmstart, "SHIPPED_DIR", folder)
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(warmstart, "_train_warmstart", lambda *a, **k: pytest.fail("trained instead of shipped"))
    lines: list[str] = []
    loaded, _ = cached_warmstart(model, tokenizer, problems, **keywords, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"warm start: using the warm start shipped with ebpo (key {key},")
    shipped = load_file(folder / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in shipped.items())


def test_ship_refuses_other_versions_than_the_locks(monkeypatch, capsys):
    monkeypatch.setattr(warmstart, "_lock_mismatch", lambda: "transformers 9.9.9 (lock: 5.24.0)")
    monkeypatch.setattr(warmstart, "ship", lambda *a, **k: pytest.fail("shipped anyway"))
    assert warmstart.main(["--ship"]) == 2
    assert "this environment has transformers 9.9.9 (lock: 5.24.0)" in capsys.readouterr().err


@pytest.mark.slow  # the default warm start: 1000 steps, 2-5 minutes on one thread
@other_versions_skip
def test_regenerating_the_shipped_warm_start_gives_the_shipped_weights(tmp_path):
    """Bit-identical: same versions, one thread, the same CPU kernels. (Another CPU's kernels may round
    differently; then the file differs while the key does not, and this test says so.)"""
    folder = tmp_path / "warmstart_data"
    command = [sys.executable, "-m", "ebpo.train.warmstart", "--ship", "--out", str(folder), "--threads", "1"]
    result = subprocess.run([*command, "--ignore-lock"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((folder / "warmstart.json").read_text())
    assert record["key"] == SHIPPED["key"], RESHIP
    regenerated, shipped = load_file(folder / "model.safetensors"), load_file(SHIPPED_DIR / "model.safetensors")
    assert regenerated.keys() == shipped.keys()
    differ = [name for name in shipped if not torch.equal(regenerated[name], shipped[name])]
    assert not differ, (
        f"same key, other weights ({len(differ)} tensors differ, e.g. {differ[:3]}): if the warm-start procedure "
        f"changed, bump warmstart._VERSION (caches hold the old weights under this key) and {RESHIP}; if this CPU is "
        "not the one that shipped it, its kernels may round differently"
    )
    assert record["sha256"] == SHIPPED["sha256"]
