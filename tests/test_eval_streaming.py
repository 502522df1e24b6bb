"""scripts/eval_streaming.py: token-by-token and chunked streaming give each token's NLL exactly (checked where the
cache never evicts, against one dense forward), and the cache stays within its budget once it does."""
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import make_model

spec = importlib.util.spec_from_file_location("eval_streaming", Path(__file__).parents[1] / "scripts" / "eval_streaming.py")
eval_streaming = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_streaming)


@pytest.mark.parametrize("chunk", [1, 7])
def test_streamed_nll_equals_one_forward_before_eviction(chunk):
    model = make_model("llama")
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    run = eval_streaming.stream_nll(model, ids, "streaming_llm", {"sink_tokens": 4, "window": 60}, chunk)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    ref = logp.gather(-1, ids[0, 1:, None])[:, 0].neg()
    torch.testing.assert_close(torch.tensor(run["nll"]), ref, atol=1e-4, rtol=0)
    assert len(run["cache_bytes"]) == 39


@pytest.mark.parametrize("chunk", [1, 5])
def test_streamed_cache_stays_within_budget(chunk):
    model = make_model("llama")
    ids = torch.randint(3, 96, (1, 60), generator=torch.Generator().manual_seed(1))
    run = eval_streaming.stream_nll(model, ids, "streaming_llm", {"sink_tokens": 2, "window": 14}, chunk)
    per_entry = 2 * 3 * 2 * 16 * 4  # keys + values, layers, KV heads, head dim, fp32
    assert max(run["cache_bytes"]) == 16 * per_entry and all(torch.isfinite(torch.tensor(run["nll"])))
