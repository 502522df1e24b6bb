"""Selective Self-Attention on a Hugging Face model: add its trainable parameters, count them, remove them,
and save / load a model that has them (Zhang et al. 2024, arXiv:2411.12892).

    longattn.add_selective_attention(model)        # new parameters (zero: the model is unchanged) + patch
    ...train...
    longattn.save_selective(model, "out/")          # save_pretrained + the SSA settings in config.json
    model = longattn.load_selective("out/")         # from_pretrained, SSA re-attached, its weights loaded
"""
from __future__ import annotations

from pathlib import Path

from .methods.ssa import MODULE_ATTR, SelectiveAttention, SelectiveTemperature
from .models import attention_modules
from .patching import patch, unpatch

CONFIG_ATTR = "longattn_ssa"  # in the model config: the settings load_selective re-applies


def _query_projection(module):
    """(the module whose output holds the queries, how many leading features are queries)."""
    if hasattr(module, "q_proj"):
        return module.q_proj
    if hasattr(module, "qkv_proj"):  # Phi3: [q; k; v] in one projection, queries first
        return module.qkv_proj
    raise ValueError(f"ssa: {type(module).__name__} has neither q_proj nor qkv_proj")


def add_selective_attention(model, *, query: bool = True, position: bool = True, value: bool = True,
                            layers=None, backend: str = "auto"):
    """Give each chosen attention layer SSA parameters (zeros) and patch the model with "ssa"; returns it."""
    spec = SelectiveAttention(backend=backend)
    patch(model, spec, layers=layers)
    state = model._longattn
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or heads
    for m in attention_modules(model):
        if m.layer_idx not in state.layers:
            continue
        proj = _query_projection(m)
        p = next(m.parameters())
        temp = SelectiveTemperature(heads, kv_heads, m.head_dim, query, position, value, p.device, p.dtype)
        setattr(m, MODULE_ATTR, temp)
        width = heads * m.head_dim

        def capture(mod, args, out, temp=temp, width=width):
            temp.pre_rope_query = out[..., :width]

        temp._hook = proj.register_forward_hook(capture) if query else None
    setattr(cfg, CONFIG_ATTR, {"query": query, "position": position, "value": value,
                                 "layers": list(state.layers), "backend": backend})
    return model


def remove_selective_attention(model):
    """Unpatch and delete the SSA parameters and hooks: exactly the original model again."""
    unpatch(model)
    for m in attention_modules(model):
        temp = getattr(m, MODULE_ATTR, None)
        if temp is not None:
            if temp._hook is not None:
                temp._hook.remove()
            delattr(m, MODULE_ATTR)
    model.config.__dict__.pop(CONFIG_ATTR, None)
    return model


def selective_parameter_count(model) -> dict:
    """{"new": SSA parameters, "base": the rest, "fraction": new / base}."""
    new = sum(p.numel() for n, p in model.named_parameters() if f".{MODULE_ATTR}." in n)
    base = sum(p.numel() for n, p in model.named_parameters() if f".{MODULE_ATTR}." not in n)
    return {"new": new, "base": base, "fraction": new / base}


def save_selective(model, path, **kwargs):
    """`model.save_pretrained(path)`; the SSA settings travel in config.json and its weights in the
    checkpoint, under `...self_attn.ssa_temperature.*`."""
    if CONFIG_ATTR not in model.config.__dict__:
        raise ValueError("save_selective: the model has no SSA parameters (add_selective_attention first)")
    model.save_pretrained(path, **kwargs)


def load_selective(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path)`, then SSA re-attached with the saved settings and its
    trained parameters loaded from the checkpoint (transformers itself skips them as unknown keys)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    settings = model.config.__dict__.get(CONFIG_ATTR)
    if settings is None:
        raise ValueError(f"load_selective: {path} was not saved with SSA (no {CONFIG_ATTR!r} in its config)")
    settings = dict(settings)
    add_selective_attention(model, **settings)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_selective: no .safetensors weights in {path}")
    found = {}
    for f in files:
        found.update({k: v for k, v in load_file(str(f)).items() if f".{MODULE_ATTR}." in k})
    expected = {n for n, _ in model.named_parameters() if f".{MODULE_ATTR}." in n}
    missing = expected - set(found)
    if missing:
        raise ValueError(f"load_selective: SSA weights missing from {path}: {sorted(missing)[:4]} ...")
    model.load_state_dict(found, strict=False)
    return model.eval()
