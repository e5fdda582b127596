"""ebpo meta: the ES search over the mirror map runs members through ebpo train, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from ebpo.divergences import NeuralMirror
from ebpo.meta import main

TINY = [
    "--task",
    "arithmetic",
    "--population",
    "4",
    "--inner-steps",
    "3",
    "--eval-problems",
    "32",
    "--workers",
    "2",
    "--sigma",
    "2.0",
    "--min-improvement",
    "-1",
    "--train-args",
    "--prompts-per-step 4 --group-size 2 --warmstart-steps 150 --warmstart-batch-size 64 "
    "--eval-samples 4 --max-new-tokens 6 --div-coef 20 --lr 0.002",
]


@pytest.mark.slow
def test_search_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("EBPO_CACHE_DIR", str(tmp_path / "cache"))
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*TINY, "--iterations", "2", "--out", str(straight)]) == 0
    assert main([*TINY, "--iterations", "1", "--out", str(split)]) == 0  # "killed" after iteration 1
    assert main([*TINY, "--iterations", "2", "--out", str(split)]) == 2  # refuses to overwrite a search
    assert main([*TINY, "--iterations", "2", "--out", str(split), "--resume"]) == 0
    a = NeuralMirror.load(straight / "mirror_params.json").flat_params
    b = NeuralMirror.load(split / "mirror_params.json").flat_params
    assert torch.equal(a, b)
    assert not torch.equal(a, NeuralMirror(seed=0).flat_params)  # the search moved phi
    log = json.loads((straight / "es_log.json").read_text())
    assert [h["evaluated"] for h in log["history"]] == [4, 4] and all(h["failed"] == 0 for h in log["history"])
    assert (straight / "fitness.png").stat().st_size > 1000
    # the learned map is a valid (convex) mirror map: D >= 0 on a grid of (p, p_ref)
    grid = torch.linspace(0.01, 1.0, 40, dtype=torch.float64)
    p, q = torch.meshgrid(grid, grid, indexing="ij")
    assert float(NeuralMirror.load(straight / "mirror_params.json")(p.log(), q.log()).min()) >= 0


def test_grid_check_reports_a_non_convex_map():
    from ebpo.meta import min_divergence_on_grid

    convex = NeuralMirror(seed=0)
    assert min_divergence_on_grid(convex) >= 0.0
    concave = NeuralMirror(-convex.flat_params, project_nonneg=False)  # every h' term flips sign: h is concave
    assert min_divergence_on_grid(concave) < 0.0


@pytest.mark.parametrize("task", ["stepwise", "arithmetic"])
def test_members_validate_on_a_split_the_final_evaluation_never_sees(tmp_path, task):
    """Members train ``--task`` (default: ebpo train's) with its options, on exactly the final runs' training
    problems (so one warm start serves both), scored on a validation split disjoint from the final held-out set,
    which stays out of training, whatever ``--eval-problems`` is."""
    from ebpo.meta import VALIDATION_SEED, _member_command, _resolve, build_parser
    from ebpo.tasks.build import DEFAULT_TASK, build_task
    from ebpo.train.cli import build_parser as train_parser
    from ebpo.train.cli import resolve_config

    argv = ["--quick", "--task-options", "{seed: 5}"] + ([] if task == DEFAULT_TASK else ["--task", task])
    args = _resolve(build_parser().parse_args(argv))
    config = resolve_config(train_parser().parse_args(_member_command(args, tmp_path / "m.json", tmp_path / "m")[4:]))
    assert config.task == task and config.task_options["seed"] == 5 and config.max_eval_problems == 64

    def prompts(problems):
        return [p.prompt for p in problems]

    member = build_task(task, config.task_options)
    final = build_task(task, {"seed": 5, "exclude_eval_seeds": [VALIDATION_SEED]})  # the final run meta prints
    scored = prompts(member.eval_problems())[: config.max_eval_problems]  # what a member's accuracy averages over
    validation = set(scored)
    assert len(scored) == 64 and not validation & set(prompts(final.eval_problems()))
    assert prompts(member.train_problems()) == prompts(final.train_problems())
    assert not set(prompts(member.train_problems())) & (validation | set(prompts(final.eval_problems())))


def _saved_search(out, argv):
    """A one-iteration search saved by ebpo meta with ``argv`` (members scored by a stand-in fitness)."""
    from ebpo import meta
    from ebpo.fileio import make_output_dir
    from ebpo.meta.es import ESConfig, ESState, es_iteration

    args = meta._resolve(meta.build_parser().parse_args([*argv, "--out", str(out)]))
    config = ESConfig(population=args.population, iterations=1)
    make_output_dir(out, "ebpo meta")
    state = es_iteration(
        ESState.start(NeuralMirror(seed=0).flat_params, config), config, lambda m: [float(-x.sum()) for x in m]
    )
    meta._save_state(state, config, out, meta._search_settings(args, config))


@pytest.mark.parametrize(
    ("changed", "needle"),
    [
        (["--task", "arithmetic"], "task ('stepwise' -> 'arithmetic')"),
        (["--population", "6"], "population (4 -> 6)"),
        (["--inner-steps", "7"], "inner_steps (10 -> 7)"),
        (["--train-args", "--lr 0.1"], "train_args ([] -> ['--lr', '0.1'])"),
        (["--task-options", "{seed: 3}"], "task_options ({} -> {'seed': 3})"),
    ],
)
def test_resume_refuses_other_settings_than_the_search_was_started_with(tmp_path, capsys, monkeypatch, changed, needle):
    """A resumed search only ends as the uninterrupted one would if nothing but its length changes."""
    from ebpo import meta

    out = tmp_path / "search"
    _saved_search(out, ["--quick"])

    def never(*_args, **_kwargs):
        raise AssertionError("a refused resume trained members")

    monkeypatch.setattr(meta, "es_iteration", never)
    before = (out / "es_state.pt").read_bytes()
    assert meta.main(["--quick", "--out", str(out), "--resume", *changed]) == 2
    err = capsys.readouterr().err
    assert "--resume with other settings" in err and needle in err, err
    assert (out / "es_state.pt").read_bytes() == before
    # extending it is what --resume is for
    assert meta.main(["--quick", "--out", str(out), "--resume", "--iterations", "1", "--patience", "9"]) == 0


@pytest.mark.parametrize(
    "bad", [{"settings": "[1, 2]"}, {"settings": "not json"}, {"config": [1, 2]}, {"settings": torch.zeros(2)}]
)
def test_resume_of_a_state_with_crafted_settings_is_refused_not_a_traceback(tmp_path, capsys, bad):
    from ebpo import meta

    out = tmp_path / "search"
    _saved_search(out, ["--quick"])
    saved = torch.load(out / "es_state.pt", weights_only=True)
    torch.save({**saved, **bad}, out / "es_state.pt")
    assert meta.main(["--quick", "--out", str(out), "--resume"]) == 2
    assert "is not a search state written by ebpo meta" in capsys.readouterr().err
