#!/usr/bin/env python
"""Train longattn's embedded reference model: a small Llama that really retrieves across 4k tokens.

The recipe (measured on a 2-core CPU, see ../shared/DESIGN.md): a 4-layer, 4.3M-parameter Llama with plain
multi-head attention, a 4096-token byte-level BPE with one token per digit, trained with bf16 autocast on
a length curriculum 512 -> 1024 -> 2048 -> 4096 over a mix of
  60% retrieval documents (one needle every ~256 tokens, each queried again later; answers weighted 6x),
  20% copy documents (a span of the first half repeated later; copied tokens weighted 3x),
  20% plain text,
all built from Debian's linux-doc package (the kernel's Documentation/*.rst, GPL-2.0).

Everything is seeded: the data of step N depends only on (seed, N), so a resumed run sees exactly the data
an uninterrupted run would. Reproduce the shipped weights with:

    python scripts/train_reference_model.py --out runs/reference --export longattn/reference_model

Retrieval accuracy sits at exactly 0 for ~1,100 steps and then jumps; do not stop early.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longattn.evals.corpora import linux_doc_split

EOS = "<|endoftext|>"
HELDOUT_EVERY = 50  # one rst file in 50 (by path hash) never enters training: the held-out perplexity text


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1600
    tokens_per_step: int = 16384
    lengths: tuple = (512, 1024, 2048, 4096)  # curriculum: an equal share of the steps each
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    rope_theta: float = 5e4
    p_retrieval: float = 0.6
    p_copy: float = 0.2
    needle_every: int = 256
    answer_weight: float = 6.0
    copy_weight: float = 3.0
    checkpoint_every: int = 50
    eval_every: int = 50


# ----------------------------------------------------------------------------------------------- corpus
def split_corpus(cache: Path) -> tuple[Path, Path]:
    """Write train.txt and heldout.txt (documents joined by EOS lines) from linux-doc's rst files."""
    train_path, heldout_path = cache / "train.txt", cache / "heldout.txt"
    if train_path.exists() and heldout_path.exists():
        return train_path, heldout_path
    train, heldout = linux_doc_split(cache, HELDOUT_EVERY)
    train_path.write_text(f"\n{EOS}\n".join(train))
    heldout_path.write_text(f"\n{EOS}\n".join(heldout))
    return train_path, heldout_path


def train_tokenizer(train_path: Path, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = out / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    # One token per digit: numbers are copied digit by digit, which a small model learns far more easily.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(train_path.read_text().split(f"\n{EOS}\n"), trainer=trainer)
    tok.save(str(path))
    return tok


def encode_corpus(tok, text_path: Path, cache_file: Path) -> np.ndarray:
    if cache_file.exists():
        return np.load(cache_file)
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(text_path.read_text().split(f"\n{EOS}\n")):
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16)
    np.save(cache_file, arr)
    return arr


def key_words(text: str, n: int = 1500) -> list[str]:
    """Frequent plain lowercase words of the corpus: the names that needles are keyed by."""
    counts = Counter(re.findall(r"\b[a-z]{4,10}\b", text))
    return sorted(counts, key=lambda w: (-counts[w], w))[:n]


# ------------------------------------------------------------------------------------------- documents
SYNTHETIC_SUBJECTS = ["The river", "A small bird", "My neighbour", "The old clock", "This road", "The library",
                      "Every morning", "The kernel", "Our team", "The window", "A quiet town", "The ship"]
SYNTHETIC_PREDICATES = ["runs past the hill", "is painted white", "waits for the train", "opens at nine",
                        "smells of rain", "was built long ago", "sings in the evening", "is very quiet today",
                        "leads to the harbour", "keeps a careful record", "looks at the mountains",
                        "has many doors"]
PASSKEY_PREAMBLE = (" There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
                    " I will quiz you about the important information there.")


def needle_templates(word: str, value: str) -> list[tuple[str, str, str]]:
    """(needle, query, answer) triples in several phrasings; the answer follows the query directly."""
    return [
        (f" One of the special magic numbers for {word} is: {value}.",
         f" What is the special magic number for {word}? The special magic number for {word} is:", f" {value}."),
        (f" {word} = {value}.", f" Recall: {word} =", f" {value}."),
        (f" The secret code for the {word} door is {value}.", f" The secret code for the {word} door is",
         f" {value}."),
        (f" The value of {word} is {value}. Remember it.", f" What is the value of {word}? It is", f" {value}."),
    ]


class DocumentMaker:
    """Builds seeded training sequences (token ids + per-token loss weights) of a requested length."""

    def __init__(self, tok, corpus: np.ndarray, words: list[str], cfg: TrainConfig):
        self.tok, self.corpus, self.words, self.cfg = tok, corpus, words, cfg
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[text] = self.tok.encode(text).ids
        return self._cache[text]

    def natural(self, rng, n: int) -> np.ndarray:
        start = int(rng.integers(0, len(self.corpus) - n - 1))
        return self.corpus[start:start + n].astype(np.int64)

    def synthetic(self, rng, n: int) -> np.ndarray:
        out: list[int] = []
        while len(out) < n:
            s = rng.integers(len(SYNTHETIC_SUBJECTS))
            p = rng.integers(len(SYNTHETIC_PREDICATES))
            out += self.ids(f" {SYNTHETIC_SUBJECTS[s]} {SYNTHETIC_PREDICATES[p]}.")
        return np.asarray(out[:n], dtype=np.int64)

    def plain(self, rng, length: int):
        return self.natural(rng, length), np.ones(length, dtype=np.float32)

    def copy(self, rng, length: int):
        toks = self.natural(rng, length)
        w = np.ones(length, dtype=np.float32)
        span = int(rng.integers(16, length // 4))
        src = int(rng.integers(0, length // 2 - span))
        dst = int(rng.integers(length // 2, length - span))
        toks[dst:dst + span] = toks[src:src + span]
        w[dst + 1:dst + span] = self.cfg.copy_weight  # the first copied token cannot be predicted
        return toks, w

    def retrieval(self, rng, length: int):
        """Filler with a needle every ~needle_every tokens, each asked for again at a random later point."""
        n_needles = max(1, length // self.cfg.needle_every)
        words = rng.choice(len(self.words), size=n_needles, replace=False)
        segments = []  # (needle-or-query ids, answer ids or None, kind, needle index)
        passkey_slot = int(rng.integers(n_needles)) if rng.random() < 0.5 else -1
        for i, wi in enumerate(words):
            value = str(int(rng.integers(10 ** (d := int(rng.integers(4, 8))) // 10, 10 ** d)))
            if i == passkey_slot:
                needle = f" The pass key is {value}. Remember it. {value} is the pass key."
                query, answer = " What is the pass key? The pass key is", f" {value}."
            else:
                templates = needle_templates(self.words[wi], value)
                needle, query, answer = templates[int(rng.integers(len(templates)))]
            segments.append((self.ids(needle), self.ids(query), self.ids(answer)))
        pre = self.ids(PASSKEY_PREAMBLE) if passkey_slot >= 0 and rng.random() < 0.5 else []
        inserted = len(pre) + sum(len(n) + len(q) + len(a) for n, q, a in segments)
        filler_len = length - inserted
        if filler_len < length // 4:
            return self.plain(rng, length)
        filler = self.natural(rng, filler_len) if rng.random() < 0.5 else self.synthetic(rng, filler_len)
        # Event positions in filler coordinates: needle i at p_i, its query at some q_i > p_i.
        events = []
        for i, (n, q, a) in enumerate(segments):
            p = int(rng.integers(0, int(filler_len * 0.85)))
            qpos = int(rng.integers(p + 1, filler_len + 1))
            events.append((p, 0, i))
            events.append((qpos, 1, i))
        events.sort()
        toks, weights, cursor = list(pre), [1.0] * len(pre), 0
        for pos, kind, i in events:
            toks += filler[cursor:pos].tolist()
            weights += [1.0] * (pos - cursor)
            cursor = pos
            n, q, a = segments[i]
            if kind == 0:
                toks += n
                weights += [1.0] * len(n)
            else:
                toks += q + a
                weights += [1.0] * len(q) + [self.cfg.answer_weight] * len(a)
        toks += filler[cursor:].tolist()
        weights += [1.0] * (filler_len - cursor)
        assert len(toks) == length, (len(toks), length)
        return np.asarray(toks, dtype=np.int64), np.asarray(weights, dtype=np.float32)

    def batch(self, step: int, length: int, batch_size: int):
        rng = np.random.default_rng([self.cfg.seed, step])
        toks, ws = [], []
        for _ in range(batch_size):
            r = rng.random()
            if r < self.cfg.p_retrieval:
                t, w = self.retrieval(rng, length)
            elif r < self.cfg.p_retrieval + self.cfg.p_copy:
                t, w = self.copy(rng, length)
            else:
                t, w = self.plain(rng, length)
            toks.append(t)
            ws.append(w)
        return torch.from_numpy(np.stack(toks)), torch.from_numpy(np.stack(ws))


# ------------------------------------------------------------------------------------------- training
def length_at(step: int, cfg: TrainConfig) -> int:
    return cfg.lengths[min(len(cfg.lengths) - 1, step * len(cfg.lengths) // cfg.steps)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build_model(cfg: TrainConfig, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.lengths[-1], rope_theta=cfg.rope_theta,
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def weighted_loss(model, toks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=toks[:, :-1]).logits
    ce = F.cross_entropy(logits.float().flatten(0, 1), toks[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def quick_passkey_accuracy(model, maker: DocumentMaker, length: int, n: int = 16, seed: int = 12345) -> float:
    """Teacher-forced accuracy of the pass-key digits in single-needle prompts (a progress signal only)."""
    rng = np.random.default_rng(seed)
    correct = 0
    for _ in range(n):
        value = str(int(rng.integers(10000, 100000)))
        needle = maker.ids(f" The pass key is {value}. Remember it. {value} is the pass key.")
        query = maker.ids(" What is the pass key? The pass key is")
        answer = maker.ids(f" {value}.")
        filler = maker.natural(rng, length - len(needle) - len(query) - len(answer)).tolist()
        pos = int(rng.integers(0, len(filler)))
        toks = torch.tensor([filler[:pos] + needle + filler[pos:] + query + answer])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=toks).logits[0]
        start = toks.shape[1] - len(answer)
        pred = logits[start - 1:toks.shape[1] - 1].argmax(-1)
        correct += int(torch.equal(pred[:-1], toks[0, start:-1]))  # every digit right (the final "." aside)
    return correct / n


def save_checkpoint(path: Path, model, opt, step: int, log: list):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken checkpoint behind


def plot_log(log: list, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r["loss"] for r in log], lw=0.8, label="weighted training loss")
    ax.set_xlabel("step (16k tokens each)")
    ax.set_ylabel("loss")
    ax.set_title("longattn reference model: training curve")
    ax2 = ax.twinx()
    ev = [r for r in log if "passkey_acc" in r]
    ax2.plot([r["step"] for r in ev], [r["passkey_acc"] for r in ev], "o-", color="tab:red", ms=3,
             label="pass-key accuracy (current length)")
    ax2.set_ylabel("pass-key accuracy")
    ax2.set_ylim(-0.05, 1.05)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def export(model, tok_path: Path, out: Path, eos_id: int):
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                  model_max_length=1_000_000)
    tok.save_pretrained(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/reference"), help="run folder (checkpoints, log)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/longattn", help="corpus cache folder")
    ap.add_argument("--export", type=Path, default=None, help="write the final HF model folder here")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    cfg = TrainConfig(steps=args.steps, seed=args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    train_path, _ = split_corpus(args.cache)
    tok = train_tokenizer(train_path, cfg.vocab_size, args.out)
    corpus = encode_corpus(tok, train_path, args.out / "train_tokens.npy")
    words = key_words(train_path.read_text())
    maker = DocumentMaker(tok, corpus, words, cfg)
    eos_id = tok.token_to_id(EOS)
    print(f"corpus: {len(corpus):,} training tokens, {len(words)} key words", file=sys.stderr)

    model = build_model(cfg, eos_id)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ckpt = args.out / "checkpoint.pt"
    start, log = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, log = state["step"], state["log"]
        print(f"resumed from step {start}", file=sys.stderr)
    # The checkpoint's log is the truth: steps after it (from an interrupted run) are redone, not duplicated.
    with open(args.out / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        length = length_at(step, cfg)
        toks, w = maker.batch(step, length, cfg.tokens_per_step // length)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = weighted_loss(model, toks, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        rec = {"step": step + 1, "loss": round(loss.item(), 4), "length": length, "lr": lr_at(step, cfg),
               "elapsed_s": round(time.time() - t0, 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            rec["passkey_acc"] = quick_passkey_accuracy(model, maker, length)
            model.train()
        log.append(rec)
        with open(args.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.3f}", L=length, acc=log[-1].get("passkey_acc", "-"))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt, model, opt, step + 1, log)

    plot_log(log, args.out / "loss.png")
    if args.export:
        export(model, args.out / "tokenizer.json", args.export, eos_id)
        plot_log(log, args.export / "training_curve.png")
        with open(args.export / "training_log.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
        print(f"exported to {args.export}", file=sys.stderr)


if __name__ == "__main__":
    main()
