"""The CLIs never run code from a file they are handed and never lose a user's files.

* every loader of a ``.pt`` file refuses a pickle payload (and the payload is shown to be live);
* ``--overwrite`` deletes only a directory that ``ebpo train`` created;
* a corrupt, truncated or missing checkpoint, ``--out`` on a file or an unwritable directory: exit 2, one
  error line, and not one file on disk changed (names, sizes, mtimes and bytes);
* compare, meta, eval and simulate refuse to write into a directory they did not create.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import MINI

from ebpo.cli import main
from ebpo.fileio import MARKER, check_output_dir, load_tensors, make_output_dir, remove_output_dir

TINY = MINI


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint (made once; tests copy it)."""
    out = tmp_path_factory.mktemp("files") / "run"
    os.environ["EBPO_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "ebpo-cache")
    assert main(["train", "--steps", "2", "--save-every", "1", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size, mtime and a hash of the bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        out[str(path.relative_to(root))] = (path.is_dir(), st.st_size if digest else None, st.st_mtime_ns, digest)
    return out


def one_error_line(capsys, prefix: str = "ebpo train: error:") -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix) and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ pickle payloads never run
class Payload:
    """Unpickling this creates directory ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_payload(path: Path, marker: Path, **plain) -> None:
    torch.save({**plain, "evil": Payload(marker)}, path)


def test_the_payload_is_live_under_full_unpickling(tmp_path):
    """Guards the tests below: the same file does run its code when unpickled without weights_only."""
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("name", ["trainer_state.pt", "rng-rank0.pt"])
def test_resume_never_unpickles_a_crafted_checkpoint(run_copy, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    write_payload(run_copy / "checkpoints" / "step-000002" / name, marker, format=2)
    before = snapshot(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert "cannot be loaded safely" in one_error_line(capsys)
    assert not marker.exists()
    assert snapshot(run_copy) == before


def test_trainer_load_never_unpickles(run_copy, tmp_path):
    """The Trainer's own load path (not only the CLI's pre-check) reads with weights_only."""
    from ebpo.train import checkpoint as ckpt
    from ebpo.train.distributed import Dist

    marker = tmp_path / "pwned"
    path = run_copy / "checkpoints" / "step-000002"
    write_payload(path / "trainer_state.pt", marker, format=2)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        ckpt.load_trainer_state(str(path), Dist(rank=0, world=1))
    assert not marker.exists()


def test_meta_resume_never_unpickles(tmp_path, capsys):
    from ebpo import meta

    out, marker = tmp_path / "meta", tmp_path / "pwned"
    out.mkdir()
    write_payload(out / "es_state.pt", marker)
    before = snapshot(out)
    assert meta.main(["--out", str(out), "--resume"]) == 2
    assert "cannot be loaded safely" in one_error_line(capsys, "ebpo meta: error:")
    assert not marker.exists() and snapshot(out) == before


def test_meta_resume_reads_its_own_state(tmp_path, capsys):
    """A finished search written by ebpo meta resumes under weights_only (and writes its final parameters)."""
    from ebpo import meta
    from ebpo.divergences import NeuralMirror
    from ebpo.meta.es import ESConfig, ESState, es_iteration

    out = tmp_path / "meta"
    make_output_dir(out, "ebpo meta")
    argv = ["--out", str(out), "--resume", "--population", "4", "--iterations", "1"]
    config = ESConfig(population=4, iterations=1)
    state = es_iteration(
        ESState.start(NeuralMirror(seed=0).flat_params, config), config, lambda m: [float(-x.sum()) for x in m]
    )
    meta._save_state(
        state, config, out, meta._search_settings(meta._resolve(meta.build_parser().parse_args(argv)), config)
    )
    assert meta.main(argv) == 0
    assert torch.equal(NeuralMirror.load(out / "mirror_params.json").flat_params, NeuralMirror(state.phi).flat_params)


def test_verl_adapter_never_unpickles(tmp_path):
    from ebpo.integrations import verl as adapter

    marker = tmp_path / "pwned"
    write_payload(tmp_path / adapter.STATE_FILE, marker)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        adapter.load_estimator_states(str(tmp_path))
    assert not marker.exists()


def test_old_format_checkpoint_is_refused_with_a_clear_error(run_copy, capsys):
    """What ebpo wrote before checkpoint format 2: numpy RNG arrays, no format key. Never loaded unsafely."""
    path = run_copy / "checkpoints" / "step-000002"
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        path / "rng-rank0.pt",
    )
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert "written by an older ebpo" in one_error_line(capsys)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    del state["format"]
    torch.save(state, path / "trainer_state.pt")
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert "written by an older ebpo" in one_error_line(capsys)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    from ebpo.train.checkpoint import rng_state, set_rng_state

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # a cached gaussian in the numpy state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_tensors(tmp_path / "rng.pt", what="rng"))
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ------------------------------------------------------------------ a bad resume changes nothing
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage\xff" * 50)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _truncate(d / "trainer_state.pt"), "is corrupt or truncated"),
        (lambda d: _garbage(d / "trainer_state.pt"), "is corrupt or truncated"),
        (lambda d: _truncate(d / "rng-rank0.pt"), "is corrupt or truncated"),
        (lambda d: (d / "rng-rank0.pt").unlink(), "does not exist"),
        (lambda d: _truncate(d / "model" / "model.safetensors"), "are corrupt or truncated"),
        (lambda d: _garbage(d / "model" / "model.safetensors"), "are corrupt or truncated"),
        (lambda d: _truncate(d / "model" / "config.json"), "is corrupt or truncated"),
        (lambda d: (d / "model" / "model.safetensors").unlink(), "has no model"),
        (lambda d: shutil.rmtree(d), "no checkpoint in"),
    ],
    ids=[
        "state-truncated",
        "state-garbage",
        "rng-truncated",
        "rng-missing",
        "weights-truncated",
        "weights-garbage",
        "model-config-truncated",
        "weights-missing",
        "no-checkpoint",
    ],
)
def test_bad_checkpoint_fails_in_one_line_and_changes_nothing(run_copy, capsys, damage, message):
    damage(run_copy / "checkpoints" / "step-000002")
    before = snapshot(run_copy)
    assert main(["train", "--resume", str(run_copy), "--steps", "3"]) == 2  # --steps would change config.yaml
    assert message in one_error_line(capsys)
    assert snapshot(run_copy) == before


def test_resume_of_a_missing_directory_or_a_file(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in one_error_line(capsys)
    (tmp_path / "f").write_text("x")
    assert main(["train", "--resume", str(tmp_path / "f")]) == 2
    assert "no such run directory" in one_error_line(capsys)


# ------------------------------------------------------------------ --out and --overwrite
def test_overwrite_never_deletes_a_directory_ebpo_did_not_create(tmp_path, capsys):
    out = tmp_path / "my_project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')")
    before = snapshot(out)
    assert main(["train", "--steps", "1", "--out", str(out), "--overwrite", *TINY]) == 2
    err = one_error_line(capsys)
    assert str(out) in err and "was not created by ebpo" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_out_on_a_file_is_refused_and_the_file_kept(tmp_path, capsys, extra):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    before = snapshot(tmp_path)
    assert main(["train", "--steps", "1", "--out", str(target), *extra, *TINY]) == 2
    assert "is a file, not a directory" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "f" / "run"), *TINY]) == 2
    assert "cannot be created" in one_error_line(capsys)


def test_overwrite_refuses_a_symlink_and_keeps_its_target(tmp_path, capsys):
    target = tmp_path / "elsewhere"
    make_output_dir(target, "ebpo train")
    (target / "config.yaml").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(tmp_path)
    assert main(["train", "--steps", "1", "--out", str(link), "--overwrite", *TINY]) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_an_ebpo_train_directory(tmp_path):
    from ebpo.train.cli import _prepare_run_dir
    from ebpo.train.config import TrainConfig

    ours = tmp_path / "ours"
    make_output_dir(ours, "ebpo train")
    (ours / "metrics.jsonl").write_text("{}")
    assert _prepare_run_dir(TrainConfig(out=str(ours)), resume=False, overwrite=True) == str(ours)
    assert not ours.exists()
    other = tmp_path / "compare"
    make_output_dir(other, "ebpo compare")
    (other / "report.md").write_text("x")
    with pytest.raises(ValueError, match="was created by ebpo compare"):
        _prepare_run_dir(TrainConfig(out=str(other)), resume=False, overwrite=True)
    assert (other / "report.md").exists()


def test_remove_output_dir_never_deletes_root_home_or_the_working_directory(tmp_path, monkeypatch):
    for name in ("home", "cwd"):
        make_output_dir(tmp_path / name, "ebpo train")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    for path in (tmp_path / "home", Path("."), tmp_path / "cwd", tmp_path, Path("/")):
        with pytest.raises(ValueError, match="refusing to delete"):
            remove_output_dir(path, "ebpo train")
    assert (tmp_path / "home" / MARKER).exists() and (tmp_path / "cwd" / MARKER).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        remove_output_dir(tmp_path / "file", "ebpo train")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="was not created by ebpo train"):
        remove_output_dir(tmp_path / "plain", "ebpo train")
    assert (tmp_path / "plain" / "mine.txt").exists()


def test_unwritable_out_directory_is_refused_before_writing(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == parent else real_access(p, mode, **k))
    assert main(["train", "--steps", "1", "--out", str(parent / "run"), *TINY]) == 2
    assert "no write permission" in one_error_line(capsys)
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_directory_really_unwritable(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert main(["train", "--steps", "1", "--out", str(parent / "run"), *TINY]) == 2
        assert "no write permission" in one_error_line(capsys)
    finally:
        parent.chmod(0o700)


def test_a_new_run_directory_is_marked(run_copy):
    from ebpo.fileio import marker_kind

    assert marker_kind(run_copy) == "ebpo train"


# ------------------------------------------------------------------ the other commands' output directories
def _never(*_args, **_kwargs):
    raise AssertionError("the command started working in a directory it should have refused")


def _user_dir(tmp_path: Path) -> Path:
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("report.md", "report.json", "eval.md", "es_log.json", "notes.txt"):
        (out / name).write_text("mine")
    return out


def test_compare_refuses_a_directory_it_did_not_create(tmp_path, capsys, monkeypatch):
    from ebpo import compare

    monkeypatch.setattr(compare, "run_all", _never)
    out = _user_dir(tmp_path)
    before = snapshot(out)
    assert compare.main(["--quick", "--out", str(out)]) == 2
    assert "was not created by ebpo" in capsys.readouterr().err
    assert snapshot(out) == before


def test_meta_refuses_a_directory_it_did_not_create(tmp_path, capsys, monkeypatch):
    from ebpo import meta

    monkeypatch.setattr(meta, "es_iteration", _never)
    out = _user_dir(tmp_path)
    before = snapshot(out)
    assert meta.main(["--quick", "--out", str(out)]) == 2
    assert "was not created by ebpo" in one_error_line(capsys, "ebpo meta: error:")
    assert snapshot(out) == before


def test_eval_refuses_a_directory_it_did_not_create(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ebpo.models.loading.load_policy", _never)
    out = _user_dir(tmp_path)
    before = snapshot(out)
    assert main(["eval", "--model", "builtin:tiny", "--out", str(out)]) == 2
    assert "was not created by ebpo" in one_error_line(capsys, "ebpo eval: error:")
    assert snapshot(out) == before


def test_simulate_refuses_a_directory_or_json_file_it_did_not_write(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ebpo.simulate.run", _never)
    out = _user_dir(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--quick", "--out", str(out)])
    assert exc.value.code == 2 and "was not created by ebpo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--quick", "--out", str(tmp_path / "new"), "--json", str(out / "notes.txt")])
    assert exc.value.code == 2 and "did not write it" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_check_output_dir_allows_new_empty_and_own_directories(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", "ebpo eval")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "ebpo eval")
    make_output_dir(tmp_path / "own", "ebpo eval")
    (tmp_path / "own" / "eval.md").write_text("old")
    check_output_dir(tmp_path / "own", "ebpo eval", reuse=True)
    with pytest.raises(ValueError, match="was created by ebpo eval"):
        check_output_dir(tmp_path / "own", "ebpo simulate", reuse=True)


def test_extra_train_args_are_parsed_as_ebpo_train_parses_them():
    from ebpo.train.cli import check_extra_train_args

    check_extra_train_args(["--seed", "1", "--no-progress"], ["--lr", "0.1", "--steps=3"], "cmd")  # no clash
    with pytest.raises(ValueError, match="bad ebpo train flags in --train-args: unrecognized arguments: --stepz 3"):
        check_extra_train_args(["--seed", "1"], ["--stepz", "3"], "cmd")
    with pytest.raises(ValueError, match="--train-args sets --seed, --steps, which cmd sets itself"):
        check_extra_train_args(
            ["--seed", "1", "--steps", "2"], ["--steps=3", "--seed", "1"], "cmd"
        )  # even to the same value


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--train-args", "--lr ten"], "lr must be a number"),
        (["--group-sizes", "2", "1"], "needs group_size >= 2, got 1"),
        (["--variant", "x", "--stepz 3"], "unrecognized arguments: --stepz 3"),
        # --train-args come last, and the last flag wins: they may not redo what compare sets per run
        (["--train-args", "--seed 3"], "--train-args sets --seed, which ebpo compare sets itself"),
        (["--train-args=--group-size=8 --lr 0.5"], "--train-args sets --group-size, which"),
        (["--train-args=--progress"], "--train-args sets --progress, which"),  # compare passes --no-progress
        (["--methods", "ebpo-running", "--train-args", "--estimator-options '{eps: 1}'"], "sets --estimator-options"),
        (["--variant", "big", "--method grpo --group-size 16"], "--variant big sets --group-size, which ebpo compare"),
    ],
)
def test_compare_checks_every_runs_flags_before_writing(tmp_path, capsys, monkeypatch, argv, needle):
    from ebpo import compare

    monkeypatch.setattr(compare, "run_all", _never)
    assert compare.main(["--quick", "--out", str(tmp_path / "cmp"), *argv]) == 2
    assert needle in one_error_line(capsys, "ebpo compare: error:")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--train-args", "--steps 1.5"], "steps must be an integer"),
        (["--train-args=--task=arithmetic"], "--train-args sets --task, which ebpo meta sets itself"),
        (["--train-args", "--seed 1"], "--train-args sets --seed, which ebpo meta"),
        (["--task-options", "{eval_seed: 3}"], "--task-options may not set ['eval_seed']"),
        (["--task", "dataset"], "task 'dataset' does not take ['eval_seed', 'exclude_eval_seeds']"),
        (["--task", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["--task", "stepwise", "--task-options", "{max_opz: 3}"], "bad options for task 'stepwise'"),
    ],
)
def test_meta_checks_the_members_flags_before_writing(tmp_path, capsys, monkeypatch, argv, needle):
    from ebpo import meta

    monkeypatch.setattr(meta, "es_iteration", _never)
    assert meta.main(["--quick", "--out", str(tmp_path / "meta"), *argv]) == 2
    assert needle in one_error_line(capsys, "ebpo meta: error:")
    assert not (tmp_path / "meta").exists()
