"""Sequence parallelism over torch.distributed: ring attention, zigzag sharding, Ulysses, and their 2D
combination. Knows nothing of attention methods: it runs a `BlockPattern` (causal / full / window / sinks)
or a `MaskBlockPattern` (any causal predicate over positions)."""
from .hf import SequenceParallel, count_tokens, sequence_parallel_loss
from .mesh import MESH_DIMS, ParallelDims
from .fsdp import fully_shard_model
from .comm import SequenceParallelError, check_group_size, init_distributed
from .patterns import CAUSAL, NON_CAUSAL, BlockPattern, MaskBlockPattern
from .ring import ring_attention, ring_attention_runs
from .sharding import IGNORE_INDEX, ShardLayout, pad_for_sharding, shift_labels
from .ulysses import heads_to_seq, seq_to_heads, ulysses_attention, ulysses_attention_runs, usp_attention, usp_groups

__all__ = [
    "CAUSAL", "MESH_DIMS", "ParallelDims", "count_tokens", "fully_shard_model", "IGNORE_INDEX", "NON_CAUSAL", "BlockPattern", "MaskBlockPattern", "SequenceParallel",
    "SequenceParallelError", "ShardLayout", "check_group_size", "heads_to_seq", "init_distributed", "pad_for_sharding",
    "ring_attention", "ring_attention_runs", "seq_to_heads", "sequence_parallel_loss",
    "shift_labels", "ulysses_attention", "ulysses_attention_runs", "usp_attention", "usp_groups",
]
