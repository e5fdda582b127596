"""From TRL: a complete GRPOTrainer script, switched to EBPO by one import line.

    pip install -e ".[trl]"                                        # TRL 1.x (tested: 1.0.0 and the newest 1.x)
    python examples/from_trl.py --model Qwen/Qwen2.5-0.5B-Instruct  # any causal LM on the Hugging Face hub
    python examples/from_trl.py --tiny                              # offline: a tiny model built in code, 2 steps on the CPU

The script is an ordinary TRL GRPO script (a dataset with a "prompt" column, a reward function, GRPOConfig,
GRPOTrainer, train). The only ebpo line is the import below. What that import changes, and nothing else:

* the advantages come from ebpo's EBPO estimator with its default per-batch prior (`ebpo_estimator="ebpo"`,
  `ebpo_estimator_options={}`): each prompt's group mean is shrunk toward the batch's mean, so a group whose
  responses all fail (or all pass) gets a learning signal where GRPO gives it zero, and the advantages are
  standardised over the whole batch;
* TRL's `scale_rewards` no longer applies: EBPO normalises on its own, and a non-default `scale_rewards`
  ("batch", "none", False) is refused when the config is built (it would be ignored). With
  `ebpo_estimator="grpo"` it applies again and ebpo reproduces TRL's own advantages;
* the config gains `ebpo_*` fields (all optional): `ebpo_estimator`, `ebpo_estimator_options`
  (`{"prior": "running"}`, `{"hierarchical": True}`, ...), `ebpo_weighting="ha_dw"` with the reward function
  that says whether a completion is correct (`ebpo_correctness_reward`, or `ebpo_correctness_threshold`),
  `ebpo_divergence` (GBMPO, weighted by `beta`), and `ebpo_topic_column`, a dataset column whose labels reach
  the estimator as topics (used by the hierarchical prior; this script's data has a "topic" column);
* ebpo's metrics join TRL's logs (`adv/all_equal_group_frac`, `ebpo/shrinkage`, ...) and the estimator's
  state is saved in each TRL checkpoint and restored by `resume_from_checkpoint`.

Everything else (the loss type, `beta`, clipping, generation, vLLM, DeepSpeed, logging) is TRL's. Details:
the README's TRL section and docs/trl.md; the option map from TRL to `ebpo train`: docs/guide.md.
"""

from __future__ import annotations

import argparse
import random
import re

from datasets import Dataset

# The one-line switch (instead of `from trl import GRPOConfig, GRPOTrainer`):
from ebpo.integrations.trl import EBPOGRPOConfig as GRPOConfig
from ebpo.integrations.trl import EBPOGRPOTrainer as GRPOTrainer


def make_dataset(num_prompts: int, seed: int = 0) -> Dataset:
    """Two-number sums and differences; the answer and the operation (the topic) travel as extra columns."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        a, b, op = rng.randint(1, 50), rng.randint(1, 50), rng.choice("+-")
        rows.append(
            {
                "prompt": f"What is {a}{op}{b}? Answer: ",
                "answer": str(a + b if op == "+" else a - b),
                "topic": "sum" if op == "+" else "difference",
            }
        )
    return Dataset.from_list(rows)


def correct_answer(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the first number of the completion is the answer, else 0.0 (TRL passes dataset columns by name)."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = re.search(r"-?\d+", completion)
        rewards.append(1.0 if found is not None and found.group() == expected else 0.0)
    return rewards


def answer_format(completions: list[str], **_: object) -> list[float]:
    """1.0 when the completion starts with a number (a format reward, as many GRPO scripts add), else 0.0."""
    return [1.0 if re.match(r"\s*-?\d", completion) else 0.0 for completion in completions]


def tiny_model_and_tokenizer():
    """ebpo's built-in 0.45 M-parameter Llama and its character tokenizer: nothing downloaded (for CI)."""
    from ebpo.models import CharTokenizer, TinyLlamaSpec, build_tiny_llama

    tokenizer = CharTokenizer()
    tokenizer.padding_side = "left"  # generation pads on the left
    return build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="Hugging Face model id or directory")
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny model, 2 steps on the CPU (CI)")
    parser.add_argument("--output-dir", default="runs/from-trl")
    args = parser.parse_args()

    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
        sizes = dict(num_generations=4, per_device_train_batch_size=16, max_completion_length=8, max_steps=2)
        sizes.update(use_cpu=True, learning_rate=1e-3)
    else:
        model, tokenizer = args.model, None  # TRL loads the model and its tokenizer from the hub
        sizes = dict(num_generations=8, per_device_train_batch_size=16, max_completion_length=32, max_steps=200)
        sizes.update(learning_rate=1e-6)

    config = GRPOConfig(
        output_dir=args.output_dir,
        logging_steps=1,
        report_to="none",
        reward_weights=[0.9, 0.1],  # correctness and format: the summed reward stays in [0, 1]
        save_strategy="no",
        beta=0.0,  # TRL's default: no KL term and no reference model (0.001 gives TRL's k3 KL, as ebpo's preset)
        # Optional ebpo fields (the defaults are EBPO with the per-batch prior):
        #   ebpo_estimator_options={"prior": "running"},                      # the paper's Algorithm 1
        #   ebpo_estimator_options={"hierarchical": True}, ebpo_topic_column="topic",
        #   ebpo_weighting="ha_dw", ebpo_correctness_reward="correct_answer",  # HA-DW reads a 0/1 correctness
        **sizes,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correct_answer, answer_format],
        args=config,
        train_dataset=make_dataset(256),
        processing_class=tokenizer,
    )
    trainer.train()

    estimator = trainer.ebpo_estimator
    logged = [entry for entry in trainer.state.log_history if "adv/all_equal_group_frac" in entry]
    print(f"estimator: {estimator.name} (prior={estimator.estimator.prior})")
    print(f"steps: {trainer.state.global_step}")
    for entry in logged:
        print(
            f"step {entry['step']}: reward {entry['reward']:.3f}, "
            f"adv/all_equal_group_frac {entry['adv/all_equal_group_frac']:.3f}, "
            f"ebpo/shrinkage {entry['ebpo/shrinkage']:.3f}"
        )


if __name__ == "__main__":
    main()
