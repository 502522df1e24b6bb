"""Small real transformers models built from configs (no downloads), shared by the tests."""
from __future__ import annotations

import pytest
import torch

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# arch -> (config class name, model class name, extra config); sliding windows are small on purpose so that the
# test sequences (~24 tokens) cross them.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8,
                                                  "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 8,
                                                     "attn_logit_softcapping": 5.0,
                                                     "final_logit_softcapping": 30.0,
                                                     "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 8}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def make_model(arch: str, seed: int = 0, attn_implementation: str | None = None, **overrides):
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    # Random init gives near-uniform attention; larger q/k weights make attention patterns (and bugs) visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "qkv_proj")) and p.ndim == 2:
                p.mul_(4.0)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def reference_implementation(model) -> str:
    """What 'unpatched transformers' means for a model: sdpa, or eager where sdpa cannot run (soft-capping)."""
    return model.config._attn_implementation


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


def left_padded_batch(seed: int = 0, length: int = 24, pad: int = 5, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask


@pytest.fixture(scope="session")
def small_tokenizer():
    """A real fast tokenizer (byte-level BPE, one token per digit) trained in milliseconds on local text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from longattn.evals.tasks.passkey import NEEDLE, PREAMBLE, QUESTION
    from longattn.evals.tasks.base import GRASS

    text = [PREAMBLE, GRASS, NEEDLE.format(key="12345"), QUESTION,
            "Attention over long contexts costs memory that grows with the sequence. " * 3]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def assert_decode_matches_prefill(model, ids, prefix: int = 0):
    """Logits of one prefill pass equal those of a `prefix`-token prefill followed by one token at a time."""
    from transformers import DynamicCache

    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache, steps = DynamicCache(config=model.config), []
        if prefix:
            steps.append(model(input_ids=ids[:, :prefix], cache=cache, use_cache=True).logits)
        for t in range(prefix, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def kept_by_layer(cache, layers) -> dict:
    """{layer: [batch][KV head] -> stream indices the compressed cache holds}."""
    pos = {i: cache.kept_positions(i) for i in layers}
    return {i: [[p[b, h][p[b, h] >= 0].tolist() for h in range(p.shape[1])] for b in range(p.shape[0])]
            for i, p in pos.items()}


def eager_logits_with_allowed(model, ids, mask, allowed_for):
    """Logits of the unpatched model's eager attention where every layer's mask is further restricted to
    allowed_for(module, query, key) ([B, Hq, Q, K] bool): the explicit reference for per-layer, per-head patterns."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    from longattn.models import eager_function

    def attention(module, query, key, value, attention_mask, **kw):
        allowed = allowed_for(module, query, key)
        attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
        return eager_function(module)(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("allowed_reference", attention)
    AttentionMaskInterface.register("allowed_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    original = model.config._attn_implementation
    model.set_attn_implementation("allowed_reference")
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        model.set_attn_implementation(original)


def masked_reference_logits(model, ids, mask, kept):
    """The unpatched model (eager) over the whole text; in every layer the LAST query of each head attends only to
    the stream indices its KV head keeps (kept[layer][b][kv_head], from `kept_by_layer`) plus itself; earlier
    queries are the prefill's, unrestricted."""
    def allowed_for(module, query, key):
        allowed = torch.ones(query.shape[0], query.shape[1], query.shape[2], key.shape[2], dtype=torch.bool)
        allowed[:, :, -1, :] = False
        for b, per_head in enumerate(kept[module.layer_idx]):
            groups = query.shape[1] // len(per_head)
            for qh in range(query.shape[1]):
                allowed[b, qh, -1, per_head[qh // groups] + [key.shape[2] - 1]] = True
        return allowed

    return eager_logits_with_allowed(model, ids, mask, allowed_for)[:, -1]
