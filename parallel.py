"""Distributed plumbing of the RL stage (DESIGN §7): torchrun setup, the collectives that are identities in one
process, DDP or FSDP2 wrapping (run.parallel), whole parameters for the forwards outside the update, and the
replica check. Nothing here knows the method; graph_grpo.py calls it.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import policy
from checkpoint import is_sharded


def setup_distributed(device_cfg: str):
    """RANK in the environment means torchrun. Returns (rank, world, local_rank, device)."""
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = policy.resolve_device(device_cfg, local_rank=local)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=int(os.environ.get("GG_DIST_TIMEOUT", 600))))
        return rank, world, local, device
    return 0, 1, 0, policy.resolve_device(device_cfg)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def end_distributed() -> None:
    """The process group's end (nothing without torch.distributed)."""
    if _distributed():
        dist.destroy_process_group()


def _collective_device(t: torch.Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity without torch.distributed); nccl needs the tensor on the rank's GPU."""
    if not _distributed():
        return t
    x = t.to(_collective_device(t))
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The same-shape tensors of every rank, concatenated in rank order (identity without torch.distributed)."""
    if not _distributed():
        return t
    x = t.to(_collective_device(t))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts).to(t.device)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """run.parallel fsdp (DESIGN §7): FSDP2 in place, each decoder layer its own unit (its parameters all-gathered
    just before its forward and again for its backward, freed after each), then the root (embeddings, final norm,
    output layer, tied or not). Every rank keeps 1 / world of each parameter (DTensors), of its gradient and of the
    AdamW moments built on it afterwards. Returns the same module."""
    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


FSDP_MIN_COLUMNS = 2
"""Every collective runs on every rank in the same order (DESIGN §7), so every rank must run the same forwards in the
update: under FSDP each forward all-gathers the layers' parameters, and under DDP each forward through the wrapper
broadcasts its buffers. The shared-prompt forward (policy.completion_logprobs_shared_prompt) runs twice for a
micro-batch with two completion columns or more and once for one, and a rank's micro-batch can be one token long
(every row ended at once) where another's is not, which hung a 2-rank run until the gloo timeout: with more than
one rank, rollouts and micro-batches keep at least two completion columns (the extra one masked: no effect on the
loss)."""


def min_completion_columns(model) -> int:
    """The completion columns rollouts and micro-batches keep at least: FSDP_MIN_COLUMNS with more than one rank (DDP
    or FSDP), else no floor (one process: nothing to keep in step)."""
    return FSDP_MIN_COLUMNS if is_sharded(model) or (_distributed() and dist.get_world_size() > 1) else 0


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module):
    """Within the block, an FSDP model's parameters are whole on every rank (one all-gather at entry: a collective,
    every rank enters together) and its forwards run no collective; they are freed at exit. A no-op for a model in
    one piece (DDP, one process). Not reentrant.

    Every forward that is not the update's (generation of rollouts and Monte-Carlo continuations, the drift
    evaluation, pi_old / reference log-probs, G_W, the alignment controller's output layer) runs in it, because
    policy.sample drops finished rows and stops when all rows are done, so ranks run different numbers of decode
    steps, and rank 0 alone runs the drift evaluation: with sharded forwards these would be unmatched all-gathers
    (DESIGN §7 wants every collective on every rank in the same order; else a hang, or another layer's parameters).
    Decoding max_new_tokens steps on every rank would match them, but not rank 0's evaluation, and would still
    all-gather every layer at every decode step, where this all-gathers once per phase. The cost is the full
    parameters on every GPU during the block (4 bytes per parameter under run.dtype auto, 2 under bfloat16: README
    "DDP or FSDP"); gradients and AdamW moments stay sharded."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m)]
    model.set_reshard_after_forward(False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        model.set_reshard_after_forward(True)                  # FSDP2's defaults: the layers free after forward,
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps its parameters for the backward


def replica_max_diff(model, opt, extra: torch.Tensor) -> float:
    """Largest difference between ranks of a digest of the parameters, the optimizer's moments and `extra` (the
    controller's alpha): 0.0 when the replicas agree, as DDP must keep them. A collective: every rank calls it at
    the same steps."""
    parts = [p.detach() for p in model.parameters()]
    parts += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    x = torch.cat([t.flatten().double().cpu() for t in parts] + [extra.detach().double()])
    digest = torch.stack([x.sum(), (x * x).sum(), (x * torch.linspace(-1, 1, len(x), dtype=torch.float64)).sum()])
    every = all_gather_cat(digest).view(dist.get_world_size(), -1)
    return float((every.max(0).values - every.min(0).values).abs().max())

def wrap_model(model, ref_model, parallel: str, world: int, device):
    """(the model the update runs through, the reference model) for run.parallel: one process: the model itself;
    fsdp: both sharded in place (shard_model; build the optimizer afterwards, on the shards); ddp: the model in
    DistributedDataParallel, the frozen reference as it is."""
    if world > 1 and parallel == "fsdp":
        return shard_model(model), (shard_model(ref_model) if ref_model is not None else None)
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None), ref_model
    return model, ref_model
