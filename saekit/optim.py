"""Schedule-free SignSGD (Defazio et al. 2024, "The Road Less Scheduled"; sign updates as sparsify's default).

The gradient is taken at y = (1−β)·z + β·x, where z takes plain sign steps and x is the running
average of z. Parameters hold y while training; `finalize()` swaps in x, the iterate to keep.
No schedule is needed beyond a warm-up, which also weights the average.
"""

from __future__ import annotations

import torch


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, beta: float = 0.95, warmup_steps: int = 0):
        super().__init__(params, dict(lr=lr, beta=beta, warmup_steps=warmup_steps, step=0, weight_sum=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] += 1
            t, beta = group["step"], group["beta"]
            lr = group["lr"] * min(1.0, t / max(group["warmup_steps"], 1))
            weight = lr**2  # schedule-free's averaging weight: later (full-lr) steps count more
            group["weight_sum"] += weight
            c = weight / group["weight_sum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                    state["x"] = p.detach().clone()
                z, x = state["z"], state["x"]
                z.add_(p.grad.sign(), alpha=-lr)
                x.lerp_(z, c)
                p.copy_(x).lerp_(z, 1 - beta)  # y = β·x + (1−β)·z

    @torch.no_grad()
    def finalize(self) -> None:
        """Load the averaged iterate x into the parameters (call before saving or evaluating)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "x" in self.state[p]:
                    p.copy_(self.state[p]["x"])
