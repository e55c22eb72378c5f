"""A domain's training workers (resources.workers_per_trial > 1): each worker's share of a micro-batch and the
sums across workers the recipe needs (losses, token counts, the LoRA gradients)."""
from __future__ import annotations


class Replicas:
    """This domain's training workers (resources.workers_per_trial): who I am and the sums the recipe needs.
    Hand-written instead of DistributedDataParallel: workers see uneven row counts at the end of an
    epoch (one may have none), and one flat all-reduce per optimizer step of the few LoRA tensors
    carries the finiteness check too, so every worker stops on the same step."""

    def __init__(self) -> None:
        import torch.distributed as dist
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.size = dist.get_world_size() if self.on else 1

    def mine(self, rows: list) -> list:
        return rows[self.rank::self.size]

    def sum(self, values: list[float]) -> list[float]:
        if not self.on:
            return values
        import torch
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: list, extra: float) -> float:
        """Sum every worker's gradients (in place) and `extra`; returns the summed extra."""
        if not self.on:
            return extra
        import torch
        import torch.distributed as dist
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float()
                          for p in params] + [torch.tensor([extra], device=params[0].device)])
        backend_cpu = dist.get_backend() == "gloo"
        buf = flat.cpu() if backend_cpu else flat
        dist.all_reduce(buf)
        flat = buf.to(flat.device)
        o = 0
        for p in params:
            n = p.numel()
            p.grad = flat[o:o + n].view_as(p).to(p.dtype)
            o += n
        return float(flat[-1])
