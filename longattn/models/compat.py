"""The four checks every architecture must pass to be called supported (or be refused with a clear error).

1. ``dense``: patched ``dense`` equals the unpatched model (left-padded batch, 1e-5), and ``unpatch`` gives the
   unpatched logits back bit for bit.
2. ``window``: ``sink_window`` equals a reference written here: the model's own eager attention function, given
   the model's own eager mask with every pair outside "first real sinks + recent window" set to -inf.
3. ``generate``: greedy ``generate`` on the left-padded batch, patched ``dense`` vs unpatched: same tokens, scores
   within 1e-4.
4. ``kv_budget``: ``snapkv`` with a budget: every attention layer of the cache generate returns holds at most
   the budget, the model's other cache layers (SSM, conv, linear attention) are still there, and the first new
   token (computed before any eviction) is the unpatched model's.

Each check returns "pass", "refused: <reason>" (an UnsupportedModelError), "n/a: <why>" (nothing to check on
this tiny model) or "FAIL: <what went wrong>".
"""
from __future__ import annotations

import sys
import traceback

import torch

SINK_TOKENS, WINDOW, KV_BUDGET = 2, 6, 10
CHECKS = ("dense", "window", "generate", "kv_budget")
REFERENCE_NAME = "longattn_compat_reference"


def padded_batch(vocab: int, length: int = 24, pad: int = 5, seed: int = 0):
    """Two sequences, the second left-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 100), (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask


def sink_window_allowed(mask2d: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """[B, 1, Q, K] bool: key j is within the last WINDOW positions of query i, or one of the row's first
    SINK_TOKENS real tokens (positions are cache indices, pads included), written as plain loops."""
    b = mask2d.shape[0]
    first = [int(row.nonzero()[0]) if row.any() else 0 for row in mask2d]
    out = torch.zeros(b, 1, q_len, kv_len, dtype=torch.bool)
    for r in range(b):
        for i in range(q_len):
            qi = kv_len - q_len + i
            for j in range(kv_len):
                out[r, 0, i, j] = j <= qi and (qi - j < WINDOW or first[r] <= j < first[r] + SINK_TOKENS)
    return out


_reference_mask2d: list = [None]


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    """The module's own eager attention over its eager mask restricted to the sink + window pattern."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if getattr(module, "_compat_cross", False):  # cross-attention is not what a window method changes
        return eager(module, query, key, value, attention_mask, **kwargs)
    allowed = sink_window_allowed(_reference_mask2d[0], query.shape[2], key.shape[2]).to(query.device)
    indices = kwargs.pop("indices", None)  # DeepSeek Sparse Attention's top-k keys per query
    if indices is not None:
        chosen = torch.zeros(indices.shape[0], 1, query.shape[2], key.shape[2], dtype=torch.bool)
        for b in range(indices.shape[0]):
            for i in range(query.shape[2]):
                chosen[b, 0, i, indices[b, i].long()] = True
        allowed = allowed & chosen
    neg = torch.finfo(query.dtype).min
    if attention_mask is None:
        attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    elif attention_mask.dtype == torch.bool:  # the SDPA builder's mask: made additive for the eager function
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype).masked_fill(~attention_mask, neg)
    attention_mask = attention_mask[..., : key.shape[2]].masked_fill(~allowed, neg)
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    # A real query left with no key (the window and an indexer's top-k share none) attends to nothing: zero, not
    # the uniform average a finite mask value would give.
    empty = (attention_mask == neg).all(-1).any(1)  # [B, Q] (pad queries too: they are never compared)
    return out.masked_fill(empty[:, :, None, None], 0.0), weights


def _register_reference(original: str) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(REFERENCE_NAME, _reference_attention)
    # The mask the model builds for its own implementation: models that read it (an indexer choosing top-k keys)
    # then see exactly what they see when patched, where they are given that mask too.
    builder = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ("eager", "sdpa") else \
        ALL_MASK_ATTENTION_FUNCTIONS["eager"]
    AttentionMaskInterface.register(REFERENCE_NAME, builder)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _close(a, b, atol, real) -> str | None:
    diff = (a[real] - b[real]).abs().max().item()
    return None if diff <= atol else f"max |diff| {diff:.3g} > {atol:g}"


def check_dense(model, ids, mask) -> str:
    import longattn

    real = mask.bool()
    ref = _logits(model, ids, mask)
    longattn.patch(model, "dense")
    got = _logits(model, ids, mask)
    longattn.unpatch(model)
    again = _logits(model, ids, mask)
    bad = _close(got, ref, 1e-5, real)
    if bad:
        return f"FAIL: dense vs unpatched: {bad}"
    if not torch.equal(again, ref):
        return "FAIL: unpatch did not restore the unpatched logits bit for bit"
    return "pass"


def check_window(model, ids, mask) -> str:
    import longattn

    from . import passed_through_modules

    original = model.config._attn_implementation
    _register_reference(original)
    for m in passed_through_modules(model):
        m._compat_cross = True
    _reference_mask2d[0] = mask
    try:
        model.set_attn_implementation(REFERENCE_NAME)
        ref = _logits(model, ids, mask)
    finally:
        model.set_attn_implementation(original)
    with longattn.patched(model, "sink_window", sink_tokens=SINK_TOKENS, window=WINDOW):
        got = _logits(model, ids, mask)
    dense = _logits(model, ids, mask)
    if (ref - dense)[mask.bool()].abs().max() < 1e-6:
        return "FAIL: the reference window changed nothing (the test cannot tell)"
    bad = _close(got, ref, 1e-4, mask.bool())
    return f"FAIL: sink_window vs explicit-mask reference: {bad}" if bad else "pass"


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True, output_scores=True, pad_token_id=0, **kw)


class ReferenceFailed(Exception):
    """The unpatched model itself cannot run this check (nothing longattn could be compared with)."""


def _reference_generate(model, ids, mask):
    try:
        return _generate(model, ids, mask)
    except Exception as e:  # noqa: BLE001 - reported as n/a by run_checks
        raise ReferenceFailed(f"the unpatched model's generate fails here: {type(e).__name__}: {_short(e, 120)}")


def check_generate(model, ids, mask) -> str:
    import longattn

    ref = _reference_generate(model, ids, mask)
    with longattn.patched(model, "dense"):
        got = _generate(model, ids, mask)
    if not torch.equal(got.sequences, ref.sequences):
        return "FAIL: patched dense generated other tokens than the unpatched model"
    diff = max((a - b).abs().max().item() for a, b in zip(got.scores, ref.scores))
    return "pass" if diff <= 1e-4 else f"FAIL: generate scores differ by {diff:.3g}"


def check_kv_budget(model, ids, mask) -> str:
    import longattn
    from longattn.kvcache.cache import CompressedCache, CompressedLayer

    ref = _reference_generate(model, ids, mask)
    with longattn.patched(model, "snapkv", kv_budget=KV_BUDGET, window=4, kernel_size=3):
        got = _generate(model, ids, mask)
    cache = got.past_key_values
    if cache is None and ref.past_key_values is None:
        return "n/a: the model generates without a cache here, so there is nothing to compress"
    compressed = cache if isinstance(cache, CompressedCache) else getattr(cache, "_longattn_compressed", None)
    if compressed is None:
        return f"FAIL: generate returned a {type(cache).__name__}, no compressed cache (the budget is not held)"
    sizes = compressed.attention_entry_counts()
    if not sizes:
        return "FAIL: the compressed cache holds no attention layer"
    for i, layer in enumerate(compressed.layers):
        held = getattr(layer, "keys", None)
        uncompressed = not isinstance(layer, CompressedLayer) and held is not None and held.dim() == 4
        if uncompressed and held.shape[-2] > KV_BUDGET:
            return f"FAIL: cache layer {i} ({type(layer).__name__}) holds {held.shape[-2]} entries uncompressed"
    if max(sizes) > KV_BUDGET:
        return f"FAIL: an attention layer holds {max(sizes)} entries > budget {KV_BUDGET}"
    first = ids.shape[1]  # the position of the first new token ([B, S] sequences; musicgen: [B, codebooks, S])
    if not torch.equal(got.sequences[..., first], ref.sequences[..., first]):
        return "FAIL: the first new token (before any eviction) differs from the unpatched model's"
    return "pass"


def run_checks(model_type: str, checks=CHECKS) -> dict[str, str]:
    """Build the tiny model for `model_type` once per check and run the checks; never raises."""
    from ..patching import UnsupportedModelError
    from .tiny import tiny_model

    results = {}
    for name in checks:
        try:
            model = tiny_model(model_type)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            return {"build": f"cannot build a tiny model: {type(e).__name__}: {_short(e)}"}
        ids, mask = padded_batch(model.config.get_text_config().vocab_size)
        try:
            _logits(model, ids, mask)
        except Exception as e:  # noqa: BLE001
            return {"build": f"the unpatched tiny model cannot run a forward: {type(e).__name__}: {_short(e)}"}
        try:
            results[name] = globals()[f"check_{name}"](model, ids, mask)
        except ReferenceFailed as e:
            results[name] = f"n/a: {e}"
        except UnsupportedModelError as e:
            results[name] = f"refused: {_short(e)}"
        except Exception as e:  # noqa: BLE001
            where = traceback.extract_tb(e.__traceback__)[-1]
            results[name] = f"FAIL: {type(e).__name__}: {_short(e)} ({where.filename.split('/')[-1]}:{where.lineno})"
    return results


def _short(e: Exception, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."
