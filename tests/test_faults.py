"""Runs that survive what real runs meet: kills during a save, signals, a second process, full disks, bad inputs.

Faults are injected in-process where the fault is a function's failure (a kill is a ``BaseException`` raised at
a chosen instant of a save, so no cleanup code of ours runs, as with SIGKILL; a full disk is ``OSError(ENOSPC)``
from a write); real processes are used where a process is the point: SIGTERM and SIGINT, SIGKILL in the middle
of a save, a lock held by a live process and by a dead one. Every test uses one tiny finished run, copied.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from runs import MINI

from ebpo.cli import main
from ebpo.train import checkpoint as ckpt
from ebpo.train.distributed import Dist
from ebpo.train.tracking import read_metrics

# a moving estimator state, so a resume that lost it would show in the metrics
TINY = [*MINI, "--estimator-options", "{prior: running}"]
STEPS = ["--steps", "3", "--save-every", "1", "--keep-checkpoints", "5"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-step run with checkpoints at steps 1, 2 and 3 (made once; tests copy it)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    os.environ["EBPO_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "ebpo-cache")
    assert main(["train", "--out", str(out), *STEPS, "--seed", "4", *TINY]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock columns."""
    return [
        {k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(str(run_dir / "metrics.jsonl"))
    ]


def entries(run_dir: Path) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


def one_line(text: str, prefix: str = "ebpo train: error:") -> str:
    text = text.strip()
    assert text.startswith(prefix) and "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------ 1. a kill at any instant of a save
class Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no ``except Exception``/``OSError`` cleanup of ours runs."""


def kill_at(monkeypatch, owner, name: str, nth: int = 1, *, after: bool = False) -> None:
    """Raise :class:`Killed` at the ``nth`` call of ``owner.name`` (before it runs, or ``after`` it ran)."""
    original, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            raise Killed(name)
        result = original(*args, **kwargs)
        if calls[0] == nth:
            raise Killed(name)
        return result

    monkeypatch.setattr(owner, name, wrapper)


def _policy(run_dir: Path):
    from ebpo.models.loading import load_policy

    return load_policy(str(run_dir / "checkpoints" / "step-000003" / "model"), device=torch.device("cpu"))


def _save(run_dir: Path, step: int, model, tokenizer) -> None:
    state = torch.load(run_dir / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=True)
    state.pop("world"), state.pop("format")
    ckpt.save_checkpoint(
        str(run_dir), step, model=model, tokenizer=tokenizer, trainer_state={**state, "step": step}, dist=Dist(), keep=2
    )


# Every call of a save that changes the disk, in order; a kill lands before one of them, after it, or (for
# torch.save) after half its file was written. Enumerated until a save runs through with no kill left to land.
_STEPS_OF_A_SAVE = [
    (torch, "save"),
    (os, "makedirs"),
    (os, "rename"),
    (shutil, "rmtree"),
    (ckpt, "fsync_tree"),
    (ckpt, "fsync_dir"),
]


def _instrument(monkeypatch, model, tokenizer, target: int, mode: str) -> list[str]:
    """Wrap every step of a save with one shared counter; the ``target``-th call is killed (``mode``)."""
    seen: list[str] = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(name)
            here = len(seen) == target
            if here and mode == "before":
                raise Killed(name)
            result = original(*args, **kwargs)
            if here and mode == "torn" and name == "save":
                path = Path(args[1])
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            if here:
                raise Killed(name)
            return result

        monkeypatch.setattr(owner, name, wrapper)

    for owner, name in _STEPS_OF_A_SAVE:
        wrap(owner, name)
    wrap(model, "save_pretrained")
    wrap(tokenizer, "save_pretrained")
    return seen


def _complete(path: Path) -> int:
    """The step of the complete checkpoint at ``path``; -1 when it is not complete."""
    try:
        return ckpt.check_checkpoint_dir(str(path), 1)["step"]
    except ValueError:
        return -1


@pytest.mark.parametrize("resave", [True, False], ids=["re-save-of-the-same-step", "new-step"])
def test_a_kill_at_any_instant_of_a_save_leaves_a_complete_checkpoint(finished, tmp_path, monkeypatch, resave):
    """Exhaustive over the save's disk-changing calls: whatever instant the kill lands on, the resume finds a
    complete checkpoint at least as new as the last one (never falls back to step 2), and settling it leaves
    ``step-N`` folders only (no .tmp or .old)."""
    step = 3 if resave else 4
    model, tokenizer = _policy(finished)
    source = tmp_path / "source"  # what a save touches: the checkpoints and the run's marker
    (source / "checkpoints").mkdir(parents=True)
    for name in ("step-000002", "step-000003"):
        shutil.copytree(finished / "checkpoints" / name, source / "checkpoints" / name)
    landed: list[str] = []
    for target in range(1, 200):
        modes, killed = ["before", "after", "torn"], None
        while modes:
            mode = modes.pop(0)
            run = tmp_path / f"{target}-{mode}"
            shutil.copytree(source, run)
            seen = _instrument(monkeypatch, model, tokenizer, target, mode)
            try:
                _save(run, step, model, tokenizer)
            except Killed as exc:
                killed = str(exc)
            monkeypatch.undo()
            if killed is None:
                break
            if mode == "before" and killed != "save":
                modes.remove("torn")  # only torch.save's file can be left half-written by our own call
            landed.append(f"{mode} {killed} #{target}")
            # What the save itself guarantees: a complete copy of step >= 3 under a name a save renames into
            # place (step-N, or .step-N.old mid-swap), without the resume's rescue of a complete .tmp.
            placed = [e for e in entries(run) if e.startswith("step-") or e.endswith(".old")]
            assert any(_complete(run / "checkpoints" / e) >= 3 for e in placed), (landed[-1], entries(run))
            path, _ = ckpt.resumable_checkpoint(str(run), 1)
            assert ckpt.check_checkpoint_dir(path, 1)["step"] >= 3, (landed[-1], entries(run))
            settled = ckpt.settle_checkpoints(str(run), 1, echo=lambda _: None)
            ckpt.check_checkpoint_dir(settled, 1)
            assert not [e for e in entries(run) if e.startswith(".")], (landed[-1], entries(run))
            shutil.rmtree(run)
        if killed is None:  # the save ran through with no call left to kill: every instant has been tried
            assert len(seen) == target - 1
            break
    assert len(landed) >= 20, landed
    assert any("rename" in k for k in landed) and any("save_pretrained" in k for k in landed), landed


def test_resume_skips_a_corrupt_newest_checkpoint_names_it_and_deletes_nothing_it_did_not_create(run, finished, capsys):
    weights = run / "checkpoints" / "step-000003" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk in an older ebpo
    (run / "checkpoints" / ".step-000004.tmp").mkdir()  # what a save killed part-way leaves
    (run / "checkpoints" / "notes").mkdir()  # the user's, not ours: kept
    (run / "checkpoints" / ".mine.tmp").mkdir()  # a folder whose name is not one a save makes: kept too
    (run / "checkpoints" / ".mine.tmp" / "keep.txt").write_text("keep")
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "warning: skipped checkpoint step-000003 (model weights" in out and "are corrupt or truncated" in out
    assert "moved it aside to step-000003.corrupt, resuming from step-000002" in out
    assert entries(run) == [".mine.tmp", "notes", "step-000001", "step-000002", "step-000003", "step-000003.corrupt"]
    assert rows(run) == rows(finished)  # step 3 recomputed from step 2 equals the original


def test_sigkill_between_the_two_renames_of_a_re_save_then_resume(run):
    """A real SIGKILL in the window that once lost the only checkpoint: a re-save of step 3 has moved the old
    copy aside and not yet renamed the new one in. The resume restores a complete step 3 and finishes."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from ebpo.models.loading import load_policy
        from ebpo.train import checkpoint as ckpt
        from ebpo.train.distributed import Dist

        run = {str(run)!r}
        model, tokenizer = load_policy(run + "/checkpoints/step-000003/model", device=torch.device("cpu"))
        state = torch.load(run + "/checkpoints/step-000003/trainer_state.pt", weights_only=True)
        state.pop("world"), state.pop("format")
        rename = os.rename

        def rename_then_die(src, dst):
            rename(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)

        os.rename = rename_then_die
        ckpt.save_checkpoint(run, 3, model=model, tokenizer=tokenizer, trainer_state=state, dist=Dist(), keep=5)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "step-000003" not in entries(run) and {".step-000003.old", ".step-000003.tmp"} <= set(entries(run))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "step-000003" in entries(run) and not [e for e in entries(run) if e.startswith(".")]


# ------------------------------------------------------------------ 3. SIGTERM and SIGINT
LONG = ["--steps", "10", "--save-every", "0", "--seed", "6", *TINY]  # save-every 0: only the stop saves a checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, finished) -> Path:
    out = tmp_path_factory.mktemp("faults") / "full"
    assert main(["train", "--out", str(out), *LONG]) == 0
    return out


def test_sigterm_saves_stops_in_one_line_and_the_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebpo", "train", "--out", str(stopped), *LONG],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (stopped / "metrics.jsonl").is_file() or not (stopped / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    step = len(rows(stopped))
    assert 1 <= step < 10, "the run finished before the signal landed"
    last = out.strip().splitlines()[-1]
    assert last == f"stopped by SIGTERM at step {step}; resume with: ebpo train --resume {stopped}"
    assert "Traceback" not in err and "SIGTERM received" in err
    assert entries(stopped) == [f"step-{step:06d}"]  # the stop saved its step; --save-every 0 saved nothing else
    assert not (stopped / "summary.json").exists()
    assert main(["train", "--resume", str(stopped)]) == 0
    assert rows(stopped) == rows(uninterrupted)  # steps step+1 .. 10 recomputed equal the uninterrupted ones
    a = torch.load(stopped / "checkpoints" / "step-000010" / "trainer_state.pt", weights_only=True)
    b = torch.load(uninterrupted / "checkpoints" / "step-000010" / "trainer_state.pt", weights_only=True)
    assert a["estimator"] == b["estimator"] and a["stream"] == b["stream"]
    from safetensors.torch import load_file

    wa, wb = (
        load_file(d / "checkpoints" / "step-000010" / "model" / "model.safetensors") for d in (stopped, uninterrupted)
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wb)  # the same policy, bit for bit


@pytest.fixture
def sigint_as_at_a_terminal():
    """SIGINT with Python's default handler for the test, restored after. A process started in the background by a
    non-interactive shell (``cmd &``, as a CI script may be) inherits SIGINT ignored, and ebpo train rightly leaves
    an inherited SIG_IGN alone (test below); the stop under test is the one a terminal's Ctrl-C gives."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_at_a_chosen_step_saves_exits_130_and_resumes_to_the_same_metrics(
    uninterrupted, tmp_path, monkeypatch, capsys, sigint_as_at_a_terminal
):
    """Ctrl-C in-process, delivered during step 4's logging: the step finishes, is saved, and the run stops."""
    from ebpo.train.tracking import Tracker

    log = Tracker.log

    def log_then_interrupt(self, step, metrics):
        log(self, step, metrics)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Tracker, "log", log_then_interrupt)
    stopped = tmp_path / "stopped"
    assert main(["train", "--out", str(stopped), *LONG]) == 130
    captured = capsys.readouterr()
    assert (
        captured.out.strip().splitlines()[-1]
        == f"stopped by SIGINT at step 4; resume with: ebpo train --resume {stopped}"
    )
    assert "Traceback" not in captured.err
    monkeypatch.undo()
    assert entries(stopped) == ["step-000004"] and len(rows(stopped)) == 4
    assert main(["train", "--resume", str(stopped)]) == 0
    assert rows(stopped) == rows(uninterrupted)


def test_an_inherited_ignored_sigint_stays_ignored():
    """nohup and background jobs start with SIGINT ignored: StopSignals installs no handler over that choice (and
    restores nothing it did not change); SIGTERM, not ignored, is handled and restored."""
    from ebpo.train.procs import StopSignals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            os.kill(os.getpid(), signal.SIGINT)  # ignored: no record, no KeyboardInterrupt
            time.sleep(0.05)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == term
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------ 2. a second process on a live run
def test_a_live_lock_holder_refuses_resume_overwrite_and_compare_and_a_dead_ones_lock_is_taken_over(
    run, tmp_path, capsys
):
    from ebpo.fileio import LOCK_FILE

    other = tmp_path / "compare"
    compare_args = ["--methods", "grpo", "--group-sizes", "2", "--seeds", "1", "--steps", "1", "--out", str(other)]
    holder = subprocess.Popen(  # a live holder of both directories' locks, as a running train and compare would be
        [
            sys.executable,
            "-c",
            "import sys; from ebpo.fileio import RunLock, make_output_dir; "
            f"RunLock({str(run)!r}, 'ebpo train').acquire(); make_output_dir({str(other)!r}, 'ebpo compare'); "
            f"RunLock({str(other)!r}, 'ebpo compare').acquire(); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in run.rglob("*"))
        for argv, prefix in [
            (["train", "--resume", str(run)], "ebpo train: error:"),
            (["train", "--out", str(run), "--overwrite", *STEPS, *TINY], "ebpo train: error:"),
            (["compare", *compare_args], "ebpo compare: error:"),
        ]:
            assert main(argv) == 2, argv
            err = one_line(capsys.readouterr().err, prefix)
            assert f"PID {holder.pid}" in err and ("in use" in err or "still going" in err), err
        assert sorted(p.name for p in run.rglob("*")) == before  # nothing deleted or written under the live run
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, naming a dead process
        holder.wait()
    assert (run / LOCK_FILE).is_file() and str(holder.pid) in (run / LOCK_FILE).read_text()
    assert main(["train", "--resume", str(run)]) == 0  # the kernel released the dead holder's lock: taken over
    assert not (run / LOCK_FILE).exists()  # released (and removed) when the run ended


def test_compare_and_meta_pass_a_signal_to_their_running_jobs_and_start_no_more(tmp_path):
    """run_parallel (under compare and meta): SIGTERM to the parent reaches each running child once, no pending
    job starts, and Stopped carries exit status 143 once the children have stopped."""
    import threading

    from ebpo.train.procs import Stopped, run_parallel

    child = (
        "import pathlib, signal, sys, time\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "def stop(signum, frame):\n"
        "    out.write_text(out.read_text() + signal.Signals(signum).name + ' ')\n"
        "    sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "out.write_text('')\n"
        "time.sleep(60)\n"
    )
    jobs = [
        (f"job{i}", [sys.executable, "-c", child, str(tmp_path / f"job{i}")], tmp_path / f"job{i}.log")
        for i in range(3)
    ]

    def signal_once_both_run():
        while not all((tmp_path / f"job{i}").exists() for i in range(2)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_both_run, daemon=True).start()
    codes = {}
    with pytest.raises(Stopped) as stopped:
        run_parallel(jobs, 2, on_done=lambda name, code, seconds: codes.update({name: code}), echo=lambda _: None)
    assert stopped.value.exit_code == 143
    assert codes == {"job0": 143, "job1": 143}  # each stopped on the signal passed on ...
    assert [(tmp_path / f"job{i}").read_text() for i in range(2)] == ["SIGTERM ", "SIGTERM "]  # ... exactly once
    assert not (tmp_path / "job2").exists()  # the pending job never started


def test_compare_and_meta_stop_in_one_line_with_the_signals_exit_status(tmp_path, monkeypatch, capsys):
    from ebpo import compare, meta
    from ebpo.train.procs import Stopped

    def stopped(*args, **kwargs):
        raise Stopped(signal.SIGTERM)

    monkeypatch.setattr(compare, "run_parallel", stopped)
    monkeypatch.setattr(meta, "run_parallel", stopped)
    argv = ["--methods", "grpo", "--group-sizes", "2", "--seeds", "1", "--steps", "1", "--out", str(tmp_path / "c")]
    assert compare.main(argv) == 143
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ebpo compare: stopped by SIGTERM; rerun")
    argv = ["--quick", "--out", str(tmp_path / "m")]
    assert meta.main(argv) == 143
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("ebpo meta: stopped by SIGTERM in iteration 1") and "--resume" in last
    assert not (tmp_path / "c" / ".ebpo-lock").exists() and not (tmp_path / "m" / ".ebpo-lock").exists()


# ------------------------------------------------------------------ 4. a full disk
def _no_tmp_anywhere(run_dir: Path) -> bool:
    return not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_during_a_save_says_where_and_keeps_the_last_checkpoint(finished, tmp_path, monkeypatch, capsys):
    """torch's zip writer on a full disk raises RuntimeError('... unexpected pos'); the step-2 save fails."""
    calls = [0]
    save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # step 1 wrote rng (1) and state (2); step 2 its rng (3), then its state (4)
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 254")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), *STEPS, "--seed", "4", *TINY]) == 1
    err = one_line(capsys.readouterr().err)
    assert ".step-000002.tmp/trainer_state.pt: [enforce fail" in err and "free on its filesystem" in err, err
    assert f"the last complete checkpoint is {run_dir / 'checkpoints' / 'step-000001'}" in err
    assert f"resume with: ebpo train --resume {run_dir}" in err
    assert entries(run_dir) == ["step-000001"] and _no_tmp_anywhere(run_dir)
    ckpt.check_checkpoint_dir(str(run_dir / "checkpoints" / "step-000001"), 1)
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0  # space freed: the run continues as if never stopped
    assert rows(run_dir) == rows(finished)


@pytest.mark.parametrize("how", ["short-write", "raises-after-part"])
def test_a_full_disk_during_a_metrics_write_leaves_only_whole_rows(finished, tmp_path, monkeypatch, capsys, how):
    write = os.write

    def write_until_full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl") and b'"step": 2,' in data:
            written = write(fd, data[: len(data) // 2])  # what a full disk lets through
            if how == "short-write":
                return written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", write_until_full)
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), *STEPS, "--seed", "4", *TINY]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"cannot write {run_dir / 'metrics.jsonl'}: No space left on device (" in err, err
    assert f"the last complete checkpoint is {run_dir / 'checkpoints' / 'step-000001'}" in err
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == [1]
    assert _no_tmp_anywhere(run_dir)
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert rows(run_dir) == rows(finished)


def test_resume_repairs_a_torn_last_metrics_row_with_a_warning(run, capsys):
    """A metrics.jsonl torn by an older ebpo (or a power cut): the resume warns and drops it, never crashes."""
    shutil.rmtree(run / "checkpoints" / "step-000003")  # as if stopped after step 2 while writing step 3's row
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:25])
    assert main(["train", "--resume", str(run)]) == 0
    assert (
        f"warning: {run / 'metrics.jsonl'} line 3 is not a whole JSON row (a torn write); dropped it"
        in capsys.readouterr().out
    )
    assert rows(run) == [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


def test_a_torn_row_inside_metrics_is_dropped_on_resume_and_named_when_read(tmp_path):
    from ebpo.train.tracking import _truncate_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.{"step": 2, "a": 2.0}\n{"step": 3, "a": 3.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a whole metrics row"):
        read_metrics(str(path))
    said = []
    _truncate_after(str(path), 2, said.append)
    assert read_metrics(str(path)) == [{"step": 1, "a": 1.0}] and said == [
        f"warning: {path} line 2 is not a whole JSON row (a torn write); dropped it"
    ]


# ------------------------------------------------------------------ 5. bad inputs: one line, before any run folder
def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


BOMB = (  # 10^9 values in 10 lines, every anchor inside a real (mapping) field: nothing is an unknown key
    "estimator_options:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"  {b}: &{b} [{', '.join(['*' + a] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
)
ROW = '{"question": "1+1=", "answer": "2"}'


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name: (ebpo train flags, what the one error line says)."""
    gsm8k = ["--task", "dataset:gsm8k", "--warmstart-steps", "0", "--max-new-tokens", "4"]
    (tmp / "runs").mkdir(exist_ok=True)
    (tmp / "bomb.yaml").write_text(BOMB + "steps: *i\n")
    (tmp / "big.yaml").write_text("steps: [" + ", ".join(["123456789"] * 20000) + "]\n")
    (tmp / "latin1.yaml").write_bytes("steps: 3 # caf\xe9\n".encode("latin-1"))
    (tmp / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "2"}\n')
    (tmp / "numbers.json").write_text("[1, 2, 3]")
    files = {
        "n": _jsonl(tmp / "n.jsonl", [ROW, "5"]),
        "z": _jsonl(tmp / "z.jsonl", [ROW, "null"]),
        "l": _jsonl(tmp / "l.jsonl", ["[1, 2]"]),
        "m": _jsonl(tmp / "m.jsonl", [ROW, '{"question": ']),
        "h": _jsonl(tmp / "h.jsonl", [json.dumps({"prompt": "def f():", "entry_point": "f"})]),
        "long": _jsonl(tmp / "long.jsonl", [json.dumps({"question": "x" * 80, "answer": "2"})] * 3),
        "w": _jsonl(tmp / "w.jsonl", [json.dumps({"question": "1+1=", "answer": "2" * 70})] * 5),
    }

    def data(name: str, extra: str = "") -> list[str]:
        return ["--task-options", f"{{{extra}path: {files.get(name) or tmp / name}}}"]

    return {
        "row-a-number": (
            [*gsm8k, *data("n")],
            "n.jsonl:2: a row must be a JSON object with the dataset's columns, got a number 5",
        ),
        "row-null": (
            [*gsm8k, *data("z")],
            "z.jsonl:2: a row must be a JSON object with the dataset's columns, got null",
        ),
        "row-a-list": (
            [*gsm8k, *data("l")],
            "l.jsonl:1: a row must be a JSON object with the dataset's columns, got a list",
        ),
        "json-of-numbers": ([*gsm8k, *data("numbers.json")], "numbers.json item 1: a row must be a JSON object"),
        "malformed-json": ([*gsm8k, *data("m")], "m.jsonl:2: not valid JSON"),
        "not-utf8-data": ([*gsm8k, *data("latin1.jsonl")], "latin1.jsonl:1: not UTF-8 text"),
        "humaneval-without-test": (
            ["--task", "dataset:humaneval", *data("h")],
            "h.jsonl:1: a humaneval row needs a 'test' column",
        ),
        "estimator-option-a-list": (
            ["--estimator-options", "{decay: [0.9, 0.5], prior: ema}"],
            "estimator 'ebpo' cannot take options {'decay': [0.9, 0.5], 'prior': 'ema'}",
        ),
        "yaml-alias-bomb": (["--config", str(tmp / "bomb.yaml")], "bomb.yaml' expands to more than 100000 values"),
        "huge-value-in-a-typed-field": (
            ["--config", str(tmp / "big.yaml")],
            "steps must be an integer, got [123456789, 123456789, 123456789, 123456789, ...] (list)",
        ),
        "not-utf8-config": (["--config", str(tmp / "latin1.yaml")], "latin1.yaml' is not UTF-8 text"),
        "model-path-that-does-not-exist": (
            ["--model", "runs/missing"],
            "model path 'runs/missing' is not a directory (does not exist; a name that looks like a path is never looked up",
        ),
        "no-prompt-fits-the-context": (
            [*gsm8k, *data("long")],
            "no training prompt of task 'dataset:gsm8k' fits builtin:tiny's context: 64 positions minus --max-new-tokens 4",
        ),
        "no-warm-start-target-fits": (
            ["--task", "dataset:gsm8k", "--max-new-tokens", "4", *data("w", "template: raw, ")],
            "warm start: no training problem fits the model's 64 positions",
        ),
    }


CASES = [
    "row-a-number",
    "row-null",
    "row-a-list",
    "json-of-numbers",
    "malformed-json",
    "not-utf8-data",
    "humaneval-without-test",
    "estimator-option-a-list",
    "yaml-alias-bomb",
    "huge-value-in-a-typed-field",
    "not-utf8-config",
    "model-path-that-does-not-exist",
    "no-prompt-fits-the-context",
    "no-warm-start-target-fits",
]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_naming_it_before_any_run_folder(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)  # runs/ exists here, so runs/missing is a path, not a hub id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it sent to the hub anyway, fail fast instead of retrying
    flags, message = _bad_inputs(tmp_path)[case]
    started = time.time()
    assert main(["train", "--out", str(tmp_path / "out"), "--no-progress", *flags]) == 2
    err = one_line(capsys.readouterr().err)
    assert message in err, err
    assert len(err) < 600  # never an unbounded value
    assert time.time() - started < 30  # the bomb is refused, not expanded
    assert not (tmp_path / "out").exists()


def test_prompts_longer_than_the_context_are_skipped_with_a_count_and_a_50_mb_row_costs_nothing():
    from ebpo.tasks.base import Problem
    from ebpo.train.config import TrainConfig
    from ebpo.train.trainer import Components, fit_prompts

    class Task:
        name, verifier = "t", "exact"

        def train_problems(self):
            return [Problem("a", "1+1=", "2"), Problem("b", "9" * 60, "2"), Problem("c", "x" * 50_000_000, "2")]

        def eval_problems(self):
            return [Problem("d", "2+2=", "4"), Problem("e", "9" * 70, "2")]

    said = []
    started = time.time()
    config = TrainConfig(max_new_tokens=8, warmstart_steps=0)
    fitted = fit_prompts(config, Components(Task(), None, None, None, None), said.append)
    assert time.time() - started < 5
    assert [p.id for p in fitted.task.train_problems()] == ["a"] and [p.id for p in fitted.task.eval_problems()] == [
        "d"
    ]
    assert fitted.task.name == "t" and fitted.task.verifier == "exact"
    assert said == [
        "skipped 2 of 3 training and 1 of 2 held-out prompts longer than builtin:tiny's context "
        "(64 positions minus --max-new-tokens 8 = 56 prompt tokens)"
    ]


def test_eval_of_a_run_with_corrupt_files_is_one_line_or_falls_back(run, tmp_path, monkeypatch, capsys):
    from ebpo.evaluate import main as evaluate

    newest = run / "checkpoints" / "step-000003" / "model"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert evaluate(["--model", str(newest), "--samples", "0", "--limit", "2"]) == 2
    assert "model.safetensors are corrupt or truncated" in one_line(capsys.readouterr().err, "ebpo eval: error:")
    assert evaluate(["--model", str(run), "--samples", "0", "--limit", "2"]) == 0  # falls back to step 2
    assert "warning: skipped the newer checkpoint step-000003: model weights" in capsys.readouterr().err
    (newest / "config.json").write_text('{"model_type": "lla')
    shutil.rmtree(run / "checkpoints" / "step-000002")
    shutil.rmtree(run / "checkpoints" / "step-000001")
    assert evaluate(["--model", str(newest), "--samples", "0"]) == 2
    assert "config.json is corrupt or truncated" in one_line(capsys.readouterr().err, "ebpo eval: error:")
    (run / "config.yaml").write_text("task: arithmetic\nlr: [1,\n")
    assert evaluate(["--model", str(run), "--samples", "0"]) == 2
    assert "config.yaml is corrupt or truncated" in one_line(capsys.readouterr().err, "ebpo eval: error:")
    monkeypatch.chdir(run.parent)
    assert evaluate(["--model", "run/missing", "--samples", "0"]) == 2
    assert "is never looked up on the Hugging Face hub" in one_line(capsys.readouterr().err, "ebpo eval: error:")
