"""AdamW written out by hand, in the assignment's variant (as in transformers' former AdamW):
bias correction folded into the step size (Kingma & Ba, section 2, "efficient version"), and weight decay
decoupled from the gradient (Loshchilov & Hutter) and scaled by the learning rate. No schedule."""
import math
from typing import Callable, Iterable, Optional

import torch
from torch.optim import Optimizer


class AdamW(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if not lr > 0.0:
            raise ValueError(f"AdamW: lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must each be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"AdamW: eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # first moment m
                    state["exp_avg_sq"] = torch.zeros_like(p)  # second moment v
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)  # m = beta1 * m + (1 - beta1) * g
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v = beta2 * v + (1 - beta2) * g^2

                step_size = group["lr"]
                if group["correct_bias"]:
                    t = state["step"]
                    step_size *= math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
        return loss
