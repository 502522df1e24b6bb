"""Streaming with a bounded KV cache on any model (StreamingLLM, arXiv:2309.17453, section 4.1).

Feeds a long held-out text token by token (or `--chunk N` tokens per forward) through a compressed cache and records each token's negative
log-likelihood and the cache's bytes after every step, for sinks + window (the paper's method), for the same
budget without sinks (window-only eviction) and for sinks + window with text positions; the in-window reference is strided perplexity with the window as
context (every token recomputed with up to `window` tokens of context). Then generates `--generate` tokens with
generate() and the StreamingLLM cache, recording cache bytes per step. Writes JSON and a plot; resumable per
configuration (finished configurations in the JSON are kept).

    python scripts/eval_streaming.py --tokens 20000 --out evals/results/streaming
    python scripts/eval_streaming.py --model smollm2-135m-instruct --tokens 16384 --chunk 64 --window 1020 \
        --text licenses --out evals/results/streaming-smollm2
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import longattn
from longattn.evals.perplexity import sliding_window_perplexity
from longattn.evals.texts import load_text
from longattn.kvcache import CompressedCache


def stream_nll(model, ids: torch.Tensor, policy: str, params: dict, chunk: int = 1) -> dict:
    """NLL of every token and the cache's bytes after every forward, feeding `chunk` tokens per forward through a
    compressed cache (the cache is cut to its budget after each forward, so a chunk's queries also see the
    chunk's own earlier tokens)."""
    longattn.patch(model, policy, **params)
    cache = CompressedCache(model._longattn.kv_policy, model)
    nll, cache_bytes = [], []
    start = time.perf_counter()
    n = ids.shape[1] - 1
    with torch.no_grad():
        for t in tqdm(range(0, n, chunk), desc=f"{policy} {params} chunk {chunk}", mininterval=10):
            end = min(t + chunk, n)
            logits = model(ids[:, t:end], cache=cache, use_cache=True).logits[0].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[0, t + 1:end + 1, None])[:, 0]
            nll += logp.neg().tolist()
            cache_bytes += [cache.nbytes()] * (end - t)
    longattn.unpatch(model)
    return {"policy": policy, "params": params, "nll": nll, "cache_bytes": cache_bytes,
            "seconds": time.perf_counter() - start}


def generate_bytes(model, ids: torch.Tensor, n_new: int, params: dict, pad_token_id: int) -> dict:
    """generate() n_new tokens with the StreamingLLM cache; cache bytes after every step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    longattn.patch(model, "streaming_llm", **params)
    seen = {}
    hook = model.base_model.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("cache", kw.get("cache")), with_kwargs=True)
    sizes = []

    class RecordBytes(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sizes.append(seen["cache"].nbytes())
            return scores

    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, top_k=20,
                         logits_processor=LogitsProcessorList([RecordBytes()]), pad_token_id=pad_token_id)
    hook.remove()
    longattn.unpatch(model)
    return {"new_tokens": int(out.shape[1] - ids.shape[1]), "cache_bytes": sizes,
            "seconds": time.perf_counter() - start, "final_positions_seen": seen["cache"].get_seq_length()}


def segment_ppl(nll: list[float], size: int) -> list[float]:
    return [math.exp(sum(nll[i:i + size]) / len(nll[i:i + size])) for i in range(0, len(nll), size)]


def plot(results: dict, path: Path, segment: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["runs"].items():
        ppl = segment_ppl(r["nll"], segment)
        ax1.plot([(i + 1) * segment for i in range(len(ppl))], ppl, label=name)
        ax2.plot([b / 2**20 for b in r["cache_bytes"]], label=name)
    ax1.axhline(results["in_window_ppl"], color="gray", ls="--", label="in-window (recomputed)")
    ax1.axvline(results["training_length"], color="gray", ls=":", lw=1)
    ax1.set(xlabel="tokens streamed", ylabel=f"perplexity per {segment} tokens", yscale="log",
            title=f"{results['model']} ({results.get('dtype', 'float32')}), "
                  + ("token by token" if results.get("chunk", 1) == 1 else f"{results['chunk']} tokens per forward"))
    ax2.set(xlabel="tokens streamed", ylabel="KV cache (MiB)", title="cache memory")
    if "generate" in results:
        ax2.plot([b / 2**20 for b in results["generate"]["cache_bytes"]], ls="--", label="generate() streaming")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--text", default="linux-doc-heldout")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--generate", type=int, default=20000, help="tokens to generate() (0 = skip)")
    ap.add_argument("--segment", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=1, help="tokens per forward (1 = token by token)")
    ap.add_argument("--model", default="reference", help="a name from `longattn models` or a HF model folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("evals/results/streaming"))
    args = ap.parse_args(argv)
    if args.chunk < 1:
        raise SystemExit(f"--chunk must be >= 1, got {args.chunk}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "streaming.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    older = {"model": "reference", "dtype": "float32", "chunk": 1}  # what results written before these options hold
    for key, value in (("model", args.model), ("dtype", args.dtype), ("chunk", args.chunk), ("text", args.text)):
        stored = results.get(key, older.get(key, value))
        if results["runs"] and stored != value:
            raise SystemExit(f"{path} holds runs with {key}={stored!r}, not {value!r}: use another --out")
    model, tok = longattn.load_model(args.model, dtype=args.dtype, device=args.device)
    text = load_text(args.text)
    ids = torch.tensor([tok(text)["input_ids"][:args.tokens]], device=model.device)  # BOS where the tokenizer adds one
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"{args.text} has only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    results.update(tokens=args.tokens, text=args.text, training_length=model.config.max_position_embeddings,
                   model=args.model, dtype=args.dtype, chunk=args.chunk)
    budget = args.sinks + args.window
    configs = {f"sinks {args.sinks} + window {args.window}": ("streaming_llm", dict(sink_tokens=args.sinks,
                                                                                      window=args.window)),
               f"window-only {budget}": ("streaming_llm", dict(sink_tokens=0, window=budget)),
               # The same sinks + window with text positions: past the training length RoPE sees positions the
               # model never learned, which is why StreamingLLM uses positions within the cache.
               f"sinks {args.sinks} + window {args.window}, text positions": (
                   "streaming_llm", dict(sink_tokens=args.sinks, window=args.window, shift_positions=False))}
    for name, (policy, params) in configs.items():
        if name not in results["runs"]:
            results["runs"][name] = stream_nll(model, ids, policy, params, args.chunk)
            path.write_text(json.dumps(results))
    if "in_window_ppl" not in results:
        r = sliding_window_perplexity(model, ids[0], context=budget, stride=1 if args.tokens <= 2000 else 64)
        results["in_window_ppl"] = r.perplexity
        path.write_text(json.dumps(results))
    if args.generate and "generate" not in results:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        results["generate"] = generate_bytes(model, ids[:, :64], args.generate,
                                             dict(sink_tokens=args.sinks, window=args.window), pad)
        path.write_text(json.dumps(results))
    summary = {name: {"ppl": math.exp(sum(r["nll"]) / len(r["nll"])),
                      "ppl_last_segment": segment_ppl(r["nll"], args.segment)[-1],
                      "max_cache_bytes": max(r["cache_bytes"]), "tokens_per_s": len(r["nll"]) / r["seconds"]}
               for name, r in results["runs"].items()}
    results["summary"] = summary
    if "generate" in results:
        g = results["generate"]
        results["summary"]["generate"] = {"new_tokens": g["new_tokens"], "max_cache_bytes": max(g["cache_bytes"]),
                                          "cache_bytes_after_window": sorted(set(g["cache_bytes"][args.window:])),
                                          "tokens_per_s": g["new_tokens"] / g["seconds"]}
    path.write_text(json.dumps(results))
    plot(results, args.out / "streaming.png", args.segment)
    print(json.dumps({"in_window_ppl": results["in_window_ppl"], **summary}, indent=1))


if __name__ == "__main__":
    main()
