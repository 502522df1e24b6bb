"""One small-parameter case per attention method and KV policy: every entry runs the shared matrix of
tests/test_registry.py, and a method or policy missing here fails it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MethodCase:
    params: dict = field(default_factory=dict)
    # The method attends with the same pattern when decoding token by token as in one prefill (README: "prefill =
    # decode"); False for methods that are dense while decoding or choose keys from the whole prompt.
    decode_equals_prefill: bool = True
    # Each row of a padded batch gives what it gives alone (False: state shared across the batch).
    rows_independent: bool = True
    setup: str | None = None  # a longattn function to call on the model first (SSA adds its parameters)
    # Where the method's explicit reference lives when it is not a positional mask (content-dependent selection,
    # temperatures, head grouping).
    reference: str | None = None


METHOD_CASES = {
    "dense": MethodCase(),
    "sliding_window": MethodCase({"window": 5}),
    "sink_window": MethodCase({"sink_tokens": 2, "window": 5}),
    "dilated": MethodCase({"window": 6, "dilation": 2}),
    "strided": MethodCase({"window": 3, "stride": 4}),
    "head_hybrid": MethodCase({"full_heads": {0: [0, 1], 2: [0]}, "sink_tokens": 2, "window": 5},
                              reference="tests/test_head_hybrid.py"),
    # Blocks are fixed runs of cache positions (Quest's pages): left padding moves their boundaries.
    "block_topk": MethodCase({"block_size": 4, "top_k": 2}, rows_independent=False,
                             reference="tests/test_block_topk.py"),
    "vertical_slash": MethodCase({"vertical_size": 4, "slash_size": 4, "last_q": 4, "sink_columns": 1,
                                  "local_diagonals": 2}, decode_equals_prefill=False,
                                 reference="tests/test_vertical_slash.py"),
    # Needs a length divisible by the group size (the padded batch's 24 is; the 19-token row alone is not).
    "s2_attn": MethodCase({"group_size": 8}, decode_equals_prefill=False, rows_independent=False,
                          reference="tests/test_shifted_sparse.py"),
    "sf_attn": MethodCase({"group_size": 8, "sink_tokens": 2}, reference="tests/test_shifted_sparse.py"),
    "routing": MethodCase({"n_clusters": 2}, reference="tests/test_routing.py"),
    "logn": MethodCase({"training_length": 8}, reference="tests/test_logn.py"),
    "yarn_temperature": MethodCase({"training_length": 8, "factor": 2.0}, reference="tests/test_logn.py"),
    # Query heads are allocated from the key norms of each forward: a decoding step sees only its own key.
    "kdgqa": MethodCase({"per_sequence": True}, decode_equals_prefill=False, reference="tests/test_gqa_variants.py"),
    "dgqa": MethodCase(reference="tests/test_gqa_variants.py"),
    "pgqa": MethodCase(reference="tests/test_gqa_variants.py"),
    # Sinks are found from the attention each call's own queries pay: a decoding step is calibrated alone.
    "act": MethodCase({"threshold": 0.05, "beta": 0.5}, decode_equals_prefill=False, reference="tests/test_act.py"),
    "ssa": MethodCase(setup="add_selective_attention", reference="tests/test_ssa.py"),
}

POLICY_CASES = {
    "streaming_llm": {"sink_tokens": 2},
    "h2o": {"recent_window": 3},
    "snapkv": {"window": 3, "kernel_size": 3},
    "tova": {},
    "knorm": {},
    "pyramidkv": {"window": 3, "kernel_size": 3},
    "adakv": {"window": 3, "kernel_size": 3},
}
