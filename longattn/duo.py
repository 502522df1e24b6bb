"""DuoAttention's retrieval-head search (Xiao et al. 2024, arXiv:2410.10819): one gate per KV head mixes full
attention with sinks + a recent window; the gates are trained, the model frozen, so that the mixed model's last
hidden states on the answer tokens of synthetic needle prompts match the dense model's, under an L1 push towards
zero. Heads whose gate stays high are the ones that need their whole cache; `head_hybrid` keeps them full."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .kernels.dense import dense_attention
from .methods.base import AttendCall, AttentionMethod, check
from .methods.sink_window import SinkWindow


@dataclass
class GatedHeads(AttentionMethod):
    """Per KV head: gate * full attention + (1 - gate) * sinks + window (what `train_head_gates` optimises)."""

    name: ClassVar[str] = "duo_gates"
    paper: ClassVar[str] = "Xiao et al. 2024, DuoAttention (arXiv:2410.10819)"
    summary: ClassVar[str] = "full and sinks + window attention mixed per KV head by trainable gates"
    per_layer: ClassVar[bool] = True
    learned_sinks: ClassVar[bool] = True

    gates: torch.Tensor = None  # [attention layers, KV heads]
    layers: tuple = ()  # the attention layer of each row of `gates`
    sink_tokens: int = 4
    window: int = 256
    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self):
        check(self.name, "gates", isinstance(self.gates, torch.Tensor) and self.gates.dim() == 2
              and self.gates.shape[0] == len(self.layers), "a [layers, KV heads] tensor, one row per layer",
              None if self.gates is None else tuple(self.gates.shape))
        self._rows = {layer: i for i, layer in enumerate(self.layers)}
        self._streaming = SinkWindow(sink_tokens=self.sink_tokens, window=self.window, backend="auto")

    def attend(self, query, key, value, mask, call: AttendCall):
        if call.layer_idx not in self._rows:
            raise ValueError(f"duo_gates: no gates for layer {call.layer_idx}")
        gate = self.gates[self._rows[call.layer_idx]]
        if gate.numel() != key.shape[1]:
            raise ValueError(f"duo_gates: layer {call.layer_idx} has {key.shape[1]} KV heads, {gate.numel()} gates")
        full = dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap,
                               learned_sinks=call.learned_sinks)
        stream = self._streaming.attend(query, key, value, mask, call)
        a = gate.repeat_interleave(query.shape[1] // key.shape[1]).view(1, -1, 1, 1).to(full.dtype)
        return stream + a * (full - stream)


@dataclass
class GateTraining:
    """Settings of a gate search; a saved state resumes only under the same settings (`steps` may grow)."""

    length: int = 2048
    samples: int = 16  # prompts in the training pool, cycled
    steps: int = 200
    lr: float = 0.02  # Adam, as in the paper
    l1: float = 0.05  # weight of the mean gate in the loss
    sink_tokens: int = 4
    window: int = 256
    task: str = "niah_multivalue"
    chat: bool = False
    seed: int = 1000  # prompts drawn away from the evaluation sweeps' seeds

    def validate(self):
        for name in ("length", "samples", "steps", "sink_tokens", "window"):
            v = getattr(self, name)
            check("train_head_gates", name, isinstance(v, int) and v >= (0 if name == "sink_tokens" else 1),
                  "a positive integer", v)
        check("train_head_gates", "lr", self.lr > 0, "> 0", self.lr)
        check("train_head_gates", "l1", self.l1 >= 0, ">= 0", self.l1)
        if self.length <= self.sink_tokens + self.window:
            raise ValueError(f"train_head_gates: length {self.length} must exceed sink_tokens + window "
                             f"({self.sink_tokens + self.window}), or both attentions are the same")


def train_head_gates(model, tokenizer, settings: GateTraining = GateTraining(), *, state_path=None,
                     save_every: int = 10, progress: bool = True):
    """Train one gate per KV head (model frozen) and return them as a HeadProfile with the score "gate"
    (`head_hybrid(profile=..., score="gate")` keeps the highest full). With `state_path`, the gates, Adam's
    moments and the loss history are saved every `save_every` steps and an interrupted search resumes there."""
    from tqdm.auto import tqdm

    from .evals.tasks import make_task
    from .evals.tasks.base import Filler, PromptFormat, ids_of
    from .heads import HeadProfile, _heads
    from .models import attention_layer_indices
    from .patching import patch_state, patched

    settings.validate()
    if patch_state(model) is not None:
        raise ValueError("train_head_gates: unpatch the model first (the dense model is the teacher)")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("train_head_gates: load the model in float32 (gates are trained through it)")
    n_heads, n_kv = _heads(model)
    layers = tuple(attention_layer_indices(model))
    device = next(model.parameters()).device
    task = make_task(settings.task)
    pool = []  # (input ids with the answer appended, first position scored)
    for i in range(settings.samples):
        s = task.make(tokenizer, settings.length, seed=settings.seed + i, filler=Filler(),
                      depth=(i + 0.5) / settings.samples, prompt=PromptFormat(settings.chat))
        answer = ids_of(tokenizer, " " + ", ".join(s.answers))
        pool.append((torch.tensor([s.input_ids + answer], device=device), len(s.input_ids) - 1))
    base = model.base_model
    with torch.no_grad():
        teacher = [base(input_ids=ids).last_hidden_state[0, start:].float()
                   for ids, start in tqdm(pool, desc="teacher", disable=not progress, unit="prompt")]

    gates = torch.nn.Parameter(torch.ones(len(layers), n_kv, device=device))
    opt = torch.optim.Adam([gates], lr=settings.lr)
    step, history = 0, []
    state_path = None if state_path is None else Path(state_path)
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location=device)
        if _without_steps(state["settings"]) != _without_steps(_settings_dict(settings)):
            raise ValueError(f"{state_path}: a gate search with other settings ({state['settings']}); delete it or "
                             "use another path")
        with torch.no_grad():
            gates.copy_(state["gates"])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]

    def save():
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            torch.save({"settings": _settings_dict(settings), "gates": gates.detach().cpu(), "opt": opt.state_dict(),
                        "step": step, "history": history}, tmp)
            tmp.replace(state_path)

    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        method = GatedHeads(gates=gates, layers=layers, sink_tokens=settings.sink_tokens, window=settings.window)
        with patched(model, method):
            bar = tqdm(total=settings.steps, initial=step, desc="gates", disable=not progress, unit="step")
            while step < settings.steps:
                ids, start = pool[step % len(pool)]
                ref = teacher[step % len(pool)]
                h = base(input_ids=ids).last_hidden_state[0, start:].float()
                distill = ((h - ref) ** 2).sum(-1).mean() / (ref ** 2).sum(-1).mean()
                loss = distill + settings.l1 * gates.mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0, 1)
                step += 1
                history.append({"step": step, "distill": float(distill.detach()), "mean_gate": float(gates.detach().mean())})
                bar.update(1)
                bar.set_postfix(distill=f"{history[-1]['distill']:.2e}", gate=f"{history[-1]['mean_gate']:.3f}")
                if step % save_every == 0 or step == settings.steps:
                    save()
            bar.close()
    finally:
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)
    g = n_heads // n_kv
    per_query = [[float(v) for v in row.repeat_interleave(g)] for row in gates.detach().cpu()]
    return HeadProfile(getattr(model, "name_or_path", type(model).__name__), list(layers), n_heads, n_kv,
                       {"gate": per_query}, {**_settings_dict(settings), "prompts": settings.samples, "history": history,
                                             "descriptions": {"gate": "DuoAttention gate: how much of full attention "
                                                              "the head needs (1 = full, 0 = sinks + window)"}})


def _settings_dict(settings: GateTraining) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(settings)))


def _without_steps(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "steps"}


def plot_gate_history(profile, path) -> Path:
    """Distillation loss and mean gate over the search's steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = profile.settings["history"]
    steps = [h["step"] for h in hist]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(steps, [max(h["distill"], 1e-12) for h in hist], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("relative hidden-state error", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["mean_gate"] for h in hist], color="tab:orange")
    ax2.set_ylabel("mean gate", color="tab:orange")
    ax2.set_ylim(0, 1.05)
    ax.set_title(f"{profile.model}: DuoAttention gate search ({profile.settings['task']}, "
                 f"{profile.settings['length']} tokens)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
