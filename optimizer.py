"""AdamW written out by hand, in the assignment's variant (as in transformers' former AdamW):
bias correction folded into the step size (Kingma & Ba, section 2, "efficient version"), and weight decay
decoupled from the gradient (Loshchilov & Hutter) and scaled by the learning rate; and the learning-rate schedules
that step it (transformers' formulas)."""
import math
from typing import Callable, Iterable, Iterator, Optional

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
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AdamW does not support sparse gradients")
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # first moment m
                    state["exp_avg_sq"] = torch.zeros_like(p)  # second moment v
                state["step"] += 1
            self._update(params, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        """The update of a group's parameters a chunk at a time: each _foreach_ op is one call over a chunk's
        tensors, where a loop would pay Python and dispatch costs per tensor and per op; chunks of at most
        UPDATE_CHUNK elements (or one larger tensor) bound the denominators' temporary, which over all of a 1.1B
        model's weights at once was 4.4 GB above the weights, gradients and moments."""
        beta1, beta2 = group["betas"]
        for chunk in chunks(params, UPDATE_CHUNK):
            grads = [p.grad for p in chunk]
            m = [self.state[p]["exp_avg"] for p in chunk]
            v = [self.state[p]["exp_avg_sq"] for p in chunk]
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m = beta1 * m + (1 - beta1) * g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)  # v = beta2 * v + (1 - beta2) * g^2

            step_sizes = []
            for p in chunk:
                t = self.state[p]["step"]
                correction = math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) if group["correct_bias"] else 1.0
                step_sizes.append(-group["lr"] * correction)
            denominators = torch._foreach_sqrt(v)
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(chunk, m, denominators, step_sizes)
            if group["weight_decay"] > 0.0:
                torch._foreach_mul_(chunk, 1 - group["lr"] * group["weight_decay"])


UPDATE_CHUNK = 1 << 24  # elements: 64 MB of float32 temporaries


def chunks(tensors: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """tensors in order, in consecutive lists of at most limit elements each (a larger tensor alone)."""
    chunk, size = [], 0
    for tensor in tensors:
        if chunk and size + tensor.numel() > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(tensor)
        size += tensor.numel()
    if chunk:
        yield chunk


SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the learning rate at each optimizer step (from 0): a linear warmup from 0 over warmup_steps,
    then constant, a linear decay to 0 at total_steps, or half a cosine to 0 there (transformers'
    get_constant_schedule_with_warmup, get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def decay_groups(named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Parameter groups for AdamW: weight decay on matrices only, none on norm weights and biases (vectors), as
    transformers' Trainer and most recipes leave them."""
    params = [p for _, p in named_params if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params}]  # one group, as training states saved before weight decay existed hold
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
