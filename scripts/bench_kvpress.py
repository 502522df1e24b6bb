"""NVIDIA kvpress's decode ms/token after a compression_ratio prefill: the peer measurement that
`scripts/bench_kvcache.py --compression-ratio` is compared with. kvpress pins transformers < 5.3, so it runs in
its own venv (torch from the system, kvpress and its transformers in the venv); it does not import longattn.

    python -m venv --system-site-packages /tmp/kvp && /tmp/kvp/bin/pip install kvpress
    /tmp/kvp/bin/python scripts/bench_kvpress.py ~/.cache/longattn/models/smollm2-135m-instruct 4096 0.875 32 \
        evals/results/bench_kvpress_smollm2_ratio.json
"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, DynamicCache
import kvpress
torch.set_num_threads(2)
path, length, ratio, steps, out_path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
prompt = torch.randint(5, 32000, (1, length), generator=torch.Generator().manual_seed(0))
rows = []
presses = {"full": None, "snapkv": kvpress.SnapKVPress(compression_ratio=ratio),
           "streaming_llm": kvpress.StreamingLLMPress(compression_ratio=ratio),
           "knorm": kvpress.KnormPress(compression_ratio=ratio), "tova": kvpress.TOVAPress(compression_ratio=ratio),
           "pyramidkv": kvpress.PyramidKVPress(compression_ratio=ratio)}
for name, press in presses.items():
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            out = model(prompt, past_key_values=cache, use_cache=True)
        else:
            with press(model):
                out = model(prompt, past_key_values=cache, use_cache=True)
        held = cache.layers[0].keys.shape[-2]
        tok = out.logits[:, -1:].argmax(-1)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows.append(dict(policy=name, held_after_prefill=held, ms_per_token=1000 * wall / steps,
                     cpu_ms_per_token=1000 * cpu / steps))
    print(json.dumps(rows[-1]), flush=True)
from importlib.metadata import version

with open(out_path, "w") as f:
    json.dump(dict(kvpress=version("kvpress"), transformers=version("transformers"), torch=torch.__version__,
                   model=path.rstrip("/").split("/")[-1], length=length, compression_ratio=ratio, steps=steps,
                   threads=torch.get_num_threads(), rows=rows), f, indent=1)
