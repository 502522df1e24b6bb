"""Perturbed GQA: static query groups whose attention maps have noise subtracted during training."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.dense import dense_attention, repeat_kv
from .attention_maps import QUERY_CHUNK, block_probs
from .base import AttendCall, AttentionMethod, check


def row_matched_noise(probs, allowed, generator, diag_col):
    """Gaussian noise shaped like `probs` [B, H, Qc, K] with, per row and over the allowed keys, the same mean
    and standard deviation as that row of `probs`; drawn with the query's own key set to 0 before it is
    standardized (the authors' rule). `diag_col` [Qc] is the local key index of each query's own position
    (-1 when outside the keys)."""
    n = allowed.sum(-1, keepdim=True).clamp_min(1).float()  # [B, 1, Qc, 1]
    z = torch.randn(probs.shape, generator=generator, dtype=torch.float32).to(probs.device)
    own = torch.zeros_like(allowed)
    rows = torch.nonzero(diag_col >= 0).flatten()
    own[:, :, rows, diag_col[rows]] = True
    z = z.masked_fill(own | ~allowed, 0.0)

    def mean_std(x):
        mean = x.sum(-1, keepdim=True) / n
        var = ((x - mean) * allowed).pow(2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
        # sqrt has an infinite derivative at 0 (a row with one key): keep that row's std at exactly 0.
        positive = var > 0
        return mean, torch.where(positive, var, torch.ones_like(var)).sqrt() * positive

    zm, zs = mean_std(z)
    pm, ps = mean_std(probs)
    zs = torch.where(zs > 0, zs, torch.ones_like(zs))
    return (((z - zm) / zs) * ps + pm) * allowed


@dataclass
class PerturbedGQA(AttentionMethod):
    """PGQA (Khan et al. 2024, Key-Driven Grouped Query Attention, arXiv:2408.08454, §3): static (uniform,
    contiguous) GQA groups; each query head's attention map A (softmax probabilities) has a noise matrix N
    subtracted, A' = A - N, output A' V. N is Gaussian, its own-position entries zeroed, each row rescaled to
    the mean and standard deviation of that row of A over the keys the mask allows, so the perturbation is
    as large as the map's own spread. The paper states the noise on the attention maps; the authors' code
    subtracts it from the attention output instead. Noise is drawn in training mode only unless
    `at_inference` (the authors' code perturbs always); without noise PGQA is plain GQA.

    Noise is seeded: the n-th noisy call of layer l draws from a generator seeded with (seed, l, n), in
    query blocks of `query_chunk` rows. The map is materialized one query block at a time.

    Parameters
    ----------
    seed : int
        Seed of the noise.
    at_inference : bool
        Also perturb in eval mode.
    query_chunk : int
        Queries per materialized block (>= 1).
    """

    name = "pgqa"
    per_layer = True
    paper = "Khan et al. 2024, Key-Driven Grouped Query Attention (arXiv:2408.08454)"
    summary = "static GQA groups with row-matched Gaussian noise subtracted from the attention maps in training"

    seed: int = 0
    at_inference: bool = False
    query_chunk: int = QUERY_CHUNK
    calls: dict = field(default_factory=dict, repr=False, compare=False)  # layer -> noisy calls so far

    def validate(self):
        check(self.name, "seed", isinstance(self.seed, int), "an integer", self.seed)
        check(self.name, "at_inference", isinstance(self.at_inference, bool), "True or False", self.at_inference)
        check(self.name, "query_chunk", isinstance(self.query_chunk, int) and self.query_chunk >= 1,
              "an integer >= 1", self.query_chunk)

    def params(self):
        return {k: v for k, v in super().params().items() if k != "calls"}

    def generator(self, layer: int) -> torch.Generator:
        n = self.calls.get(layer, 0)
        self.calls[layer] = n + 1
        return torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 10_007 + n)

    def attend(self, query, key, value, mask, call: AttendCall):
        training = call.module is not None and call.module.training
        if not (training or self.at_inference):
            return dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap,
                                   dropout=call.dropout)
        if call.dropout:
            raise ValueError(f"{self.name}: attention dropout is not supported while the maps are perturbed")
        gen = self.generator(call.layer_idx or 0)
        groups = query.shape[1] // key.shape[1]
        k, v = repeat_kv(key, groups), repeat_kv(value, groups)
        outs = []
        for start in range(0, mask.q_len, self.query_chunk):
            stop = min(start + self.query_chunk, mask.q_len)
            probs, allowed = block_probs(query, k, mask, start, stop, call.scale, call.softcap)
            own = torch.arange(start, stop) + mask.q_offset - mask.kv_offset
            own = torch.where((own >= 0) & (own < mask.kv_len), own, torch.full_like(own, -1))
            probs = probs - row_matched_noise(probs, allowed, gen, own)
            outs.append(torch.matmul(probs.to(v.dtype), v))
        return torch.cat(outs, dim=2)
