"""Training throughput of ``ebpo train`` against TRL's ``GRPOTrainer`` and a bare PyTorch loop, same model and batch.

    pip install trl
    python benchmarks/throughput.py --steps 20 --json benchmarks/results/throughput.json

Both trainers start from the same warm-started tiny Llama (ebpo's cached warm
start), train the built-in arithmetic task with the same number of prompts
per step, group size, completion length, sampling temperature, learning rate,
one PPO epoch, no KL term and the same exact-answer reward, each with all
CPU threads, one after the other. The third contender, ``bare``, is the
naive GRPO step written plainly in this file (:func:`run_bare`): HF
``generate`` with its KV cache on the G-times repeated prompts, the reward,
group-normalised advantages, one log-prob forward with grad over the padded
batch, token-mean loss, gradient clipping and an AdamW step. It is the floor
a trainer's machinery should beat, not a trainer.

Timed: the training steps only (ebpo: ``time/step_seconds`` from
metrics.jsonl; TRL: a callback around each optimiser step, which includes
its generation; bare: each step), not model loading or evaluation.
Generated tokens per second use each trainer's mean completion length.
Prints a table with ebpo / TRL and ebpo / bare and writes JSON. The three
run in the same window, so a loaded machine slows all of them; compare
ratios, not absolute numbers, across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def threads(args: argparse.Namespace) -> int:
    """Torch threads of every contender: ``--threads``, or what ebpo train uses by default (all cores, at most 8)."""
    return args.threads or max(1, min(os.cpu_count() or 1, 8))


def run_ebpo(args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    out = work / "ebpo"
    cmd = [
        sys.executable,
        "-m",
        "ebpo",
        "train",
        "--task",
        "arithmetic",
        "--method",
        "grpo",
        "--steps",
        str(args.steps),
        "--prompts-per-step",
        str(args.prompts),
        "--group-size",
        str(args.group_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--lr",
        str(args.lr),
        "--max-eval-problems",
        "8",
        "--eval-samples",
        "1",
        "--no-progress",
        "--no-tensorboard",
        "--save-every",
        "0",
        "--out",
        str(out),
        "--threads",
        str(threads(args)),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_seconds" in r][args.warmup :]
    seconds = sum(r["time/step_seconds"] for r in steps)
    tokens = sum(r["rollout/completion_length"] * args.prompts * args.group_size for r in steps)
    state = torch.load(next((out / "checkpoints").glob("step-*")) / "trainer_state.pt", weights_only=True)
    return {
        "steps": len(steps),
        "seconds": seconds,
        "steps_per_s": len(steps) / seconds,
        "tokens_per_s": tokens / seconds,
    }, state["init_model"]


def exact(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """The reward of TRL's and the bare loop's runs: the completion's first line equals the answer."""
    return [float(c.strip().split("\n")[0].strip() == a) for c, a in zip(completions, answer)]


def run_bare(args: argparse.Namespace, model_path: str) -> dict:
    """A naive GRPO loop in plain PyTorch + transformers: what every trainer has to do per step, nothing more."""
    from transformers import AutoModelForCausalLM

    from ebpo.models.loading import load_tokenizer
    from ebpo.tasks.arithmetic import ArithmeticTask

    torch.manual_seed(0)
    torch.set_num_threads(threads(args))
    tokenizer = load_tokenizer(model_path)  # pads on the left
    model = AutoModelForCausalLM.from_pretrained(model_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    problems = ArithmeticTask().train_problems()
    group, eos, pad = args.group_size, tokenizer.eos_token_id, tokenizer.pad_token_id
    times: list[float] = []
    lengths: list[float] = []
    for step in range(args.steps):
        start = time.perf_counter()
        batch = problems[step * args.prompts : (step + 1) * args.prompts]
        encoded = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True)
        prompt_ids = encoded["input_ids"].repeat_interleave(group, dim=0)  # (B, P)
        prompt_mask = encoded["attention_mask"].repeat_interleave(group, dim=0)
        model.eval()
        with torch.no_grad():
            sequences = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
            )  # (B, P + T)
        model.train()
        prompt_length = prompt_ids.shape[1]
        completion = sequences[:, prompt_length:]  # (B, T)
        is_eos = (completion == eos).long()
        mask = (torch.cumsum(is_eos, dim=1) - is_eos == 0).float()  # up to and including the first EOS
        texts = tokenizer.batch_decode(completion.masked_fill(mask == 0, pad), skip_special_tokens=True)
        rewards = torch.tensor(exact(texts, [p.answer for p in batch for _ in range(group)])).view(
            -1, group
        )  # (prompts, G)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(
            -1, 1
        )  # (B, 1)
        attention = torch.cat([prompt_mask, mask.long()], dim=1)  # (B, P + T)
        positions = (attention.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=sequences, attention_mask=attention, position_ids=positions).logits[
            :, prompt_length - 1 : -1
        ]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)  # (B, T)
        ratio = torch.exp(logprobs - logprobs.detach())  # one PPO epoch: the old policy is the current one
        loss = -(ratio * advantages * mask).sum() / mask.sum().clamp_min(1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
        lengths.append(float(mask.sum(1).mean()))
    timed, lens = times[args.warmup :], lengths[args.warmup :]
    seconds = sum(timed)
    tokens = sum(lens) * args.prompts * args.group_size
    return {
        "steps": len(timed),
        "seconds": seconds,
        "steps_per_s": len(timed) / seconds,
        "tokens_per_s": tokens / seconds,
    }


def run_trl(args: argparse.Namespace, model_path: str, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ebpo.models.loading import load_tokenizer
    from ebpo.tasks.arithmetic import ArithmeticTask

    tokenizer = load_tokenizer(model_path)
    problems = ArithmeticTask().train_problems()
    dataset = Dataset.from_list(
        [{"prompt": p.prompt, "answer": p.answer} for p in problems[: args.prompts * (args.steps + 2)]]
    )

    config = GRPOConfig(
        output_dir=str(work / "trl"),
        max_steps=args.steps,
        learning_rate=args.lr,
        beta=0.0,
        per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        num_iterations=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    times: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: object, **k: object) -> None:
            times.append(time.perf_counter() - self.start)

        def on_log(
            self, _args: object, _state: object, _control: object, logs: dict | None = None, **k: object
        ) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    torch.set_num_threads(threads(args))
    model = AutoModelForCausalLM.from_pretrained(model_path)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    timed, lens = times[args.warmup :], lengths[args.warmup :] or lengths
    seconds = sum(timed)
    tokens = sum(lens) / max(len(lens), 1) * args.prompts * args.group_size * len(timed)
    return {
        "steps": len(timed),
        "seconds": seconds,
        "steps_per_s": len(timed) / seconds,
        "tokens_per_s": tokens / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="first steps excluded from timing")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="completion length")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for every contender; 0 = all cores (at most 8). On a loaded machine 1 avoids oversubscription stalls",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/throughput.json"), help="output file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ebpo_result, model_path = run_ebpo(args, work)
        bare_result = run_bare(args, model_path)
        trl_result = run_trl(args, model_path, work)
    import trl

    ratio = ebpo_result["steps_per_s"] / trl_result["steps_per_s"]
    ratio_bare = ebpo_result["steps_per_s"] / bare_result["steps_per_s"]
    print("| trainer | steps | seconds | steps/s | generated tokens/s | ebpo / this |")
    print("|---|---|---|---|---|---|")
    for name, r in (("ebpo", ebpo_result), ("bare PyTorch loop", bare_result), (f"trl {trl.__version__}", trl_result)):
        print(
            f"| {name} | {r['steps']} | {r['seconds']:.1f} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | {ebpo_result['steps_per_s'] / r['steps_per_s']:.2f}x |"
        )
    print(f"\nebpo / TRL steps per second: {ratio:.2f}x; ebpo / bare loop: {ratio_bare:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        **{k: v for k, v in vars(args).items() if k != "json"},
    }
    args.json.write_text(
        json.dumps(
            {
                "meta": meta,
                "ebpo": ebpo_result,
                "bare": bare_result,
                "trl": trl_result,
                "ratio_steps_per_s": ratio,
                "ratio_bare_steps_per_s": ratio_bare,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
