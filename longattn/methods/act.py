"""Attention Calibration Technique (ACT): find attention sinks other than the first token on the fly and move
part of their attention to the other tokens, training-free, in chosen heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.dense import dense_attention, repeat_kv
from .attention_maps import QUERY_CHUNK, block_probs
from .base import AttendCall, AttentionMethod, check


def calibrate_block(probs, allowed, sinks, beta: float):
    """ACT on attention rows [B, H, Qc, K] given sink columns [B, H, K] (bool): sink entries are scaled by
    beta and the removed mass (1 - beta) * sum(sink attention) is added to the other keys in proportion to
    their attention. Rows with no attention outside the sinks are left unchanged."""
    s = sinks.unsqueeze(2) & allowed  # [B, H, Qc, K]
    removed = (probs * s).sum(-1, keepdim=True) * (1 - beta)
    rest = probs.masked_fill(s, 0.0)
    rest_sum = rest.sum(-1, keepdim=True)
    ok = rest_sum > 0
    out = torch.where(s, probs * beta, probs) + removed * rest / torch.where(ok, rest_sum, torch.ones_like(rest_sum))
    return torch.where(ok, out, probs)


@dataclass
class AttentionCalibration(AttentionMethod):
    """ACT (Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks, ICML 2024, arXiv:2406.15765,
    §4): in each calibrated head, a key k other than the first token is a sink when the mean attention it
    receives from the queries of the call that may attend to it exceeds `threshold`; each query's attention
    to the sinks is multiplied by `beta` and the removed mass is redistributed over the other keys (the
    first token included) in proportion to their attention. The first token is never a sink. Other heads
    attend densely.

    Heads: `heads` lists [layer, head] pairs to calibrate (the paper keeps the heads whose calibration helps
    on sample inputs: `longattn.act_select_heads`); None calibrates every head of the patched layers.
    The sink set depends on all queries of the call: a prefill computes it over the prompt, a decode step
    from that one query's attention, so decoding is a different function (as in the paper, which calibrates
    the prompt). Calibrated heads are computed in query blocks: pass 1 accumulates the column means, pass 2
    rescales; memory per head is query_chunk x keys.

    Parameters
    ----------
    threshold : float
        Mean received attention above which a token is a sink, in (0, 1) (the authors' scripts use 0.1).
    beta : float
        Factor kept of a sink's attention, in [0, 1] (0.4 in the authors' scripts).
    heads : list of [layer, head] or None
        Heads to calibrate; None = all heads of the patched layers.
    query_chunk : int
        Queries per materialized block (>= 1).
    """

    name = "act"
    per_layer = True
    paper = "Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks (ICML 2024, arXiv:2406.15765)"
    summary = "training-free: scale attention to non-first-token sinks by beta, redistribute to other tokens"

    threshold: float = 0.1
    beta: float = 0.4
    heads: list | None = None
    query_chunk: int = QUERY_CHUNK

    def validate(self):
        check(self.name, "threshold", isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1,
              "in (0, 1)", self.threshold)
        check(self.name, "beta", isinstance(self.beta, (int, float)) and 0 <= self.beta <= 1, "in [0, 1]",
              self.beta)
        check(self.name, "heads", self.heads is None or (isinstance(self.heads, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p)
            for p in self.heads)), "None or a list of [layer, head] pairs of non-negative integers", self.heads)
        check(self.name, "query_chunk", isinstance(self.query_chunk, int) and self.query_chunk >= 1,
              "an integer >= 1", self.query_chunk)

    def layer_heads(self, layer: int, n_heads: int) -> list[int]:
        if self.heads is None:
            return list(range(n_heads))
        chosen = sorted({h for lay, h in self.heads if lay == layer})
        if chosen and chosen[-1] >= n_heads:
            raise ValueError(f"{self.name}: head {chosen[-1]} of layer {layer} does not exist ({n_heads} heads)")
        return chosen

    def attend(self, query, key, value, mask, call: AttendCall):
        out = dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap, dropout=call.dropout)
        heads = self.layer_heads(call.layer_idx or 0, query.shape[1])
        if not heads:
            return out
        if call.dropout:
            raise ValueError(f"{self.name}: attention dropout is not supported in calibrated heads")
        idx = torch.tensor(heads, device=query.device)
        groups = query.shape[1] // key.shape[1]
        q = query.index_select(1, idx)
        k, v = repeat_kv(key, groups).index_select(1, idx), repeat_kv(value, groups).index_select(1, idx)
        chunks = [(s, min(s + self.query_chunk, mask.q_len)) for s in range(0, mask.q_len, self.query_chunk)]
        received = torch.zeros(q.shape[0], len(heads), mask.kv_len, device=q.device)
        seen = torch.zeros(q.shape[0], 1, mask.kv_len, device=q.device)
        for start, stop in chunks:  # pass 1: mean attention each key receives from the queries that see it
            probs, allowed = block_probs(q, k, mask, start, stop, call.scale, call.softcap)
            received += probs.sum(2)
            seen += allowed.sum(2)
        sinks = received / seen.clamp_min(1) > self.threshold
        first = torch.arange(mask.kv_len, device=q.device) + mask.kv_offset
        if mask.padding is not None:  # the first real token of each sequence (after left padding)
            first_real = mask.padding.long().argmax(-1).to(q.device)
            sinks &= (first.view(1, -1) != first_real.view(-1, 1)).unsqueeze(1)
        else:
            sinks &= (first != 0).view(1, 1, -1)
        parts = []
        for start, stop in chunks:  # pass 2: calibrated maps times values
            probs, allowed = block_probs(q, k, mask, start, stop, call.scale, call.softcap)
            parts.append(torch.matmul(calibrate_block(probs, allowed, sinks, self.beta).to(v.dtype), v))
        out = out.clone()
        out[:, idx] = torch.cat(parts, dim=2).to(out.dtype)
        return out


@torch.no_grad()
def act_select_heads(model, input_ids, *, threshold: float = 0.1, beta: float = 0.4, layers=None,
                     attention_mask=None) -> list[list[int]]:
    """The paper's head filtering (§4.2), with language-model loss on sample inputs as the score: calibrate
    one head at a time and keep the [layer, head] pairs whose calibration lowers the mean next-token loss of
    `input_ids` [B, S] below that of the unpatched model. The authors score accuracy on a task's samples;
    any held-out text works here. Costs one forward pass per head."""
    from ..models import attention_modules
    from ..patching import patch_state, patched

    if patch_state(model) is not None:
        raise ValueError("act_select_heads: unpatch the model first (it compares against the original)")

    def loss() -> float:
        return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss)

    base = loss()
    mods = attention_modules(model)
    n_heads = model.config.num_attention_heads
    keep = []
    for layer in (range(len(mods)) if layers is None else layers):
        for head in range(n_heads):
            spec = AttentionCalibration(threshold=threshold, beta=beta, heads=[[layer, head]])
            with patched(model, spec, layers=[layer]):
                if loss() < base:
                    keep.append([layer, head])
    return keep
