"""What every attention head does: per layer and head, the attention mass on the first tokens (sinks, Xiao et al.
2023, arXiv:2309.17453), the strongest non-first-token sink (ACT, Yu et al. 2024, arXiv:2406.15765), the mass
within a local window, the entropy, and a retrieval score (the share of needle tokens a head copies while the
model answers, Wu et al. 2024, arXiv:2404.15574). Attention is observed in query chunks during ordinary dense
forwards (the model's outputs are unchanged); no queries x keys matrix is ever held beyond one chunk."""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .kernels.dense import dense_attention
from .methods.attention_maps import block_probs
from .methods.base import AttendCall, AttentionMethod, check

SCORES = ("sink", "non_first_sink", "local", "distant", "entropy", "retrieval")
DESCRIPTIONS = {
    "sink": "attention mass on the first {sink_tokens} tokens",
    "non_first_sink": "largest mean attention a token after the first {sink_tokens} receives (ACT's non-first sinks)",
    "local": "attention mass on the {window} most recent tokens (sinks excluded)",
    "distant": "attention mass beyond the first {sink_tokens} and the {window} most recent tokens (what a "
               "sinks + window head loses)",
    "entropy": "entropy of the attention distribution / log(keys seen)",
    "retrieval": "share of needle tokens the head copies (top attention on that token while it is generated)",
}


class _Sums:
    """Per-layer running sums over observed queries, [Hq] each, plus the argmax key of each call's last query."""

    def __init__(self, n_heads: int, device):
        z = torch.zeros(n_heads, dtype=torch.float64, device=device)
        self.sink, self.local, self.entropy, self.queries = z.clone(), z.clone(), z.clone(), 0
        self.non_first, self.prefills = z.clone(), 0  # sum over prefills of each one's strongest later sink
        self.last_argmax: list[torch.Tensor] = []  # one [Hq] per forward: the newest query's top key


@dataclass
class HeadObserver(AttentionMethod):
    """Dense attention that also accumulates per-head attention statistics (used by `profile_heads`)."""

    name: ClassVar[str] = "observe_heads"
    paper: ClassVar[str] = "Xiao et al. 2023 (sinks); Yu et al. 2024, ACT; Wu et al. 2024, retrieval heads"
    summary: ClassVar[str] = "dense attention, observed per head"
    per_layer: ClassVar[bool] = True

    sink_tokens: int = 4
    window: int = 256
    query_chunk: int = 256
    sums: dict = field(default_factory=dict, repr=False, compare=False)

    def validate(self):
        for name in ("sink_tokens", "window", "query_chunk"):
            check("profile_heads", name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                  "an integer >= 1", getattr(self, name))

    def attend(self, query, key, value, mask, call: AttendCall):
        out = dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap)
        with torch.no_grad():
            self._observe(query, key, mask, call)
        return out

    def _observe(self, query, key, mask, call: AttendCall) -> None:
        if mask.batch_size != 1 or mask.padding is not None and not bool(mask.padding.all()):
            raise ValueError("profile_heads observes one unpadded prompt at a time")
        b, hq, q_len, _ = query.shape
        key = key.repeat_interleave(hq // key.shape[1], dim=1)
        sums = self.sums.setdefault(call.layer_idx, _Sums(hq, query.device))
        k_pos = torch.arange(mask.kv_len, device=query.device) + mask.kv_offset
        sink_keys = k_pos < self.sink_tokens
        # Only queries far enough in tell sinks, local and the rest apart: past sinks + window.
        first_counted = self.sink_tokens + self.window
        n_seen = torch.zeros(mask.kv_len, dtype=torch.float64, device=query.device)
        received = torch.zeros(hq, mask.kv_len, dtype=torch.float64, device=query.device)
        for start in range(0, q_len, self.query_chunk):
            stop = min(start + self.query_chunk, q_len)
            probs, allowed = block_probs(query, key, mask, start, stop, call.scale, call.softcap)
            p = probs[0]  # [Hq, c, K]
            if stop == q_len:
                sums.last_argmax.append(p[:, -1].argmax(-1).cpu() + mask.kv_offset)
            if q_len == 1:  # a decoding step: only its top key (retrieval) is recorded
                break
            q_pos = torch.arange(start, stop, device=query.device) + mask.q_offset
            counted = q_pos >= first_counted
            if not counted.any():
                continue
            p, q_pos, seen = p[:, counted], q_pos[counted], allowed[0, 0][counted]
            local = (k_pos[None] > q_pos[:, None] - self.window) & ~sink_keys[None] & seen
            sums.sink += p[..., sink_keys].sum(-1).sum(-1).double()
            sums.local += (p * local).sum(-1).sum(-1).double()
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / torch.log(seen.sum(-1).clamp_min(2).double())
            sums.entropy += ent.sum(-1)
            sums.queries += int(counted.sum())
            received += p.sum(1).double()
            n_seen += seen.sum(0).double()
        # A non-first sink must be seen by at least a window of counted queries (a recent token seen by a
        # handful of queries is local, not a sink).
        eligible = (~sink_keys) & (n_seen >= self.window)
        if q_len > 1 and eligible.any():
            sums.non_first += (received[:, eligible] / n_seen[eligible]).max(-1).values
            sums.prefills += 1


@dataclass
class HeadProfile:
    """Scores per attention layer and query head ([layer][head]), and per KV head (the max over its query
    heads: a KV head matters if any of its query heads does)."""

    model: str
    layers: list[int]
    num_heads: int
    num_kv_heads: int
    scores: dict
    settings: dict

    def __post_init__(self):
        if "distant" not in self.scores and {"sink", "local"} <= set(self.scores):  # profiles saved before it
            self.scores["distant"] = [[max(0.0, 1 - s - l) for s, l in zip(rs, rl)]
                                      for rs, rl in zip(self.scores["sink"], self.scores["local"])]

    @property
    def kv_scores(self) -> dict:
        g = self.num_heads // self.num_kv_heads
        return {name: [[max(row[h * g:(h + 1) * g]) for h in range(self.num_kv_heads)] for row in rows]
                for name, rows in self.scores.items()}

    def top_kv_heads(self, score: str = "retrieval", share: float = 0.25) -> dict[int, list[int]]:
        """{layer: [KV heads]}: the `share` of all KV heads with the highest `score` (at least one)."""
        if score not in self.scores:
            raise ValueError(f"unknown score {score!r}; one of {sorted(self.scores)}")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        flat = [(v, layer, h) for layer, row in zip(self.layers, self.kv_scores[score]) for h, v in enumerate(row)]
        keep = sorted(flat, key=lambda t: (-t[0], t[1], t[2]))[:max(1, round(share * len(flat)))]
        chosen: dict[int, list[int]] = {}
        for _, layer, h in sorted(keep, key=lambda t: (t[1], t[2])):
            chosen.setdefault(layer, []).append(h)
        return chosen

    def random_kv_heads(self, share: float = 0.25, seed: int = 0) -> dict[int, list[int]]:
        """{layer: [KV heads]}: as many KV heads as `top_kv_heads(share=share)` chooses, drawn at random."""
        import random

        flat = [(layer, h) for layer in self.layers for h in range(self.num_kv_heads)]
        chosen: dict[int, list[int]] = {}
        for layer, h in sorted(random.Random(seed).sample(flat, max(1, round(share * len(flat))))):
            chosen.setdefault(layer, []).append(h)
        return chosen

    def top_layers(self, score: str = "retrieval", share: float = 0.25) -> dict[int, list[int]]:
        """{layer: every KV head}: the `share` of layers with the highest mean `score` (a per-layer hybrid)."""
        if score not in self.scores:
            raise ValueError(f"unknown score {score!r}; one of {sorted(self.scores)}")
        means = sorted(((sum(row) / len(row), layer) for layer, row in zip(self.layers, self.scores[score])),
                       key=lambda t: (-t[0], t[1]))
        keep = sorted(layer for _, layer in means[:max(1, round(share * len(self.layers)))])
        return {layer: list(range(self.num_kv_heads)) for layer in keep}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "kv_scores": self.kv_scores}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> HeadProfile:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"head profile not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a head profile (invalid JSON: {e.msg})") from None
        missing = {"model", "layers", "num_heads", "num_kv_heads", "scores"} - set(d)
        if missing:
            raise ValueError(f"{path}: not a head profile (missing {sorted(missing)})")
        return cls(d["model"], d["layers"], d["num_heads"], d["num_kv_heads"], d["scores"], d.get("settings", {}))


def _heads(model) -> tuple[int, int]:
    cfg = model.config.get_text_config(decoder=True)
    n = cfg.num_attention_heads
    return n, getattr(cfg, "num_key_value_heads", None) or n


def profile_heads(model, tokenizer, *, length: int = 2048, samples: int = 4, sink_tokens: int = 4,
                  window: int = 256, tasks=("passkey", "niah_single"), filler=None, seed: int = 0,
                  chat: bool = False, progress: bool = True) -> HeadProfile:
    """Profile every attention head of `model` on `samples` needle prompts per task of `length` tokens: prefill
    statistics over every prompt, retrieval scores from greedy answers (longattn's task generators)."""
    from .evals.runner import sample_depths
    from .evals.tasks import make_task
    from .evals.tasks.base import Filler, PromptFormat
    from .models import attention_layer_indices
    from .patching import patch_state, patched

    if patch_state(model) is not None:
        raise ValueError("profile_heads: unpatch the model first (it observes the model's own dense attention)")
    if length <= sink_tokens + window:
        raise ValueError(f"length {length} must exceed sink_tokens + window ({sink_tokens + window}) so that "
                         f"queries can tell sinks, local keys and the rest apart")
    n_heads, n_kv = _heads(model)
    layers = list(attention_layer_indices(model))
    observer = HeadObserver(sink_tokens=sink_tokens, window=window)
    hits = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    targets = 0
    device = next(model.parameters()).device
    prompts = [(name, make_task(name).make(tokenizer, length, seed=seed * 1_000_003 + i, filler=filler or Filler(),
                                           depth=d, prompt=PromptFormat(chat)))
               for name in tasks for i, d in enumerate(sample_depths(samples))]
    from tqdm.auto import tqdm

    with patched(model, observer), torch.no_grad():
        for name, s in tqdm(prompts, desc="profile_heads", disable=not progress, unit="prompt"):
            for sums in observer.sums.values():
                sums.last_argmax.clear()
            ids = torch.tensor([s.input_ids], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            new = out[0, ids.shape[1]:].tolist()
            needle = {}
            for start, n in s.meta["needle_spans"]:
                for pos in range(start, start + n):
                    needle.setdefault(s.input_ids[pos], set()).add(pos)
            for step, token in enumerate(new):
                if token not in needle:
                    continue
                targets += 1
                for li, layer in enumerate(layers):
                    top = observer.sums[layer].last_argmax[step]
                    hits[li] += torch.tensor([int(top[h]) in needle[token] for h in range(n_heads)],
                                             dtype=torch.float64)
    scores = {name: [] for name in SCORES}
    for li, layer in enumerate(layers):
        sums = observer.sums[layer]
        q = max(sums.queries, 1)
        scores["sink"].append((sums.sink / q).tolist())
        scores["non_first_sink"].append((sums.non_first / max(sums.prefills, 1)).tolist())
        scores["local"].append((sums.local / q).tolist())
        scores["distant"].append((1 - (sums.sink + sums.local) / q).clamp_min(0).tolist())
        scores["entropy"].append((sums.entropy / q).tolist())
        scores["retrieval"].append((hits[li] / max(targets, 1)).tolist())
    settings = {"length": length, "samples": samples, "tasks": list(tasks), "sink_tokens": sink_tokens,
                "window": window, "seed": seed, "chat": chat, "needle_tokens_generated": targets,
                "prompts": len(prompts), "dtype": str(next(model.parameters()).dtype),
                "descriptions": {k: v.format(sink_tokens=sink_tokens, window=window) for k, v in DESCRIPTIONS.items()}}
    return HeadProfile(getattr(model, "name_or_path", type(model).__name__), layers, n_heads, n_kv, scores, settings)


def plot_profile(profile: HeadProfile, out_dir, kv: bool = False) -> list[Path]:
    """One layer x head heatmap (PNG) per score, model and settings in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    scores = profile.kv_scores if kv else profile.scores
    s = profile.settings
    for name, rows in scores.items():
        data = torch.tensor(rows).numpy()
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.45 * data.shape[1]), max(3.4, 1.6 + 0.22 * data.shape[0])))
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(data.max())))
        ax.set_xlabel("KV head" if kv else "query head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(profile.layers)), [str(i) for i in profile.layers], fontsize=7)
        ax.set_xticks(range(data.shape[1]), [str(i) for i in range(data.shape[1])], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fallback = DESCRIPTIONS.get(name, name).format(sink_tokens=s.get("sink_tokens"), window=s.get("window"))
        what = textwrap.fill(s.get("descriptions", {}).get(name, fallback), 70)
        ax.set_title(f"{profile.model}: {name}\n{what}\n{s.get('prompts')} prompts x {s.get('length')} tokens",
                     fontsize=8)
        fig.tight_layout()
        path = out_dir / f"heads_{name}{'_kv' if kv else ''}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def attention_map(model, input_ids: torch.Tensor, layer: int, head: int, block: int = 64) -> torch.Tensor:
    """[S/block, S/block] block-averaged attention probabilities of one layer and query head over a prompt
    (queries in chunks; mean over each block's query-key pairs that are causal)."""
    from .patching import patched

    if input_ids.shape[0] != 1:
        raise ValueError("attention_map takes one prompt [1, S]")
    rec = _MapRecorder(layer=layer, head=head, block=block)
    with patched(model, rec), torch.no_grad():
        model(input_ids=input_ids)
    if rec.map is None:
        raise ValueError(f"layer {layer} is not an attention layer of {type(model).__name__}")
    return rec.map


@dataclass
class _MapRecorder(AttentionMethod):
    """Dense attention that block-averages one layer's and head's probabilities."""

    name: ClassVar[str] = "attention_map"
    per_layer: ClassVar[bool] = True

    layer: int = 0
    head: int = 0
    block: int = 64
    query_chunk: int = 256
    map: object = field(default=None, repr=False, compare=False)

    def attend(self, query, key, value, mask, call: AttendCall):
        out = dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap)
        if call.layer_idx == self.layer:
            if not 0 <= self.head < query.shape[1]:
                raise ValueError(f"head {self.head} out of range (0..{query.shape[1] - 1})")
            kv_head = self.head // (query.shape[1] // key.shape[1])
            q, k = query[:, self.head:self.head + 1], key[:, kv_head:kv_head + 1]
            nb_q, nb_k = math.ceil(mask.q_len / self.block), math.ceil(mask.kv_len / self.block)
            total = torch.zeros(nb_q, nb_k, dtype=torch.float64)
            count = torch.zeros(nb_q, nb_k, dtype=torch.float64)
            with torch.no_grad():
                for start in range(0, mask.q_len, self.query_chunk):
                    stop = min(start + self.query_chunk, mask.q_len)
                    probs, allowed = block_probs(q, k, mask, start, stop, call.scale, call.softcap)
                    rows = torch.arange(start, stop) // self.block
                    total.index_add_(0, rows, _column_blocks(probs[0, 0].double().cpu(), self.block, nb_k))
                    count.index_add_(0, rows, _column_blocks(allowed[0, 0].double().cpu(), self.block, nb_k))
            self.map = (total / count.clamp_min(1)).float()
        return out


def _column_blocks(x: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """[rows, K] -> [rows, n_blocks]: sums over consecutive runs of `block` columns."""
    x = torch.nn.functional.pad(x, (0, n_blocks * block - x.shape[-1]))
    return x.view(x.shape[0], n_blocks, block).sum(-1)


def plot_attention_map(amap: torch.Tensor, path, title: str, block: int, marks: dict | None = None) -> Path:
    """The block-averaged map on a log colour scale; `marks` {label: token position} drawn as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    data = amap.numpy()
    positive = data[data > 0]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(data, cmap="magma", norm=LogNorm(vmin=max(float(positive.min()), 1e-8) if positive.size else 1e-8,
                                                   vmax=max(float(data.max()), 1e-7)), origin="upper")
    n = data.shape[0] * block
    ticks = [t for t in range(0, data.shape[0], max(1, data.shape[0] // 8))]
    ax.set_xticks(ticks, [str(t * block) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(t * block) for t in ticks], fontsize=7)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    colours = ["cyan", "lime", "white", "orange"]
    for i, (label, pos) in enumerate((marks or {}).items()):  # through the middle of the block holding it
        ax.axvline(pos // block, color=colours[i % len(colours)], lw=0.9, ls="--", label=f"{label} (token {pos})")
    if marks:  # below the axes, outside the data
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(marks), fontsize=7, frameon=False)
    fig.colorbar(im, ax=ax, fraction=0.046, label="mean attention per pair (log)")
    ax.set_title(textwrap.fill(title, 60) + f"\n{n} tokens, {block}-token blocks", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
