"""Data-parallel runs under `torchrun`: rank info, the process group and the DDP wrapper.

    dist = Dist()                 # WORLD_SIZE / RANK / LOCAL_RANK from the environment
    dist.init(device)             # gloo on CPU, NCCL on CUDA; no-op when WORLD_SIZE == 1
    net = dist.wrap(model)        # DistributedDataParallel (gradients averaged in backward)

Objectives may run several forward passes per step (augmented views, a teacher pass): they
all go through the wrapped module before one backward, which DDP supports (each parameter's
gradient is accumulated once per backward). Buffers are not re-broadcast before each forward
(BatchNorm statistics would change in place between the passes, which autograd refuses); the
engine broadcasts rank 0's buffers after each epoch instead. What DDP does not support is a
parameter used outside `forward` (it is then marked ready twice: "Expected to mark a variable
ready only once"), so every loss term must come out of the model's forward: WhenWhoNet, for
instance, pools WHEN attention inside `forward_when` (`when_clip_attention`).
"""
from __future__ import annotations

import os


def start(device: str = "auto", seed: int = 0):
    """(Dist, this rank's device) for a run: the process group joined, the RNGs seeded."""
    from pllcli.runtime import resolve_device, set_seed
    dist = Dist()
    dev = dist.device(resolve_device(device))
    dist.init(dev)
    set_seed(seed)
    return dist, dev


class Dist:
    """Rank info and the few collectives the engine and objectives need (no-ops when world == 1)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device):
        """The device of this rank: cuda:LOCAL_RANK for CUDA runs, `device` otherwise."""
        import torch
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def init(self, device) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def wrap(self, model):
        """`model` in DistributedDataParallel when world > 1 (it broadcasts rank 0's weights)."""
        if not self.enabled or not any(p.requires_grad for p in model.parameters()):
            return model
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = next(model.parameters()).device
        # no buffer broadcast before each forward (newer torch spells it forward_sync_buffers)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        return DDP(model, device_ids=[dev] if dev.type == "cuda" else None, find_unused_parameters=True,
                   **{sync: False})

    def gather_rows(self, index, rows):
        """All ranks' (index (n,), rows (n, C)) concatenated (variable n per rank)."""
        if not self.enabled:
            return index, rows
        import torch
        import torch.distributed as dist
        n = torch.tensor([index.numel()], device=index.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        pi = torch.full((m,), -1, dtype=index.dtype, device=index.device)
        pr = torch.zeros((m,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        pi[:index.numel()], pr[:index.numel()] = index, rows
        gi = [torch.empty_like(pi) for _ in range(self.world)]
        gr = [torch.empty_like(pr) for _ in range(self.world)]
        dist.all_gather(gi, pi)
        dist.all_gather(gr, pr)
        i, r = torch.cat(gi), torch.cat(gr)
        keep = i >= 0
        return i[keep], r[keep]

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj` in rank order, on every rank ([obj] in one process)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module) -> None:
        """Rank 0's parameters and buffers to every rank (BatchNorm statistics drift per rank)."""
        if not self.enabled:
            return
        import torch.distributed as dist
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (e.g. a NaN loss)."""
        if not self.enabled:
            return flag
        import torch
        import torch.distributed as dist
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1.0 if flag else 0.0], device=dev)  # NCCL reduces CUDA tensors only
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
