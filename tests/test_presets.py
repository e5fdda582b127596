"""Every ``--method`` preset resolves, through the real config path, to exactly its documented components.

``DOCUMENTED`` is the specification: docs/trainer.md's presets table must
say the same (checked below), and ``ebpo train --method M`` must resolve to
it (defaults < preset < YAML < flags, through ``ebpo.train.cli``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ebpo.train.cli import build_parser, resolve_config
from ebpo.train.presets import list_methods

DOCS = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"

_COLUMNS = (
    "estimator",
    "weighting",
    "loss",
    "loss_agg",
    "eps",
    "divergence",
    "div_coef",
    "dynamic_sampling",
    "overlong",
    "curriculum",
)
_KL = ("kl", {"estimator": "k3"})


def _row(
    estimator,
    loss_agg,
    *,
    weighting=None,
    loss="clip",
    eps=(0.2, 0.2),
    divergence=(None, {}),
    div_coef=0.0,
    dynamic_sampling=False,
    overlong=(0, 1.0),
    curriculum="shuffle",
) -> dict:
    return dict(
        estimator=estimator,
        weighting=weighting,
        loss=loss,
        loss_agg=loss_agg,
        eps=eps,
        divergence=divergence,
        div_coef=div_coef,
        dynamic_sampling=dynamic_sampling,
        overlong=overlong,
        curriculum=curriculum,
    )


DOCUMENTED: dict[str, dict] = {
    "grpo": _row("grpo", "seq-mean-token-mean"),
    "dr_grpo": _row("dr_grpo", "seq-mean-token-sum-norm"),
    # overlong buffer: a fifth of max_new_tokens, 44 // 5 = 8 at the default task's length (stepwise)
    "dapo": _row("grpo", "token-mean", eps=(0.2, 0.28), dynamic_sampling=True, overlong=(8, 1.0)),
    "rloo": _row("rloo", "seq-mean-token-mean"),
    "entropymech": _row("grpo", "token-mean", loss="clip_cov"),
    "ebpo": _row("ebpo", "token-mean", divergence=_KL, div_coef=0.001),
    "ebpo-topic": _row("ebpo", "token-mean", divergence=_KL, div_coef=0.001, curriculum="topic"),
    "ebpo-diff": _row("ebpo", "token-mean", divergence=_KL, div_coef=0.001, curriculum="difficulty"),
    "ha_dw": _row("grpo", "seq-mean-token-mean", weighting="ha_dw"),
    "ebpo+ha_dw": _row("ebpo", "token-mean", weighting="ha_dw", divergence=_KL, div_coef=0.001),
    "gbmpo-probl2": _row("dr_grpo", "seq-mean-token-sum-norm", divergence=("prob_l2", {}), div_coef=0.1),
    "gbmpo-mirror": _row("dr_grpo", "seq-mean-token-sum-norm", divergence=("neural_mirror", {"seed": 0}), div_coef=0.1),
}


def _resolve(argv: list[str]):
    return resolve_config(build_parser().parse_args(argv))


def _components(config) -> dict:
    return dict(
        estimator=config.estimator,
        weighting=config.weighting,
        loss=config.loss,
        loss_agg=config.loss_agg,
        eps=(config.eps_low, config.eps_high),
        divergence=(config.divergence, config.divergence_options),
        div_coef=config.div_coef,
        dynamic_sampling=config.dynamic_sampling,
        overlong=(config.overlong_buffer, config.overlong_penalty),
        curriculum=config.curriculum,
    )


def test_the_table_covers_every_preset():
    assert sorted(DOCUMENTED) == sorted(list_methods())


@pytest.mark.parametrize("method", sorted(DOCUMENTED))
def test_preset_resolves_to_its_documented_components(method):
    config = _resolve(["--method", method])
    assert config.method == method
    assert _components(config) == DOCUMENTED[method]
    # Nothing else leaks in from the defaults or another preset.
    assert config.estimator_options == {} and config.weighting_options == {} and config.loss_options == {}


@pytest.mark.parametrize("method", sorted(DOCUMENTED))
def test_yaml_overrides_the_preset_and_flags_override_the_yaml(method, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"method": method, "loss_agg": "seq-mean-token-sum", "eps_high": 0.3}))
    config = _resolve(["--config", str(path), "--eps-high", "0.25"])
    expected = {**DOCUMENTED[method], "loss_agg": "seq-mean-token-sum", "eps": (DOCUMENTED[method]["eps"][0], 0.25)}
    assert _components(config) == expected


def _cell(column: str, value) -> str:
    if column == "eps" or column == "overlong":
        return f"{value[0]}/{value[1]}"
    if column == "divergence":
        name, options = value
        if name is None:
            return "-"
        return name + (" " + yaml.safe_dump(options, default_flow_style=True).strip() if options else "")
    if column == "dynamic_sampling":
        return "yes" if value else "no"
    if column == "div_coef":
        return f"{value:g}"
    return "-" if value is None else str(value)


def test_docs_presets_table_matches():
    text = DOCS.read_text()
    block = re.search(r"<!-- presets-table -->\n(.*?)<!-- /presets-table -->", text, re.DOTALL)
    assert block, "docs/trainer.md lost its presets table markers"
    rows = [line.strip().strip("|").split("|") for line in block.group(1).strip().splitlines()[2:]]
    documented = {cells[0].strip().strip("`"): [c.strip() for c in cells[1:]] for cells in rows}
    expected = {method: [_cell(c, components[c]) for c in _COLUMNS] for method, components in DOCUMENTED.items()}
    assert documented == expected


def test_dapo_overlong_buffer_is_a_fifth_of_max_new_tokens():
    """DAPO (arXiv 2503.14476) ramps the penalty over the last 4096 of 20480 tokens."""
    from ebpo.train.presets import dapo_overlong_buffer

    cases = {1: 0, 2: 1, 4: 1, 12: 2, 44: 8, 1000: 200, 20480: 4096, 131072: 26214}
    assert {n: dapo_overlong_buffer(n) for n in cases} == cases


def test_dapo_overlong_buffer_scales_with_max_new_tokens(tmp_path):
    """The dapo preset's buffer was a fixed 4 tokens whatever --max-new-tokens: no soft ramp at all at 1k tokens,
    and an invalid config (buffer >= max_new_tokens) at 4. Now derived from max_new_tokens wherever it is set
    (flag, YAML, the task's recommendation); a buffer set by a flag or the YAML file wins."""
    small = ["--task", "arithmetic", "--task-options", "{num_train: 8, num_eval: 4}"]
    for max_new_tokens, buffer in ((4, 1), (1000, 200)):
        config = _resolve(["--method", "dapo", *small, "--max-new-tokens", str(max_new_tokens)])
        assert config.overlong_buffer == buffer
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"method": "dapo", "max_new_tokens": 20480}))
    assert _resolve(["--config", str(path), *small]).overlong_buffer == 4096
    assert _resolve(["--config", str(path), *small, "--overlong-buffer", "3"]).overlong_buffer == 3
    path.write_text(yaml.safe_dump({"method": "dapo", "overlong_buffer": 3, "max_new_tokens": 20480}))
    assert _resolve(["--config", str(path), *small]).overlong_buffer == 3
    # The task's recommended length (stepwise: 44), and other methods keep shaping off.
    assert _resolve(["--method", "dapo"]).overlong_buffer == 8
    assert _resolve(["--method", "grpo", *small, "--max-new-tokens", "1000"]).overlong_buffer == 0
