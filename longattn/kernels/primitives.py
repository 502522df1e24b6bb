"""What every attention kernel of longattn shares: a softmax that returns its log-sum-exp, the exact merge of two
attention results over disjoint keys, torch's private attention ops (probed here, once) and the flash-attn probe."""
from __future__ import annotations

import importlib.util

import torch

# Query rows per step of an explicit (math) kernel: it holds at most this many x K scores at once.
MATH_QUERY_CHUNK = 1024


def softmax_lse(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, log-sum-exp) over the last dimension of masked scores (-inf = not allowed); a row with no
    allowed key gets probabilities 0 and log-sum-exp -inf, not NaN."""
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.clamp_min(-1e30).unsqueeze(-1)), lse


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the keys of A and B together, from the results over each ([..., Q, D] outputs, [...,
    Q] log-sum-exps): one lerp from out_b towards out_a by exp(lse_a - lse) (the two weights sum to one), lse =
    logaddexp(lse_a, lse_b). A row with no key in either keeps out_b's value. `out` may be out_a or out_b."""
    total = torch.logaddexp(lse_a, lse_b)
    weight = torch.exp(lse_a - total.masked_fill(torch.isneginf(total), 0.0))  # rows with no key: 0, not NaN
    return torch.lerp(out_b, out_a, weight.unsqueeze(-1).to(out_a.dtype), out=out), total


def _aten(name: str):
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        def missing(*args, **kwargs):
            raise RuntimeError(f"longattn needs torch's private attention op aten.{name}, which torch "
                               f"{torch.__version__} does not have (longattn is tested with torch 2.13)")
        return missing
    return op


# torch's own attention kernels with their log-sum-exp (the public SDPA does not return it).
cpu_flash_forward = _aten("_scaled_dot_product_flash_attention_for_cpu")
cpu_flash_backward = _aten("_scaled_dot_product_flash_attention_for_cpu_backward")
cuda_efficient_forward = _aten("_scaled_dot_product_efficient_attention")


def flash_attn_available(q: torch.Tensor | None = None) -> bool:
    """Whether flash-attn (the optional CUDA extra) can run here, and on `q` if given (CUDA, half precision)."""
    if q is not None and not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
