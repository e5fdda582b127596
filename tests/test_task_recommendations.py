"""A task's ``recommended`` settings: applied by ``ebpo train`` over the defaults, under preset, YAML and flags."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ebpo.tasks import stepwise
from ebpo.train.cli import build_parser, main, resolve_config
from ebpo.train.config import TrainConfig


def _resolve(*flags: str, echo=None) -> TrainConfig:
    return resolve_config(build_parser().parse_args(list(flags)), echo=echo)


def test_the_recommendation_applies_when_nothing_sets_the_field():
    config = _resolve("--task", "stepwise", "--method", "grpo")
    for name, value in stepwise.RECOMMENDED.items():
        assert getattr(config, name) == value, name
    assert config.max_new_tokens != TrainConfig.max_new_tokens  # the test would be vacuous otherwise


def test_a_task_without_recommendations_keeps_the_defaults():
    config = _resolve("--task", "arithmetic", "--method", "grpo")
    assert config.max_new_tokens == TrainConfig.max_new_tokens
    assert config.warmstart_steps == TrainConfig.warmstart_steps


def test_a_flag_overrides_the_recommendation_and_the_rest_still_applies():
    config = _resolve("--task", "stepwise", "--max-new-tokens", "30")
    assert config.max_new_tokens == 30
    assert config.warmstart_steps == stepwise.RECOMMENDED["warmstart_steps"]


def test_preset_and_yaml_override_the_recommendation(tmp_path, monkeypatch):
    monkeypatch.setattr(stepwise, "RECOMMENDED", {"loss_agg": "token-mean", "max_new_tokens": 40, "lr": 5e-5})
    path = tmp_path / "c.yaml"
    path.write_text("max_new_tokens: 33\n")
    config = _resolve("--task", "stepwise", "--method", "grpo", "--config", str(path))
    assert config.loss_agg == "seq-mean-token-mean"  # the grpo preset's, not the task's
    assert config.max_new_tokens == 33  # the YAML file's
    assert config.lr == 5e-5  # nothing else sets it: the task's


def test_the_applied_recommendations_are_announced():
    lines: list[str] = []
    _resolve("--task", "stepwise", "--max-new-tokens", "30", echo=lines.append)
    assert len(lines) == 1
    assert lines[0].startswith("task stepwise recommends ")
    assert "warmstart_steps=" in lines[0] and "max_new_tokens=44" not in lines[0]
    assert "overridden by --method/--config/flags: max_new_tokens" in lines[0]


@pytest.mark.parametrize(
    ("recommended", "message"),
    [
        ({"max_new_token": 44}, "did you mean 'max_new_tokens'"),
        ({"max_new_tokens": "many"}, "max_new_tokens must be an integer"),
        ({"task": "arithmetic"}, "may not set ['task']"),
    ],
)
def test_a_bad_recommendation_is_a_clear_error(monkeypatch, recommended, message):
    monkeypatch.setattr(stepwise, "RECOMMENDED", recommended)
    with pytest.raises(ValueError, match="task 'stepwise'") as info:
        _resolve("--task", "stepwise")
    assert message in str(info.value)


def test_the_recommendation_is_printed_and_recorded_in_config_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        stepwise, "RECOMMENDED", {**stepwise.RECOMMENDED, "warmstart_steps": 2, "warmstart_batch_size": 4}
    )
    out = tmp_path / "run"
    flags = [
        "--task",
        "stepwise",
        "--task-options",
        "{num_train: 40, num_eval: 2}",
        "--method",
        "grpo",
        "--steps",
        "1",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--no-tensorboard",
        "--eval-samples",
        "1",
        "--out",
        str(out),
    ]
    assert main(flags) == 0
    assert "task stepwise recommends max_new_tokens=44" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_new_tokens"] == 44 and saved["warmstart_steps"] == 2
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(saved)
