"""Worker for test_integration_trl.py: a 2-process (gloo) TRL run with the ebpo trainer; writes each rank's estimator state."""

import json
import os
import sys

import datasets

from ebpo.integrations.trl import EBPOGRPOConfig, EBPOGRPOTrainer
from ebpo.models.loading import TinyLlamaSpec, build_tiny_llama
from ebpo.models.tokenizer import CharTokenizer

out = sys.argv[1]
tok = CharTokenizer()
tok.padding_side = "left"
model = build_tiny_llama(TinyLlamaSpec(), tok, seed=0)
ds = datasets.Dataset.from_list([{"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(64)])


def reward(completions, answer, **_):
    return [float(c.strip()[:3] == a[:3]) * 0.5 + float(len(c) % 2) * 0.5 for c, a in zip(completions, answer)]


args = EBPOGRPOConfig(
    output_dir=out,
    max_steps=3,
    learning_rate=1e-3,
    beta=0.0,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=4,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    bf16=False,
    seed=0,
    save_strategy="no",
    disable_tqdm=True,
    ebpo_estimator="ebpo",
    ebpo_estimator_options={"prior": "running"},
    ebpo_weighting="ha_dw",
)
t = EBPOGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok)
t.train()
rank = t.accelerator.process_index
with open(os.path.join(out, f"state-{rank}.json"), "w") as f:
    json.dump(t.ebpo_estimator.state_dict(), f, default=str)
