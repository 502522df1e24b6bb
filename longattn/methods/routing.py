"""Content-based routing attention (Routing Transformer): queries and keys are routed to the nearest of a
few centroids, and each query attends only to earlier keys of its own cluster."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels.masks import AttentionMask
from ..kernels.primitives import softmax_lse
from .base import AttendCall, AttentionMethod, check


def route(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster index [B, H, S] of each vector: the centroid [H, C, D] of highest cosine similarity."""
    return torch.einsum("bhsd,hcd->bhsc", F.normalize(x.float(), dim=-1), centroids).argmax(dim=-1)


def _by_cluster(cluster: torch.Tensor, n_clusters: int):
    """Indices [B, H, C, W] of the positions in each cluster, in order, padded with -1 to the largest; and
    the slot (cluster * W + rank) [B, H, N] of each position in that layout."""
    b, h, n = cluster.shape
    order = torch.argsort(cluster * n + torch.arange(n, device=cluster.device), dim=-1)
    counts = torch.zeros(b, h, n_clusters, dtype=torch.long, device=cluster.device).scatter_add_(
        -1, cluster, torch.ones_like(cluster))
    width = max(1, int(counts.max()))
    sorted_cluster = cluster.gather(-1, order)
    rank = torch.arange(n, device=cluster.device) - (counts.cumsum(-1) - counts).gather(-1, sorted_cluster)
    slots = sorted_cluster * width + rank
    at = torch.full((b, h, n_clusters * width), -1, dtype=torch.long, device=cluster.device)
    at.scatter_(-1, slots, order)
    slot_of = torch.empty_like(cluster).scatter_(-1, order, slots)
    return at.view(b, h, n_clusters, width), slot_of


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at index [B, H, ...] (clamped; callers mask the -1 slots) -> [B, H, ..., D]."""
    flat = index.clamp_min(0).flatten(2)
    return x.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])).view(*index.shape, x.shape[-1])


def clustered_attention(query, key, value, mask: AttentionMask, q_cluster, k_cluster, scale: float):
    """Exact attention where q sees k iff the mask allows it and both are in the same cluster, plus q's own
    position (so no query is left without a key). Queries and keys are grouped by cluster and each cluster is
    one tile: work and memory ~ sum over clusters of its queries x its keys, not S x S. Returns the output
    and the attended pairs per sequence and head."""
    b, hq, q_len, d = query.shape
    groups = hq // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    k_len = key.shape[2]
    n_clusters = int(torch.maximum(q_cluster.max(), k_cluster.max())) + 1
    (q_at, q_slot), (k_at, _) = _by_cluster(q_cluster, n_clusters), _by_cluster(k_cluster, n_clusters)
    qc, kc, vc = _take(query, q_at), _take(key, k_at), _take(value, k_at)
    q_pos = (q_at + mask.q_offset).unsqueeze(-1)  # [B, H, C, Wq, 1]
    k_pos = (k_at.clamp_min(0) + mask.kv_offset).unsqueeze(-2)  # [B, H, C, 1, Wk]
    batch_idx = torch.arange(b, device=query.device).view(b, 1, 1, 1, 1)
    head_idx = torch.zeros(1, dtype=torch.long, device=query.device).view(1, 1, 1, 1, 1)
    q_eval = q_pos.clamp_min(mask.q_offset)
    allowed = (q_at >= 0).unsqueeze(-1) & (k_at >= 0).unsqueeze(-2) & mask.fn(batch_idx, head_idx, q_eval, k_pos)
    scores = torch.matmul(qc, kc.transpose(-1, -2)).float() * scale
    # The query's own key, unless it already sits in the query's cluster.
    own = (q_at.clamp_min(0) + mask.q_offset - mask.kv_offset).clamp(0, k_len - 1)  # local key index
    own_in_cluster = k_cluster.gather(-1, own.flatten(2)).view_as(own) == torch.arange(
        n_clusters, device=query.device).view(1, 1, -1, 1)
    own_ok = (q_at >= 0) & ~own_in_cluster & mask.fn(batch_idx[..., 0], head_idx[..., 0], q_eval[..., 0],
                                                      own + mask.kv_offset)
    k_own, v_own = _take(key, own), _take(value, own)
    s_own = (qc * k_own).sum(-1).float() * scale
    scores = torch.cat([scores.masked_fill(~allowed, float("-inf")),
                        s_own.masked_fill(~own_ok, float("-inf")).unsqueeze(-1)], dim=-1)
    probs = softmax_lse(scores)[0].to(value.dtype)
    out_c = torch.matmul(probs[..., :-1], vc) + probs[..., -1:] * v_own  # [B, H, C, Wq, D]
    out = out_c.flatten(2, 3).gather(2, q_slot.unsqueeze(-1).expand(-1, -1, -1, d))  # back to query order
    pairs = int(allowed.sum() + own_ok.sum()) // (b * hq)
    return out, pairs


@dataclass
class Routing(AttentionMethod):
    """Routing attention (Roy et al. 2021, Efficient Content-Based Sparse Attention with Routing
    Transformers, arXiv:2003.05997): per head, queries and keys go to the nearest of `n_clusters` unit
    centroids (cosine similarity); a query attends to the earlier keys of its cluster and to itself.

    Centroids start as seeded random unit vectors per layer and head. In training mode they follow the
    online k-means rule of the paper, mu <- decay * mu + (1 - decay) * mean of the vectors routed to it;
    with `fit_iterations` > 0 a prefill pass first runs that many k-means (Lloyd) steps on its own keys and
    keeps the result. At inference with fixed centroids, routing depends only on each token, so decoding
    token by token equals a prefill pass.

    Parameters
    ----------
    n_clusters : int
        Centroids per head (>= 1).
    decay : float
        Online k-means decay in [0, 1) (0.999 in the paper).
    fit_iterations : int
        Lloyd steps on each prefill's keys before routing (>= 0; 0 keeps the centroids as they are).
    seed : int
        Seed of the initial centroids.
    density : float or None
        Instead of n_clusters: round(1 / density) clusters, so about that density where clusters are balanced
        (content decides the real one; the meter reports it).
    """

    name = "routing"
    per_layer = True
    paper = "Roy et al. 2021, Routing Transformers (arXiv:2003.05997)"
    summary = "per-head online k-means routing: attend to earlier keys in the same cluster"

    n_clusters: int = 8
    decay: float = 0.999
    fit_iterations: int = 0
    seed: int = 0
    density: float | None = None
    centroids: dict = field(default_factory=dict, repr=False, compare=False)  # layer -> [H, C, D]

    def validate(self):
        if self.density is not None:
            check(self.name, "density", isinstance(self.density, (int, float)) and 0 < self.density <= 1,
                  "in (0, 1]", self.density)
            if self.n_clusters != 8:
                raise ValueError(f"{self.name}: give either n_clusters or density (which sets it), not both")
            self.n_clusters = max(1, round(1 / self.density))
        check(self.name, "n_clusters", isinstance(self.n_clusters, int) and self.n_clusters >= 1,
              "an integer >= 1", self.n_clusters)
        check(self.name, "decay", isinstance(self.decay, (int, float)) and 0 <= self.decay < 1, "in [0, 1)",
              self.decay)
        check(self.name, "fit_iterations", isinstance(self.fit_iterations, int) and self.fit_iterations >= 0,
              "an integer >= 0", self.fit_iterations)

    def params(self):
        return {k: v for k, v in super().params().items() if k != "centroids"}

    def layer_centroids(self, layer: int, heads: int, dim: int, device) -> torch.Tensor:
        if layer not in self.centroids:
            g = torch.Generator().manual_seed(self.seed * 100_003 + layer)
            self.centroids[layer] = F.normalize(torch.randn(heads, self.n_clusters, dim, generator=g), dim=-1)
        return self.centroids[layer].to(device)

    def attend(self, query, key, value, mask, call: AttendCall):
        if call.dropout:
            raise ValueError(f"{self.name}: attention dropout is not supported")
        if call.softcap is not None:
            raise ValueError(f"{self.name}: logit soft-capping (Gemma2) is not supported")
        b, hq, q_len, d = query.shape
        groups = hq // key.shape[1]
        layer = call.layer_idx or 0
        mu = self.layer_centroids(layer, hq, d, query.device)
        keys = key.detach().repeat_interleave(groups, 1)
        if self.fit_iterations and q_len > 1:
            for _ in range(self.fit_iterations):  # Lloyd steps on this prompt's keys
                mu = _cluster_means(keys, route(keys, mu), mu)
            self.centroids[layer] = mu.cpu()
        q_cluster, k_cluster = route(query.detach(), mu), route(keys, mu)
        training = call.module is not None and call.module.training
        if training and q_len > 1:  # online k-means update (the paper's exponential moving average)
            means = _cluster_means(torch.cat([query.detach(), keys], 2), torch.cat([q_cluster, k_cluster], 2), mu)
            self.centroids[layer] = F.normalize(self.decay * mu + (1 - self.decay) * means, dim=-1).cpu()
        out, pairs = clustered_attention(query, key, value, mask, q_cluster, k_cluster, call.scale)
        call.attended_pairs = pairs
        return out


def _cluster_means(x, assign, mu):
    """Unit mean direction of the vectors routed to each centroid; empty clusters keep their centroid."""
    h, c, d = mu.shape
    xs = F.normalize(x.float(), dim=-1).transpose(0, 1).reshape(h, -1, d)  # [H, B * S, D]
    a = assign.transpose(0, 1).reshape(h, -1)
    sums = torch.zeros(h, c, d, device=x.device).scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, d), xs)
    counts = torch.zeros(h, c, device=x.device).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float))
    return torch.where(counts.unsqueeze(-1) > 0, F.normalize(sums, dim=-1), mu)
