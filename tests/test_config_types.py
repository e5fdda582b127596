"""Every ``ebpo train`` config field is type- and range-checked after YAML and flags, from the field types.

Table-driven: each numeric field gets a boolean, a word and (ints) a fraction, from a YAML file and from a
flag, and a value below its range. Each must exit 2 with one error line naming the field, before anything
is written.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import yaml

from ebpo.cli import main
from ebpo.train.cli import build_parser, resolve_config
from ebpo.train.config import _AT_MOST, _NON_NEGATIVE, _POSITIVE, TrainConfig, coerce_fields, validate

HINTS = typing.get_type_hints(TrainConfig)
INTS = [f.name for f in dataclasses.fields(TrainConfig) if HINTS[f.name] is int]
FLOATS = [f.name for f in dataclasses.fields(TrainConfig) if HINTS[f.name] is float]


@pytest.fixture(autouse=True)
def _never_train(monkeypatch):
    """A configuration that gets past the checks would start training: fail at once instead."""

    def never(*_args, **_kwargs):
        raise AssertionError("the configuration was accepted and training started")

    monkeypatch.setattr("ebpo.train.cli.run", never)


def run_yaml(tmp_path, values: dict, capsys, *flags: str) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values) if isinstance(values, dict) else values)
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "run"), *flags])
    return code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("ebpo train: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_every_numeric_field_has_a_range():
    """A new int/float field must say its range (add it to _POSITIVE or _NON_NEGATIVE)."""
    assert set(INTS + FLOATS) <= set(_POSITIVE) | set(_NON_NEGATIVE), sorted(
        set(INTS + FLOATS) - set(_POSITIVE) - set(_NON_NEGATIVE)
    )
    assert set(_POSITIVE) | set(_NON_NEGATIVE) | set(_AT_MOST) <= set(INTS + FLOATS)  # no stale names


@pytest.mark.parametrize("name", INTS + FLOATS)
@pytest.mark.parametrize("bad", [True, "ten"], ids=["bool", "word"])
def test_non_numbers_are_rejected_from_yaml(tmp_path, capsys, name, bad):
    expected = "must be an integer" if name in INTS else "must be a number"
    assert_one_line(*run_yaml(tmp_path, {name: bad}, capsys), name, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", INTS)
def test_fractional_ints_are_rejected_from_yaml_and_flags(tmp_path, capsys, name):
    assert_one_line(*run_yaml(tmp_path, {name: 1.5}, capsys), name, "must be an integer (a whole number), got 1.5")
    code = main(["train", "--out", str(tmp_path / "run"), f"--{name.replace('_', '-')}", "1.5"])
    assert_one_line(code, capsys.readouterr().err.strip(), name, "whole number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", INTS + FLOATS)
def test_values_below_the_range_are_rejected(tmp_path, capsys, name):
    low = 0 if name in _POSITIVE else -1
    needle = f"{name} must be > 0" if name in _POSITIVE else f"{name} must be >= 0"
    assert_one_line(*run_yaml(tmp_path, {name: low}, capsys), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("values", "needles"),
    [
        ({"max_new_tokens": 100_000_000}, ["max_new_tokens must be <= 131072"]),
        ({"max_new_tokens": 64}, ["max_new_tokens (64) must be smaller than the model's context length (64"]),
        ({"group_size": 100_000}, ["group_size must be <= 4096"]),
        ({"top_p": 1.5}, ["top_p must be <= 1.0"]),
        ({"eps_low": 1.0}, ["eps_low must be < 1"]),
        ("lr: .nan\n", ["lr must be a finite number"]),
        ({"lr": float("inf")}, ["lr must be a finite number"]),
        ({"stpes": 3}, ["unknown field(s) 'stpes' (did you mean 'steps'?)"]),
        ({"task": 5}, ["task must be a string, got 5"]),
        ({"verifier": 5}, ["verifier must be a string or none"]),
        ({"task_options": [1, 2]}, ["task_options must be a mapping"]),
        ({"tensorboard": "yes"}, ["tensorboard must be true or false"]),
        ({"method": "grpoo"}, ["method must be one of"]),
        ("steps: [1", ["is not valid YAML"]),
        ("- 1\n- 2\n", ["must hold a mapping"]),
    ],
    ids=lambda v: str(v)[:30],
)
def test_other_bad_values_are_rejected(tmp_path, capsys, values, needles):
    assert_one_line(*run_yaml(tmp_path, values, capsys), *needles)
    assert not (tmp_path / "run").exists()


def _resolved(tmp_path, text: str, *flags: str) -> TrainConfig:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return resolve_config(build_parser().parse_args(["--config", str(path), *flags]))


def test_yaml_exponent_numbers_are_floats_and_integral_numbers_ints(tmp_path):
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # PyYAML (YAML 1.1) reads it as a string
    config = _resolved(tmp_path, "lr: 1e-4\nwarmstart_lr: 3E-3\nsteps: 1e3\nprompts_per_step: 8.0\ntemperature: 1\n")
    assert config.lr == 1e-4 and type(config.lr) is float
    assert config.warmstart_lr == 3e-3
    assert config.steps == 1000 and type(config.steps) is int
    assert config.prompts_per_step == 8 and type(config.prompts_per_step) is int
    assert config.temperature == 1.0 and type(config.temperature) is float
    validate(config)


def test_flags_are_checked_like_yaml(tmp_path, capsys):
    config = _resolved(tmp_path, "lr: 0.5\n", "--lr", "1e-4", "--steps", "7")
    assert config.lr == 1e-4 and config.steps == 7  # flags win over the file
    for flags, needle in [
        (["--steps", "ten"], "steps must be an integer"),
        (["--lr", "nan"], "lr must be a number"),
        (["--top-p", "0"], "top_p must be > 0"),
    ]:
        code = main(["train", "--out", str(tmp_path / "run"), *flags])
        assert_one_line(code, capsys.readouterr().err.strip(), needle)


def test_resume_flags_are_checked_too(tmp_path, capsys):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(TrainConfig())))
    code = main(["train", "--resume", str(run), "--steps", "1.5"])
    assert_one_line(code, capsys.readouterr().err.strip(), "steps must be an integer")


def test_validate_rejects_wrong_types_built_in_code():
    with pytest.raises(ValueError, match="steps must be an integer"):
        validate(TrainConfig(steps=1.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be an integer"):
        validate(TrainConfig(steps=True))
    with pytest.raises(ValueError, match="lr must be a number"):
        validate(TrainConfig(lr="1e-4"))  # type: ignore[arg-type]
    validate(TrainConfig(lr=1))  # an int where a float is expected is fine
    assert coerce_fields({"lr": "1e-4"}) == {"lr": 1e-4}
    assert math.isclose(coerce_fields({"top_p": ".5"})["top_p"], 0.5)
