"""Write a local lm-evaluation-harness task (YAML + JSONL) of longattn's pass-key prompts, for `longattn lm-eval`.

    python scripts/make_lm_eval_task.py --model smollm2-135m-instruct --length 1024 --samples 20
    longattn lm-eval --model longattn --model_args pretrained=smollm2-135m-instruct,patch=dense \
        --include_path evals/lm_eval_tasks --tasks longattn_passkey_1024 --device cpu

Prompts are the text of `length` tokens of the model's tokenizer (needle depths spread over the context), without
BOS or chat template: lm-eval adds those itself. The YAML names its data file relative to the repository root,
where lm-eval is run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from longattn.evals.runner import sample_depths
from longattn.evals.tasks import make_task
from longattn.evals.tasks.base import Filler
from longattn.pretrained import model_folder

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  description: "longattn pass key, {length} tokens of {model}'s tokenizer, needle depths 0..1 over {samples} prompts"
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer measures the length")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("evals/lm_eval_tasks"))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(args.model))
    task = make_task("passkey")
    rows = []
    for i, depth in enumerate(sample_depths(args.samples)):
        s = task.make(tokenizer, args.length, seed=args.seed * 1_000_003 + i, filler=Filler(), depth=depth)
        rows.append({"prompt": tokenizer.decode(s.input_ids, skip_special_tokens=True), "answer": s.answers[0],
                     "depth": depth, "tokens": len(s.input_ids)})
    name = f"longattn_passkey_{args.length}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = args.out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out_dir / f"{name}.yaml").write_text(
        YAML.format(name=name, data=data, length=args.length, model=args.model, samples=args.samples))
    print(f"wrote {data} and {name}.yaml ({len(rows)} prompts)")


if __name__ == "__main__":
    main()
