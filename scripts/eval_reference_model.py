#!/usr/bin/env python
"""Measure the reference model for its model card: held-out perplexity and pass-key retrieval.

    python scripts/eval_reference_model.py --model longattn/reference_model --out longattn/reference_model/eval.json

Perplexity: strided sliding-window perplexity on (a) the linux-doc files held out of training (same split as
scripts/train_reference_model.py) and (b) Python documentation prose the model never saw.
Pass key: `--trials` prompts per length, needle depths spread evenly over [0, 1], with two fillers the model
never trained on (the classic repeated "The grass is green..." text, and Python documentation prose); dense
attention at each length and a 512-token sliding window at 4k for contrast.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import longattn
from longattn.evals import generate_answers, make_passkey_sample, score_answers, sliding_window_perplexity
from longattn.evals.corpora import DEFAULT_CACHE, linux_doc_heldout, python_doc_prose


def passkey_accuracy(model, tok, length: int, trials: int, filler: str | None, seed: int = 0) -> float:
    depths = [i / (trials - 1) for i in range(trials)] if trials > 1 else [0.5]
    samples = [make_passkey_sample(tok, length, d, seed=seed + i, filler_text=filler) for i, d in enumerate(depths)]
    answers = generate_answers(model, tok, samples, batch_size=max(1, 16384 // length))
    return sum(s["first_number_match"] for s in score_answers(samples, answers)) / len(samples)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("longattn/reference_model"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--window-length", type=int, default=4096)
    ap.add_argument("--ppl-contexts", default="512,1024,2048,4096")
    ap.add_argument("--ppl-tokens", type=int, default=65536, help="tokens of each held-out text to score")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = {"linux-doc held-out": linux_doc_heldout(args.cache), "python-doc prose": python_doc_prose(args.cache)}
    report = {"model": str(args.model), "parameters": sum(p.numel() for p in model.parameters()),
              "perplexity": {}, "passkey": {}, "trials": args.trials}

    for name, text in texts.items():
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:args.ppl_tokens])
        for ctx in (int(c) for c in args.ppl_contexts.split(",")):
            t0 = time.time()
            r = sliding_window_perplexity(model, ids, ctx, stride=ctx // 2)
            report["perplexity"][f"{name} @ {ctx}"] = {"perplexity": round(r.perplexity, 3), "tokens": r.tokens,
                                                      "context": ctx, "stride": ctx // 2}
            print(f"ppl {name} ctx={ctx}: {r.perplexity:.3f} ({r.tokens} tokens, {time.time() - t0:.0f}s)",
                  flush=True)

    fillers = {"grass": None, "python-doc prose": texts["python-doc prose"]}
    runs = [("dense", {}, int(n)) for n in args.lengths.split(",")]
    runs.append(("sliding_window", {"window": args.window}, args.window_length))
    for method, params, length in runs:
        for fname, filler in fillers.items():
            t0 = time.time()
            with longattn.patched(model, method, **params):
                acc = passkey_accuracy(model, tok, length, args.trials, filler)
            label = f"{method}{params.get('window', '')} @ {length} / {fname}"
            report["passkey"][label] = {"method": method, "params": params, "length": length, "filler": fname,
                                        "accuracy": acc, "seconds": round(time.time() - t0, 1)}
            print(f"passkey {label}: {acc:.2f} ({time.time() - t0:.0f}s)", flush=True)

    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
