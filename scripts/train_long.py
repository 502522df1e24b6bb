#!/usr/bin/env python
"""Fine-tune a Hugging Face causal LM on long sequences with sequence parallelism (ring / Ulysses attention).

The world is a named DeviceMesh (longattn.parallel.ParallelDims): --dp-replicate x --dp-shard x
--sequence-parallel ranks. Consecutive ranks share one sequence (each holds a zigzag shard of it; `--strategy
ring` passes K/V around them, `ulysses` exchanges heads all-to-all, `usp` does both: Ulysses over sub-groups of
`--ulysses-size` ranks, ring across). The model is sharded with FSDP2 per decoder layer over the data-shard x
sequence ranks (weights, gradients and optimizer state split over all of them), replicated over --dp-replicate
(HSDP). --dp-shard defaults to every rank the other degrees leave.

    # N processes on CPU (gloo); on GPUs drop --config_file and use your usual accelerate config
    accelerate launch --config_file scripts/accelerate_cpu.yaml --num_processes 4 \\
        scripts/train_long.py --sequence-parallel 2 --seq-len 4096 --steps 200 --lora-rank 8 --output-dir runs/long

By default it fine-tunes the reference model (longattn.reference_model_path()) on the linux-doc training text
(the reference model's own corpus); `--model PATH` and `--dataset FILE_OR_NAME` (a local .txt/.jsonl/.parquet
file or a `datasets` name) change that. `--lora-rank R` trains LoRA adapters on the attention projections plus
the embeddings and norms, as LongLoRA does (Chen et al. 2023, arXiv:2309.12307).

Gradients: the loss is the mean over every predicted token of the step on every rank (sequence_parallel_loss
over the world, divided by the step's token count), and FSDP2 averages the gradients over the ranks, which is
exactly the single-process gradient of the whole batch. --mixed-precision bf16 computes in bf16 (FSDP2's
parameter dtype; autocast in one process) with fp32 master weights, optimizer and gradient reduction;
--activation-checkpointing recomputes each decoder layer in the backward.

`--grad-accum N` runs N micro-batches of `--batch-size` sequences per optimizer step: each micro-batch's loss
is weighted by its share of the step's tokens before its backward, so the step's gradient (and the logged
loss) is that of one batch of N x batch-size sequences; gradients are synchronized once per step.

The data of step N depends only on (seed, N) and the global batch (dp x grad-accum x batch-size), not on how it
is split. Checkpoints are torch.distributed.checkpoint directories (trainable weights, optimizer, scheduler,
step, RNG), written in shards by every rank and resharded on load: a run resumes where it stopped (loss log
included), on the same or on a different number of processes. The finished model (LoRA merged) is saved
with save_pretrained to OUTPUT_DIR/final; the loss log is OUTPUT_DIR/loss_log.jsonl, one line per step.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import longattn
from longattn.parallel import (IGNORE_INDEX, ParallelDims, ShardLayout, count_tokens, fully_shard_model,
                               sequence_parallel_loss)
from longattn.parallel.fsdp import (PRECISIONS, TrainState, full_model_state, full_tensor, load_checkpoint,
                                    save_checkpoint)

CHECKPOINT_PREFIX = "checkpoint-"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the reference model)")
    p.add_argument("--dataset", default="linux-doc-train",
                   help="linux-doc-train (default), python-doc, a local .txt/.jsonl/.json/.parquet file or a "
                        "datasets name")
    p.add_argument("--text-field", default="text", help="column holding the text (jsonl / parquet / datasets)")
    p.add_argument("--sequence-parallel", type=int, default=1, help="ranks sharing one sequence")
    p.add_argument("--dp-replicate", type=int, default=1, help="data-parallel replicas of the FSDP-sharded model")
    p.add_argument("--dp-shard", type=int, default=None,
                   help="FSDP2 data-parallel shards per replica (default: world / (dp-replicate x SP))")
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
                   help="sequences per data-parallel rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--mixed-precision", default="fp32", choices=sorted(PRECISIONS))
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer")
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
    if min(args.sequence_parallel, args.dp_replicate, args.steps, args.batch_size, args.save_every,
           args.grad_accum) < 1 or (args.dp_shard is not None and args.dp_shard < 1):
        p.error("--sequence-parallel, --dp-replicate, --dp-shard, --steps, --batch-size, --grad-accum and "
                "--save-every must be >= 1")
    if args.strategy == "usp" and (args.ulysses_size < 1 or args.sequence_parallel % args.ulysses_size):
        p.error(f"--ulysses-size {args.ulysses_size} must divide --sequence-parallel {args.sequence_parallel}")
    return args


def parallel_dims(args, world: int) -> ParallelDims:
    """The mesh degrees for this launch; a clear error (SystemExit) when they do not multiply to the world."""
    usp = args.ulysses_size if args.strategy == "usp" else 1
    try:
        if args.dp_shard is None:
            return ParallelDims.for_world(world, dp_replicate=args.dp_replicate, sp=args.sequence_parallel,
                                          strategy=args.strategy, ulysses_size=usp)
        dims = ParallelDims(args.dp_replicate, args.dp_shard, args.sequence_parallel, args.strategy, usp)
    except ValueError as e:
        raise SystemExit(f"train_long: {e}") from e
    if dims.world != world:
        raise SystemExit(f"train_long: --dp-replicate {dims.dp_replicate} x --dp-shard {dims.dp_shard} x "
                         f"--sequence-parallel {dims.sp} = {dims.world} ranks, but {world} processes were launched")
    return dims


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


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% (step counts from 0)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [p for p in out_dir.glob(CHECKPOINT_PREFIX + "*") if (p / "complete").exists()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def build_model(args, sp_config=None):
    """The model, patched (with sequence parallelism if `sp_config`), with LoRA adapters if asked."""
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


def memory_report(model, optimizer) -> dict:
    """Bytes this rank holds of the weights, gradients and optimizer state (its FSDP shards)."""
    from longattn.parallel.fsdp import local_bytes

    states = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    return {"weights": local_bytes(model.parameters()), "gradients": local_bytes(p.grad for p in model.parameters()),
            "optimizer": local_bytes(states)}


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    args = parse_args(argv)
    # A finite process-group timeout: a rank that dies ends the others with an error, not a hang.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.timeout))])
    world = accelerator.num_processes
    dims = parallel_dims(args, world)
    mesh = dims.build_mesh(accelerator.device.type) if world > 1 else None
    sp_rank, dp_rank = (mesh.sp_rank, mesh.dp_rank) if mesh else (0, 0)
    layout = ShardLayout(args.layout, dims.sp)
    layout.check_length(args.seq_len)
    set_seed(args.seed)
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    sp_config = mesh.sequence_parallel(args.layout, timeout_s=args.timeout) if mesh else None
    model, tokenizer = build_model(args, sp_config)
    model.to(accelerator.device)
    if mesh is not None:
        fully_shard_model(model, mesh.fsdp, mixed_precision=args.mixed_precision,
                          activation_checkpointing=args.activation_checkpointing)
    elif args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = load_tokens(args, tokenizer, out_dir, accelerator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, args))
    state = TrainState(0, scheduler)

    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        load_checkpoint(ckpt, model, optimizer, state)
    start = state.step
    log_path = out_dir / "loss_log.jsonl"
    if accelerator.is_main_process:
        kept = []  # drop lines of steps after the checkpoint: they are about to be redone identically
        if log_path.exists() and start:
            kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        n_train = sum(p.numel() for p in trainable)
        accelerator.print(f"world {world} = DP replicate {dims.dp_replicate} x DP shard {dims.dp_shard} x SP "
                          f"{dims.sp} ({args.strategy if dims.sp > 1 else 'off'}); FSDP2 over "
                          f"{dims.dp_shard * dims.sp if mesh else 1} ranks; {args.grad_accum} x {args.batch_size} "
                          f"sequences per data rank per step; {n_train:,} trainable parameters; "
                          f"{'resuming after step ' + str(start) if start else 'starting'}; log {log_path}")
    stop = min(args.steps, args.stop_at or args.steps)
    pos = layout.positions(sp_rank, args.seq_len, device=accelerator.device).expand(args.batch_size, -1)
    autocast = (torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
                if args.mixed_precision == "bf16" and mesh is None else contextlib.nullcontext())
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not accelerator.is_main_process,
               desc="train_long")
    for step in bar:
        t0 = time.perf_counter()
        batches = [step_batch(tokens, step, args, dims.dp, dp_rank, m) for m in range(args.grad_accum)]
        batches = [(layout.shard(i, sp_rank).to(accelerator.device), layout.shard(lab, sp_rank).to(accelerator.device))
                   for i, lab in batches]
        # Every micro-batch's loss is its tokens' sum over the step's count on every rank: their gradients add
        # up to the gradient of the mean over the whole step's batch.
        step_tokens = count_tokens(torch.cat([lab.flatten() for _, lab in batches]))
        value = torch.zeros((), device=accelerator.device)
        for m, (ids, labels) in enumerate(batches):
            if mesh is not None:  # FSDP2 reduces the gradients once per step, after the last micro-batch
                model.set_requires_gradient_sync(m == len(batches) - 1)
            with autocast:
                logits = model(input_ids=ids, position_ids=pos if dims.sp > 1 else None, use_cache=False).logits
            loss = sequence_parallel_loss(logits, labels, num_tokens=step_tokens)
            loss.backward()
            value += loss.detach()
            del logits, loss
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        memory = memory_report(model, optimizer) if step == start else None  # optimizer state exists now
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = done = step + 1
        if accelerator.is_main_process:
            rec = {"step": done, "loss": value.item(), "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": done * dims.dp * args.grad_accum * args.batch_size * args.seq_len,
                   "seconds": time.perf_counter() - t0}
            if memory is not None:
                rec["rank0_bytes"] = memory
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if done % args.save_every == 0 or done == stop:
            save_checkpoint(out_dir / f"{CHECKPOINT_PREFIX}{done:06d}", model, optimizer, state)
    bar.close()
    if state.step == args.steps and start < args.steps:
        save_final(model, tokenizer, out_dir / "final", args, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def save_final(model, tokenizer, path: Path, args, main_process: bool) -> None:
    """The fine-tuned model as a plain HF checkpoint: gathered from the shards, LoRA merged, longattn's patch
    removed (load it with from_pretrained and patch it again as you like)."""
    weights = full_model_state(model)  # collective: every rank takes part, rank 0 receives it
    if not main_process:
        return
    plain, _ = build_model(args)  # unsharded, without sequence parallelism
    plain.load_state_dict(weights)
    if args.lora_rank:
        plain = plain.merge_and_unload()  # the embeddings and norms were trained in place on the base model
    longattn.unpatch(plain)
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)


if __name__ == "__main__":
    main()
