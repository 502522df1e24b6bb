"""A Hugging Face model on PyTorch's own engine: FSDP2 per decoder layer over the mesh's dp_shard x sp ranks,
mixed precision, activation checkpointing, and distributed checkpoints that reshard on load."""
from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.distributed as dist

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers itself never splits (`_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fully_shard_model: {type(base).__name__} names no decoder layer class "
                         f"(_no_split_modules={sorted(names)}); it cannot be sharded per layer")
    return layers


def fully_shard_model(model, fsdp_mesh, *, mixed_precision: str = "fp32", activation_checkpointing: bool = False):
    """FSDP2 (`fully_shard`) on each decoder layer, then on the whole model, over `fsdp_mesh` (1D: FSDP; 2D
    (replicate, shard): HSDP). `mixed_precision` "bf16": parameters gathered and computed in bf16, gradients
    reduced in fp32, the sharded master weights and the optimizer stay fp32. Gradients are AVERAGED over the
    mesh's ranks, which `sequence_parallel_loss` is written for."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {list(PRECISIONS)}, got {mixed_precision!r}")
    if activation_checkpointing:  # before sharding: the recomputed forward then re-gathers its layer's weights
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=PRECISIONS[mixed_precision], reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=fsdp_mesh, mp_policy=policy)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (collective over its mesh), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor's local shard, a plain tensor's whole storage)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


class TrainState:
    """What a run needs besides weights and optimizer to continue exactly: the step (the data of step N is a
    function of the seed and N), the scheduler and the RNG state; a DCP `Stateful`, stored once (rank 0's)."""

    def __init__(self, step: int = 0, scheduler=None):
        self.step, self.scheduler = step, scheduler

    def state_dict(self) -> dict:
        rng = io.BytesIO()
        torch.save({"torch": torch.get_rng_state()}, rng)
        return {"step": self.step, "scheduler": self.scheduler.state_dict() if self.scheduler else {},
                "rng": rng.getvalue()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(torch.load(io.BytesIO(state["rng"]), weights_only=True)["torch"])


def _state(model, optimizer, train: TrainState):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # frozen weights (a LoRA run's base model) are the pretrained ones: not saved, not loaded
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optimizer": optim_sd, "train": train}


def save_checkpoint(path: Path, model, optimizer, train: TrainState) -> None:
    """Every rank writes its shards (torch.distributed.checkpoint) into a temporary directory that rank 0 then
    renames, so a run killed mid-save leaves the previous checkpoint as the latest complete one."""
    import shutil

    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(_state(model, optimizer, train), checkpoint_id=str(tmp))
    if _rank() == 0:
        (tmp / "complete").write_text(f"{train.step}\n")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    _barrier()


def load_checkpoint(path: Path, model, optimizer, train: TrainState) -> None:
    """Load a checkpoint written by any number of processes into this run's sharding (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(model, optimizer, train)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # a key of this run that the checkpoint lacks: another model or LoRA rank
        raise RuntimeError(f"{path}: cannot load this checkpoint into the model being trained ({type(e).__name__}: "
                           f"{str(e)[:300]}); was it written with another --model or --lora-rank?") from e
    # not strict: the frozen weights are absent on purpose; every trainable one was requested, and dcp.load
    # above fails on any the checkpoint lacks
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_model_state(model) -> dict:
    """The whole model's state dict, gathered in full on CPU on rank 0 (collective; empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
