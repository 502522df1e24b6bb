"""Selective Self-Attention (SSA): learned query temperature (per token and per position) and value
temperature, with weights shared with the query / value projections; the identity at initialisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.dense import BACKENDS, dense_attention
from .base import AttendCall, AttentionMethod, check

MODULE_ATTR = "ssa_temperature"  # the submodule holding SSA's parameters on each attention module


class SelectiveTemperature(nn.Module):
    """SSA's parameters for one attention layer (all zero at initialisation, where every factor is 1).

    query_weight [Hq, D]: token temperature of query head h, 1 + tanh(u_h . q_h(x)), read from the head's own
        query projection q_h(x) = W_q,h x before RoPE (weight sharing: u_h adds D numbers, not a projection);
    position_weight [Hq]: position temperature 1 + a_h * log(p + 1) at absolute position p;
    value_weight [Hkv, D]: value temperature 1 + tanh(w_g . v_g) of each value vector.
    """

    def __init__(self, heads: int, kv_heads: int, head_dim: int, query: bool = True, position: bool = True,
                 value: bool = True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.query_weight = nn.Parameter(torch.zeros(heads, head_dim, **kw)) if query else None
        self.position_weight = nn.Parameter(torch.zeros(heads, **kw)) if position else None
        self.value_weight = nn.Parameter(torch.zeros(kv_heads, head_dim, **kw)) if value else None
        self.heads, self.head_dim = heads, head_dim
        self.pre_rope_query: torch.Tensor | None = None  # [B, S, Hq * D], set by a hook on the query projection

    def query_factor(self, q_len: int, q_offset: int, batch: int, device) -> torch.Tensor:
        """[B or 1, Hq, Q, 1] multiplier of the queries (and so of their logits)."""
        f = torch.ones(1, self.heads, q_len, 1, device=device)
        if self.position_weight is not None:
            pos = torch.arange(q_len, device=device, dtype=torch.float32) + q_offset
            f = f * (1 + self.position_weight.float().view(1, -1, 1, 1) * torch.log1p(pos).view(1, 1, -1, 1))
        if self.query_weight is not None:
            q = self.pre_rope_query
            if q is None or q.shape[0] != batch or q.shape[1] != q_len:
                raise ValueError("ssa: the query projection's output was not captured for this call (attach SSA "
                                 "with longattn.add_selective_attention, which hooks the query projection)")
            q = q.view(batch, q_len, self.heads, self.head_dim).transpose(1, 2).float()
            f = f * (1 + torch.tanh((q * self.query_weight.float().view(1, self.heads, 1, -1)).sum(-1, keepdim=True)))
        return f

    def value_factor(self, value: torch.Tensor) -> torch.Tensor | None:
        """[B, Hkv, K, 1] multiplier of the values, or None."""
        if self.value_weight is None:
            return None
        w = self.value_weight.float().view(1, value.shape[1], 1, -1)
        return 1 + torch.tanh((value.float() * w).sum(-1, keepdim=True))


@dataclass
class SelectiveAttention(AttentionMethod):
    """SSA (Zhang et al. 2024, Selective Attention: Enhancing Transformer through Principled Context Control,
    NeurIPS 2024, arXiv:2411.12892, §3): query i of head h is scaled by a position temperature
    1 + a_h log(i + 1) (the form of the authors' code) times a token temperature 1 + tanh(u_h . q_h(x_i)),
    and each value by 1 + tanh(w_g . v_g(x_j)); the temperature functions share the query / value
    projections, so each layer adds only Hq * D + Hkv * D + Hq parameters. All new parameters start at 0, so
    the patched model equals the original exactly until they are trained.

    The parameters live in a `ssa_temperature` submodule of each attention module (optimizers and state_dict
    see them). `longattn.add_selective_attention(model)` creates them and patches; patching "ssa" on a model
    without them is an error. Temperatures depend only on each token and its position, so decoding equals a
    prefill pass.

    Parameters
    ----------
    backend : str
        Dense kernel ("auto", "sdpa", "flex", "flash", "math").
    """

    name = "ssa"
    paper = "Zhang et al. 2024, Selective Attention (NeurIPS 2024, arXiv:2411.12892)"
    summary = "trainable query (token x position) and value temperatures, <0.5% new parameters, identity at init"

    model_edit = "longattn.add_selective_attention(model)"

    backend: str = "auto"

    def validate(self):
        check(self.name, "backend", self.backend in BACKENDS, f"one of {list(BACKENDS)}", self.backend)

    def attend(self, query, key, value, mask, call: AttendCall):
        temp = getattr(call.module, MODULE_ATTR, None)
        if not isinstance(temp, SelectiveTemperature):
            raise ValueError("ssa: this attention module has no SSA parameters; use "
                             "longattn.add_selective_attention(model) (it creates them, then patches)")
        q = query * temp.query_factor(mask.q_len, mask.q_offset, query.shape[0], query.device).to(query.dtype)
        fv = temp.value_factor(value)
        v = value if fv is None else value * fv.to(value.dtype)
        return dense_attention(q, key, v, mask, scale=call.scale, softcap=call.softcap, dropout=call.dropout,
                               backend=self.backend)
