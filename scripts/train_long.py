#!/usr/bin/env python
"""Fine-tune a Hugging Face causal LM on long sequences with sequence parallelism (ring / Ulysses attention).

World = sequence-parallel x data-parallel: consecutive ranks share one sequence (each holds a zigzag shard
of it), the ranks with the same shard index form data-parallel replicas that see different sequences. Within a
sequence-parallel group, `--strategy ring` passes K/V around all its ranks, `ulysses` exchanges heads
all-to-all, and `usp` does both: Ulysses over sub-groups of `--ulysses-size` consecutive ranks (heads and KV
heads divisible by it), ring attention across the sub-groups.

    # N processes on CPU (gloo); on GPUs drop --config_file and use your usual accelerate config
    accelerate launch --config_file scripts/accelerate_cpu.yaml --num_processes 4 \\
        scripts/train_long.py --sequence-parallel 2 --seq-len 4096 --steps 200 --lora-rank 8 --output-dir runs/long

By default it fine-tunes the reference model (longattn.reference_model_path()) on the linux-doc training text
(the reference model's own corpus); `--model PATH` and `--dataset FILE_OR_NAME` (a local .txt/.jsonl/.parquet
file or a `datasets` name) change that. `--lora-rank R` trains LoRA adapters on the attention projections plus
the embeddings and norms, as LongLoRA does (Chen et al. 2023, arXiv:2309.12307).

Gradients: the loss is the mean over every token of the full sequence (sequence_parallel_loss); each SP rank's
backward yields its share of the gradient, so gradients are SUMMED over the SP group and AVERAGED over DP
replicas (sync_gradients). accelerate launches the processes and sets up the process group; the model is not
wrapped in DDP, whose average over all ranks would be wrong for sequence-parallel shards.

`--grad-accum N` runs N micro-batches of `--batch-size` sequences per optimizer step: each micro-batch's loss
is weighted by its share of the step's tokens before its backward, so the step's gradient (and the logged
loss) is that of one batch of N x batch-size sequences; gradients are synchronized once per step.

The data of step N depends only on (seed, N), and checkpoints hold the trainable weights, the optimizer and
the scheduler: a resumed run continues exactly where the interrupted one stopped (loss log included). The
finished model (LoRA merged) is saved with save_pretrained to OUTPUT_DIR/final.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import longattn
from longattn.parallel import (IGNORE_INDEX, SequenceParallel, ShardLayout, parallel_groups, sequence_parallel_loss,
                               sync_gradients)

CHECKPOINT_PREFIX = "checkpoint-"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the reference model)")
    p.add_argument("--dataset", default="linux-doc-train",
                   help="linux-doc-train (default), python-doc, a local .txt/.jsonl/.json/.parquet file or a "
                        "datasets name")
    p.add_argument("--text-field", default="text", help="column holding the text (jsonl / parquet / datasets)")
    p.add_argument("--sequence-parallel", type=int, default=1, help="ranks sharing one sequence (divides world)")
    p.add_argument("--strategy", default="ring", choices=["ring", "ulysses", "usp"],
                   help="ring, ulysses (all-to-all over heads) or usp (Ulysses x ring)")
    p.add_argument("--ulysses-size", type=int, default=2,
                   help="usp: ranks per Ulysses sub-group (divides --sequence-parallel; heads divisible by it)")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--method", default="dense", choices=["dense", "sliding_window", "sink_window"])
    p.add_argument("--window", type=int, default=1024, help="window of sliding_window / sink_window")
    p.add_argument("--sink-tokens", type=int, default=4, help="sinks of sink_window")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (divisible by 2 x SP for zigzag)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="sequences per data-parallel replica per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (the schedule still runs to "
                   "--steps): an interrupted run, to be resumed")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/train_long")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a rank waits for a peer before failing")
    args = p.parse_args(argv)
    if min(args.sequence_parallel, args.steps, args.batch_size, args.save_every, args.grad_accum) < 1:
        p.error("--sequence-parallel, --steps, --batch-size, --grad-accum and --save-every must be >= 1")
    if args.strategy == "usp" and (args.ulysses_size < 1 or args.sequence_parallel % args.ulysses_size):
        p.error(f"--ulysses-size {args.ulysses_size} must divide --sequence-parallel {args.sequence_parallel}")
    return args


def load_tokens(args, tokenizer, out_dir: Path, accelerator) -> np.ndarray:
    """The dataset as one token stream, tokenized once (by rank 0) and cached in the output directory."""
    key = hashlib.sha1(f"{args.dataset}|{args.text_field}|{tokenizer.name_or_path}|{len(tokenizer)}".encode())
    cache = out_dir / f"tokens-{key.hexdigest()[:12]}.npy"
    with accelerator.main_process_first():
        if not cache.exists():
            if args.dataset == "linux-doc-train":
                from longattn.evals.corpora import linux_doc_split

                text = "\n\n".join(linux_doc_split()[0])
            else:
                from longattn.evals.texts import load_text

                text = load_text(args.dataset, field=args.text_field)
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, ids)
            tmp.rename(cache)
    tokens = np.load(cache)
    if len(tokens) < args.seq_len + 2:
        raise SystemExit(f"{args.dataset}: {len(tokens)} tokens, fewer than one sequence of --seq-len {args.seq_len}")
    return tokens


def step_batch(tokens: np.ndarray, step: int, args, dp: int, dp_rank: int, micro: int = 0):
    """(input_ids, labels) [batch, seq_len] of this replica's micro-batch `micro` at `step`: a function of
    (seed, step) only. A step draws dp x grad_accum x batch windows; replica r takes the r-th run of
    grad_accum x batch of them, micro-batch m the m-th batch of that run (so grad_accum N with batch B sees the
    same sequences as batch N x B without accumulation). Labels are the next tokens of the full window, i.e.
    shifted globally before any sharding."""
    rng = np.random.default_rng([args.seed, step])
    per_replica = args.grad_accum * args.batch_size
    starts = rng.integers(0, len(tokens) - args.seq_len - 1, size=dp * per_replica)
    first = dp_rank * per_replica + micro * args.batch_size
    mine = starts[first:first + args.batch_size]
    win = torch.from_numpy(np.stack([tokens[s:s + args.seq_len + 1] for s in mine]).astype(np.int64))
    return win[:, :-1], win[:, 1:]


def build_model(args, sp_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or str(longattn.reference_model_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.use_cache = False
    params = {"sliding_window": {"window": args.window},
              "sink_window": {"window": args.window, "sink_tokens": args.sink_tokens}}.get(args.method, {})
    if sp_config is not None:
        longattn.patch(model, args.method, sequence_parallel=sp_config, **params)
    elif args.method != "dense":
        longattn.patch(model, args.method, **params)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(model, lora)
        for name, p in model.named_parameters():  # LongLoRA: embeddings and norms train too
            if "embed" in name or "norm" in name:
                p.requires_grad_(True)
    return model.train(), tokenizer


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% (step counts from 0)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [p for p in out_dir.glob(CHECKPOINT_PREFIX + "*") if (p / "complete").exists()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler) -> None:
    """Written to a temporary directory, then renamed: a crash mid-save never leaves a half checkpoint."""
    final = out_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = out_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp / "state.pt")
    (tmp / "complete").write_text(f"{step}\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = set(state["trainable"]) - set(params)
    if missing:
        raise SystemExit(f"{path}: checkpoint parameters not in the model (different --model / --lora-rank?): "
                         f"{sorted(missing)[:5]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    args = parse_args(argv)
    # A finite process-group timeout: a rank that dies ends the others with an error, not a hang.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.timeout))])
    world, rank = accelerator.num_processes, accelerator.process_index
    sp = args.sequence_parallel
    if world % sp:
        raise SystemExit(f"world size {world} is not divisible by --sequence-parallel {sp} (world = SP x DP); "
                         f"launch a multiple of {sp} processes")
    dp = world // sp
    sp_group = dp_group = usp = None
    if world > 1:
        sp_group, dp_group, usp = parallel_groups(sp, args.ulysses_size if args.strategy == "usp" else None)
    sp_rank, dp_rank = rank % sp, rank // sp
    layout = ShardLayout(args.layout, sp)
    layout.check_length(args.seq_len)
    set_seed(args.seed)
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    sp_config = None
    if sp > 1:
        sp_config = SequenceParallel(group=sp_group, size=sp, strategy=args.strategy, layout=args.layout,
                                     ulysses_size=args.ulysses_size, usp_groups=usp, timeout_s=args.timeout)
    model, tokenizer = build_model(args, sp_config)
    model.to(accelerator.device)
    tokens = load_tokens(args, tokenizer, out_dir, accelerator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, args))

    start = 0
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, optimizer, scheduler)
    log_path = out_dir / "loss_log.jsonl"
    if accelerator.is_main_process:
        kept = []  # drop lines of steps after the checkpoint: they are about to be redone identically
        if log_path.exists() and start:
            kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        n_train = sum(p.numel() for p in trainable)
        accelerator.print(f"world {world} = SP {sp} ({args.strategy if sp > 1 else 'off'}) x DP {dp}; "
                          f"{args.grad_accum} x {args.batch_size} sequences per replica per step; "
                          f"{n_train:,} trainable parameters; "
                          f"{'resuming after step ' + str(start) if start else 'starting'}; log {log_path}")
    stop = min(args.steps, args.stop_at or args.steps)
    pos = layout.positions(sp_rank, args.seq_len, device=accelerator.device).expand(args.batch_size, -1)
    done = start
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not accelerator.is_main_process,
               desc="train_long")
    for step in bar:
        t0 = time.perf_counter()
        batches = [step_batch(tokens, step, args, dp, dp_rank, m) for m in range(args.grad_accum)]
        # Each micro-batch's mean loss weighs by its share of the step's predicted tokens: the sum of the
        # weighted losses (and of their gradients) is the mean over the whole step's batch.
        counts = [int((labels != IGNORE_INDEX).sum()) for _, labels in batches]
        value = torch.zeros((), device=accelerator.device)
        for (ids, labels), count in zip(batches, counts):
            ids, labels = ids.to(accelerator.device), labels.to(accelerator.device)
            if sp > 1:
                logits = model(input_ids=layout.shard(ids, sp_rank), position_ids=pos, use_cache=False).logits
                loss = sequence_parallel_loss(logits, layout.shard(labels, sp_rank), group=sp_group)
            else:
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            loss = loss * (count / max(1, sum(counts)))
            loss.backward()
            value += loss.detach()
            del logits, loss
        if world > 1:
            sync_gradients(trainable, sp_group=sp_group if sp > 1 else False, dp_group=dp_group)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if dp > 1:  # the logged loss is the mean over replicas (every SP rank already holds its group's value)
            dist.all_reduce(value, group=dp_group)
            value /= dp
        done = step + 1
        if accelerator.is_main_process:
            rec = {"step": done, "loss": value.item(), "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": done * dp * args.grad_accum * args.batch_size * args.seq_len,
                   "seconds": time.perf_counter() - t0}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if done % args.save_every == 0 or done == stop:
            if accelerator.is_main_process:  # replicas hold identical weights after sync_gradients
                save_checkpoint(out_dir, done, model, optimizer, scheduler)
            accelerator.wait_for_everyone()
    bar.close()
    if done == args.steps and accelerator.is_main_process and start < args.steps:
        save_final(model, tokenizer, out_dir / "final", args)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def save_final(model, tokenizer, path: Path, args) -> None:
    """The fine-tuned model as a plain HF checkpoint: LoRA merged, longattn's patch removed (load it with
    from_pretrained and patch it again as you like)."""
    if args.lora_rank:
        model = model.merge_and_unload()  # the embeddings and norms were trained in place on the base model
    longattn.unpatch(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


if __name__ == "__main__":
    main()
