"""lm-evaluation-harness model type "longattn": lm-eval's own HF model (HFLM), patched by longattn after loading.

Importing this module registers the type; `longattn lm-eval ARGS` is lm-eval's command line with it registered
(lm-eval 0.4 finds models only in its own package, with no plugin entry points):

    longattn lm-eval --model longattn --model_args pretrained=smollm2-135m-instruct,patch=sink_window,\
patch_params=sink_tokens=4;window=1020,dtype=bfloat16 --tasks ...

Every request type runs through the patched attention (loglikelihood, loglikelihood_rolling, generate_until);
a KV policy (`patch=snapkv,patch_params=kv_budget=512`, or `kv_cache=policy=h2o;kv_budget=512` beside a sparse
method) acts in generation, the only phase with a cache.
"""
from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import patching
from ..pretrained import KNOWN_MODELS, model_folder


def parse_assignments(text, what: str) -> dict:
    """'a=1;b=x' (lm-eval's model_args already split on commas) -> {"a": 1, "b": "x"}, values read as JSON
    where they parse as JSON."""
    from ..cli import parse_params

    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    return parse_params([item for item in str(text).split(";") if item.strip()], what)


def parse_layers(layers):
    """model_args' layers: 'all', '2:' (a slice), '0;3' or one integer."""
    if layers is None or isinstance(layers, (int, list, tuple)) or layers == "all" or ":" in str(layers):
        return layers
    try:
        return [int(x) for x in str(layers).split(";") if x.strip()]
    except ValueError:
        raise ValueError(f"layers: expected 'all', a slice such as '2:' or ';'-separated integers, "
                         f"got {layers!r}") from None


@register_model("longattn")
class LongattnLM(HFLM):
    """HFLM whose model is patched with a longattn method (and/or KV policy). `pretrained`: a name of
    `longattn models` (reference, smollm2-135m-instruct, gemma3-270m), a HF folder, or a loaded model; every other
    argument is HFLM's (dtype, device, batch_size, max_length, ...)."""

    def __init__(self, pretrained, patch: str = "dense", patch_params=None, kv_cache=None, layers=None, **kwargs):
        params = parse_assignments(patch_params, "patch_params")
        kv = parse_assignments(kv_cache, "kv_cache") or None
        layers = parse_layers(layers)
        patching.resolve_kv_cache(patch, kv, params)  # a bad method or parameter fails before the model loads
        if isinstance(pretrained, str) and pretrained in KNOWN_MODELS:
            pretrained = str(model_folder(pretrained))
        super().__init__(pretrained=pretrained, **kwargs)
        self.longattn = patching.patch(self._model, patch, layers=layers, kv_cache=kv, **params)

    @property
    def density(self) -> dict:
        """Attention density actually computed so far, per phase (None where a phase never ran)."""
        meter = self.longattn.meter
        return {phase: meter.density(phase) for phase in ("prefill", "decode")}
