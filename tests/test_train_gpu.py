"""CUDA-only paths of the trainer (marker ``gpu``; skipped without CUDA; ``bash scripts/gpu-check.sh`` runs them):
device placement, bf16 autocast with fp32 master weights on CUDA, collectives on device tensors (NCCL accepts
no CPU tensors), and the temperature-scaled log-probs under autocast."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_trainer_places_everything_on_the_gpu_and_computes_in_bf16(make_trainer, synthetic_batch):
    trainer = make_trainer(
        "--device", "cuda", "--method", "ebpo", "--dtype", "auto", "--lr", "1e-6", "--lr-warmup-steps", "0"
    )
    assert trainer.device.type == "cuda" and trainer.dist.device.type == "cuda"
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in trainer.params)  # fp32 masters
    # The reference is stored as the policy is (fp32) and runs under the same autocast: equal to it at step 0.
    assert trainer.ref_model is not None and next(trainer.ref_model.parameters()).dtype == torch.float32
    rollout, advantages = synthetic_batch(trainer)
    assert rollout.input_ids.device.type == "cuda"
    seen: list[torch.dtype] = []
    hook = trainer.model.lm_head.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype) if torch.is_grad_enabled() else None
    )
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.update(rollout, advantages.cuda())
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.params, before))
    assert moved / sum(p.numel() for p in trainer.params) > 0.5
    assert metrics["system/peak_gpu_memory_gb"] > 0


def test_collectives_hand_device_tensors_to_the_backend(monkeypatch):
    """What NCCL would receive: every tensor given to accelerate's gather/pad is on the process's CUDA device."""
    import accelerate.utils

    from ebpo.train.distributed import Dist, setup

    single = setup("cuda", "auto")
    devices: list[torch.device] = []

    def fake_gather(tensor):  # two identical ranks
        devices.append(tensor.device)
        return torch.cat([tensor, tensor])

    def fake_pad(tensor, dim=0):
        devices.append(tensor.device)
        return tensor

    monkeypatch.setattr(accelerate.utils, "gather", fake_gather)
    monkeypatch.setattr(accelerate.utils, "pad_across_processes", fake_pad)
    dist = Dist(rank=1, world=2, accelerator=single.accelerator)
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # CPU, as the verifier returns them
    gathered = dist.all_gather_cat(rewards)
    assert gathered.device.type == "cpu" and gathered.tolist() == [1.0, 0.0, 1.0] * 2
    assert dist.sum(2.5) == 5.0 and dist.local_offset(3) == 3
    assert devices and all(d.type == "cuda" for d in devices)


def test_update_logprobs_are_the_samplers_scores_under_bf16_autocast():
    """Defect 1 on CUDA: at T = 0.5, under bf16 autocast in both passes, the update's log-probs are the sampler's
    processed scores (bf16 tolerance: generate runs token by token with a KV cache, the update in one pass)."""
    from ebpo.models import load_policy
    from ebpo.sampling import completion_mask, sampling_config
    from ebpo.tasks.arithmetic import ArithmeticTask
    from ebpo.train.rollout import sequence_logprobs

    model, tok = load_policy("builtin:tiny", device=torch.device("cuda"), dtype="float32", seed=0)
    problems = ArithmeticTask(num_train=10, num_eval=4).eval_problems()
    batch = {k: v.cuda() for k, v in tok([p.prompt for p in problems], return_tensors="pt", padding=True).items()}
    config = sampling_config(
        do_sample=True,
        temperature=0.5,
        top_p=1.0,
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config.output_scores, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
        )
        prompt_length = batch["input_ids"].shape[1]
        completion = out.sequences[:, prompt_length:]
        mask = completion_mask(completion, tok.eos_token_id)
        got = sequence_logprobs(model, out.sequences, torch.cat([batch["attention_mask"], mask], 1), prompt_length, 0.5)
    expected = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(2, completion.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=5e-2)
