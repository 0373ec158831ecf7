"""How a student is spread over the Ray Train workers: DDP, or FSDP (PyTorch's ``fully_shard``).

- ``ddp``: every worker holds the whole student; gradients are averaged
  (``ray.train.torch.prepare_model``).
- ``fsdp``: each decoder layer and then the root are sharded with FSDP2 (``fully_shard``, Zhao
  et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel"): parameters,
  gradients and optimizer state are split over the workers and gathered one layer at a time.
  bf16 parameters with fp32 gradient reduction when the run's autocast is bf16. On CPU it runs
  on gloo (the tests); with one worker there is nothing to shard and it runs as DDP (a warning).

Checkpoints come in two formats (``train.checkpoint_format``):

- ``full``: :func:`full_model_state` and :func:`full_optimizer_state` gather the shards (a
  collective: every worker calls them) and rank 0 writes one Hugging Face folder plus the
  optimizer state keyed by parameter name.
- ``sharded``: :func:`save_sharded` has every worker write only its own shards of the weights
  and optimizer state with PyTorch Distributed Checkpoint (DCP, ``torch.distributed.checkpoint``)
  into ``<checkpoint>/sharded``; Ray Train merges the workers' folders into one checkpoint.
  :func:`load_sharded` reads it back resharded for the current workers (DCP plans the reads from
  the saved metadata), and :func:`export_sharded` turns it into a Hugging Face folder on one host.

Either resumes on any number of workers and either strategy.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (``model.model.layers`` of a Llama-like LM).

    Raises:
        ValueError: the model has no ``model.layers`` list (not a decoder LM raykd knows).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"train.strategy=fsdp shards decoder layers (model.model.layers); {type(model).__name__} has none")
    return list(layers)


def prepare_student(model: nn.Module, strategy: str, world: int, device: torch.device, *, bf16: bool = False,
                    gradient_checkpointing: bool = False) -> nn.Module:
    """The student ready for data-parallel training on this worker.

    Args:
        model: the student, on the CPU, with its initial or resumed weights.
        strategy: ``ddp`` or ``fsdp``.
        world: number of workers.
        device: this worker's device.
        bf16: FSDP keeps parameters in bf16 for compute and reduces gradients in fp32.
        gradient_checkpointing: recompute activations in the backward pass (Hugging Face's
            ``gradient_checkpointing_enable``, non-reentrant) to save memory.
    """
    import ray.train.torch

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if strategy == "fsdp" and world > 1:
        return shard(model, world, device, bf16=bf16)
    if strategy == "fsdp":
        log.warning("train.strategy=fsdp with one worker: nothing to shard, training as DDP")
    return ray.train.torch.prepare_model(model)


def shard(model: nn.Module, world: int, device: torch.device, *, bf16: bool = False) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root, over the ``world`` workers (in place).
    Also used for a frozen online teacher, which then takes 1/``world`` of its memory per worker."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return model.module if hasattr(model, "module") else model


def _full(t: Any) -> Any:
    """A sharded tensor (DTensor) gathered whole on the CPU; other values as they are."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu() if isinstance(t, Tensor) else t


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Every weight of ``model`` whole, on the CPU (collective under FSDP: call on every worker).
    A tied weight (e.g. the LM head sharing the embedding) is kept once, under its first name,
    as ``save_pretrained`` writes it."""
    out, seen = {}, set()
    for name, t in unwrapped(model).state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = _full(t)
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, tensors whole on the CPU (collective under
    FSDP), with the param groups' hyper-parameters; portable across strategies and worker counts."""
    names = {id(p): n for n, p in unwrapped(model).named_parameters()}
    state = {names[id(p)]: {k: _full(v) for k, v in optimizer.state[p].items()}
             for g in optimizer.param_groups for p in g["params"] if p in optimizer.state}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"by_name": True, "state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore :func:`full_optimizer_state` into ``optimizer`` (each tensor cut to this worker's
    shard under FSDP). A plain ``optimizer.state_dict()`` (older checkpoints) loads as it is.

    Raises:
        KeyError: a saved parameter name the model does not have.
    """
    if not saved.get("by_name"):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(unwrapped(model).named_parameters())
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for name, values in saved["state"].items():
        p = params[name]
        optimizer.state[p] = {
            k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements) if isinstance(p, DTensor) else v.to(p.device))
            if isinstance(v, Tensor) and v.dim() > 0 else v
            for k, v in values.items()
        }


SHARDED_DIR = "sharded"
"""Sub-folder of a checkpoint that holds its DCP files (one ``__<rank>_0.distcp`` per worker and
the ``.metadata`` written by rank 0)."""


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write this worker's shards of the weights and optimizer state into ``folder`` (DCP).

    A collective: every worker calls it, each with its own local ``folder`` (Ray Train merges the
    folders the workers report into one checkpoint). Keys are fully qualified parameter names
    (``model.<name>``, ``optim.state.<name>.exp_avg``, ...), independent of DDP/FSDP wrapping.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore :func:`save_sharded` into the prepared (wrapped or sharded) ``model`` and its
    ``optimizer``, on any number of workers: each reads only the pieces of its own shards.
    A collective: every worker calls it.

    Raises:
        RuntimeError: the checkpoint lacks a weight or optimizer entry of this model (DCP).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # the shapes and shards to fill
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def export_sharded(folder: Path, student_path: Path | str, out_dir: Path) -> Path:
    """Write the weights of a sharded checkpoint ``folder`` as a Hugging Face folder ``out_dir``.

    Runs on one process without a process group (the driver): the architecture comes from
    ``student_path`` (the run's initial student), the weights from the DCP files. This is where
    the whole student meets on one host, which a Hugging Face folder needs anyway.

    Raises:
        RuntimeError: a weight of the student is missing from the checkpoint (DCP).
    """
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that no process group is set up: none is needed here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    model.load_state_dict(state["model"])
    model.save_pretrained(out_dir)
    return out_dir
