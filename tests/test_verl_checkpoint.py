"""verl adapter: the estimator state is saved with verl's checkpoints and restored when verl resumes.

verl is not installed here; the hooks are tested on a stand-in trainer that has what they read of verl 0.9.1's
trainers (``PPOTrainer`` in ``verl/trainer/ppo/v1/trainer_base.py``, the legacy ``RayPPOTrainer`` in
``verl/trainer/ppo/ray_trainer.py``): ``config.trainer.default_local_dir`` / ``resume_mode`` /
``resume_from_path``, ``config.algorithm``, ``global_steps``; ``_save_checkpoint`` writes ``global_step_N/``
and the tracker ``latest_checkpointed_iteration.txt``, ``_load_checkpoint`` sets ``global_steps`` from the
folder's name. ``tests/test_integration_verl_runtime.py`` runs the same hooks on verl's own methods.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

from ebpo.integrations import verl as adapter

STATEFUL = ["ebpo_running", "ebpo_ema", "ha_dw", "ebpo_ha_dw", "ebpo_hier_running"]


def verl_batch(step: int):
    """verl's layout: reward on the last response token, a response mask, uid strings, a data_source per sample."""
    gen = torch.Generator().manual_seed(100 + step)
    bs, length = 12, 5
    lengths = torch.randint(1, length + 1, (bs,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).float()  # (bs, T)
    token_rewards = torch.zeros(bs, length)
    token_rewards[torch.arange(bs), lengths - 1] = (torch.rand(bs, generator=gen) < 0.3 + 0.1 * step).float()
    uids = np.array([f"s{step}-p{i // 4}" for i in range(bs)], dtype=object)
    sources = np.array(["gsm8k" if i // 4 != 1 else "math" for i in range(bs)], dtype=object)
    return token_rewards, mask, uids, sources


def same_state(a, b) -> bool:
    """Nested state dicts equal, tensors (the hierarchical prior's per-topic accumulators) bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def latest_from_tracker(root):
    """What verl's find_latest_ckpt_path returns: root/global_step_N for the N in the tracker file, else None."""
    tracker = os.path.join(root, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        return None
    with open(tracker) as handle:
        return os.path.join(root, f"global_step_{int(handle.read())}")


class StandInTrainer:
    """The parts of verl 0.9.1's trainers that ebpo's hooks read and the order in which verl calls them."""

    def __init__(self, root, adv_estimator, resume_mode="auto", resume_from_path=None, norm=True):
        self.config = types.SimpleNamespace(
            trainer=types.SimpleNamespace(
                default_local_dir=str(root), resume_mode=resume_mode, resume_from_path=resume_from_path
            ),
            algorithm={"adv_estimator": adv_estimator, "norm_adv_by_std_in_grpo": norm},
        )
        self.global_steps = 0
        self.saved, self.loaded = [], []

    def _save_checkpoint(self):
        root = self.config.trainer.default_local_dir
        folder = os.path.join(root, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"dataloader": self.global_steps}, os.path.join(folder, "data.pt"))
        self.state_file_before_tracker = os.path.exists(os.path.join(folder, adapter.STATE_FILE))
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as handle:
            handle.write(str(self.global_steps))
        self.saved.append(folder)

    def _load_checkpoint(self):
        self.global_steps = 0
        cfg = self.config.trainer
        if cfg.resume_mode == "disable":
            return
        folder = (
            cfg.resume_from_path if cfg.resume_mode == "resume_path" else latest_from_tracker(cfg.default_local_dir)
        )
        if folder is None:
            return
        self.global_steps = int(folder.split("global_step_")[-1])
        self.loaded.append(folder)

    def step(self):
        """One training step's advantages, as verl's driver computes them (config = config.algorithm)."""
        self.global_steps += 1
        token_rewards, mask, uids, sources = verl_batch(self.global_steps)
        key = self.config.algorithm["adv_estimator"]
        acc = (token_rewards.sum(-1) > 0).numpy()  # the reward extra info's correctness (HA-DW reads it)
        advantages, _ = adapter.FUNCTIONS[key](
            token_rewards, mask, index=uids, config=self.config.algorithm, data_source=sources, acc=acc
        )
        return advantages


@pytest.fixture
def hooked(monkeypatch):
    """A fresh stand-in class with ebpo's hooks on it; verl's find_latest_ckpt_path replaced by the tracker read."""
    monkeypatch.setattr(adapter, "_latest_checkpoint", latest_from_tracker)
    monkeypatch.delenv("EBPO_VERL_FRESH_ESTIMATOR_STATE", raising=False)
    cls = type("Trainer", (StandInTrainer,), {})
    assert adapter.install_checkpointing(cls) == [cls.__qualname__]
    adapter.install_checkpointing(cls)  # idempotent: wrapped once
    assert not hasattr(cls._save_checkpoint.__wrapped__, "__wrapped__")
    adapter.ESTIMATORS.clear()
    yield cls
    adapter.ESTIMATORS.clear()


@pytest.mark.parametrize("key", STATEFUL)
@pytest.mark.parametrize("mode", ["auto", "resume_path"])
def test_resume_through_verls_checkpoint_equals_the_uninterrupted_run(hooked, tmp_path, key, mode):
    """Save at step 3 with the trainer's own _save_checkpoint, resume in a fresh state: steps 4-5 are bit-identical."""
    trainer = hooked(tmp_path, key)
    trainer._load_checkpoint()  # verl calls it at init, resuming or not: nothing to restore yet
    for _ in range(3):
        trainer.step()
    trainer._save_checkpoint()
    state_file = tmp_path / "global_step_3" / adapter.STATE_FILE
    assert state_file.is_file()
    uninterrupted = [trainer.step() for _ in range(2)]
    final_state = adapter.ESTIMATORS[key].state_dict()

    adapter.ESTIMATORS.clear()  # a new process: verl re-creates the trainer and calls _load_checkpoint
    resumed = hooked(tmp_path, key, resume_mode=mode, resume_from_path=str(tmp_path / "global_step_3"))
    resumed._load_checkpoint()
    assert resumed.global_steps == 3
    for expected in uninterrupted:
        assert torch.equal(resumed.step(), expected)
    assert same_state(adapter.ESTIMATORS[key].state_dict(), final_state)

    adapter.ESTIMATORS.clear()  # the control: without the restore the same steps differ (the test can fail)
    fresh = hooked(tmp_path, key, resume_mode="disable")
    fresh._load_checkpoint()
    fresh.global_steps = 3
    assert not all(torch.equal(fresh.step(), expected) for expected in uninterrupted)


def test_norm_flag_of_the_resumed_config_is_honoured(hooked, tmp_path):
    trainer = hooked(tmp_path, "ha_dw", norm=False)
    trainer.step()
    trainer._save_checkpoint()
    adapter.ESTIMATORS.clear()
    resumed = hooked(tmp_path, "ha_dw", norm=False)
    resumed._load_checkpoint()
    assert adapter.ESTIMATORS["ha_dw"].estimator.scale == "none"


def test_options_of_the_resumed_config_build_the_restored_estimator(hooked, tmp_path):
    """algorithm.ebpo reaches the load path too: the restored ebpo_ema has the run's decay, and its state."""
    options = {"estimator_options": {"decay": 0.5}}
    trainer = hooked(tmp_path, "ebpo_ema")
    trainer.config.algorithm["ebpo"] = options
    trainer.step()
    trainer.step()
    trainer._save_checkpoint()
    saved = adapter.ESTIMATORS["ebpo_ema"].state_dict()
    adapter.ESTIMATORS.clear()
    resumed = hooked(tmp_path, "ebpo_ema")
    resumed.config.algorithm["ebpo"] = options
    resumed._load_checkpoint()
    assert adapter.ESTIMATORS["ebpo_ema"].estimator.decay == 0.5
    assert same_state(adapter.ESTIMATORS["ebpo_ema"].state_dict(), saved)
    adapter.ESTIMATORS.clear()
    with pytest.raises(ValueError, match="decay"):  # another decay cannot take over that state
        hooked(tmp_path, "ebpo_ema")._load_checkpoint()


def test_the_file_is_written_before_verls_tracker_names_the_folder(hooked, tmp_path):
    """A crash between the two writes must never leave a tracker naming a step folder without the estimator state."""
    trainer = hooked(tmp_path, "ebpo_running")
    trainer.step()
    trainer._save_checkpoint()
    assert trainer.state_file_before_tracker


def test_runs_with_other_estimators_write_nothing_and_ignore_the_file(hooked, tmp_path):
    trainer = hooked(tmp_path, "grpo")
    trainer.global_steps = 2
    trainer._save_checkpoint()
    assert not (tmp_path / "global_step_2" / adapter.STATE_FILE).exists()
    resumed = hooked(tmp_path, "grpo")
    resumed._load_checkpoint()  # no file and not ours: nothing to restore, no error
    assert resumed.global_steps == 2 and not adapter.ESTIMATORS


@pytest.mark.parametrize("key", STATEFUL)
def test_resuming_a_checkpoint_without_the_state_is_refused(hooked, tmp_path, key, monkeypatch):
    """A checkpoint saved without the plugin would restart the prior silently: refused, with the way out named."""
    (tmp_path / "global_step_4").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    with pytest.raises(ValueError, match="EBPO_VERL_FRESH_ESTIMATOR_STATE=1"):
        hooked(tmp_path, key)._load_checkpoint()
    monkeypatch.setenv("EBPO_VERL_FRESH_ESTIMATOR_STATE", "1")  # on purpose: the state starts afresh
    hooked(tmp_path, key)._load_checkpoint()


def test_resuming_a_checkpoint_of_another_estimator_is_refused(hooked, tmp_path):
    trainer = hooked(tmp_path, "ebpo_running")
    trainer.step()
    trainer._save_checkpoint()
    adapter.ESTIMATORS.clear()
    with pytest.raises(ValueError, match=r"holds only \['ebpo_running'\]: it was saved by a run of another"):
        hooked(tmp_path, "ebpo_ema")._load_checkpoint()


@pytest.mark.parametrize("key", ["ebpo", "ebpo_hier"])
def test_a_per_batch_prior_resumes_without_the_file(hooked, tmp_path, key):
    """Nothing of a per-batch prior outlives its step, so an older checkpoint resumes as it is."""
    (tmp_path / "global_step_4").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    trainer = hooked(tmp_path, key)
    trainer._load_checkpoint()
    assert trainer.global_steps == 4


def test_a_crafted_state_file_is_refused_not_unpickled(hooked, tmp_path):
    folder = tmp_path / "global_step_1"
    folder.mkdir()
    torch.save({"ebpo_running": types.SimpleNamespace(x=1)}, folder / adapter.STATE_FILE)  # a pickled object
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        hooked(tmp_path, "ebpo_running")._load_checkpoint()
    torch.save([1, 2], folder / adapter.STATE_FILE)
    with pytest.raises(ValueError, match="does not hold ebpo estimator states"):
        hooked(tmp_path, "ebpo_running")._load_checkpoint()


def test_a_resume_folder_that_disagrees_with_verls_step_is_refused(hooked, tmp_path):
    """ebpo finds the folder as verl 0.9.1 does; if verl ever resumes elsewhere, say so rather than load the wrong state."""

    class Drifted(StandInTrainer):
        def _load_checkpoint(self):
            super()._load_checkpoint()
            self.global_steps += 1

    adapter.install_checkpointing(Drifted)
    trainer = Drifted(tmp_path, "ebpo_running")
    trainer.step()
    trainer._save_checkpoint()
    with pytest.raises(RuntimeError, match="verl resumed at step 2 but ebpo found .*global_step_1"):
        Drifted(tmp_path, "ebpo_running")._load_checkpoint()


def test_a_trainer_without_the_methods_is_named():
    class Renamed:
        def save_checkpoint(self):
            pass

    with pytest.raises(RuntimeError, match=r"Renamed\._save_checkpoint.*verl 0\.9"):
        adapter.install_checkpointing(Renamed)
