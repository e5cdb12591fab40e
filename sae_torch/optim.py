"""The two optimizers, written out by hand so that the MLX twin implements the identical math and a run can
resume on either backend. State tensors are named `optimizer.<param>.<slot>` (sae_core.training_state).

Signum (sign-SGD with momentum), per parameter p with gradient g, beta = 0.95:
    m <- beta * m + (1 - beta) * g          (m starts at 0)
    p <- p - lr * sign(m)                   (sign(0) = 0)

Adam, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, t = optimizer steps including this one (1 on the first):
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

All state is float32 whatever the parameter dtype. Parameters without a gradient are skipped (state untouched).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_core.training_state import OPTIMIZER_SLOTS, optimizer_tensor_name


class Optimizer:
    name = ""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.state = {(p, slot): torch.zeros_like(param, dtype=torch.float32)
                      for p, param in params.items() for slot in OPTIMIZER_SLOTS[self.name]}

    def train(self) -> None:
        """Switch to the training point (a no-op here; schedule-free optimizers average their iterates)."""

    def eval(self) -> None:
        """Switch the parameters to the evaluation point, as saved (a no-op here)."""

    def zero_grad(self) -> None:
        for param in self.params.values():
            param.grad = None

    def state_tensors(self) -> dict[str, Tensor]:
        return {optimizer_tensor_name(p, slot): t for (p, slot), t in self.state.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        for (p, slot), t in self.state.items():
            t.copy_(tensors[optimizer_tensor_name(p, slot)])


class Signum(Optimizer):
    name = "signum"

    def __init__(self, params: dict[str, nn.Parameter], beta: float = 0.95):
        super().__init__(params)
        self.beta = beta

    @torch.no_grad()
    def step(self, lr: float, t: int) -> None:
        for p, param in self.params.items():
            if param.grad is None:
                continue
            m = self.state[(p, "momentum")]
            m.mul_(self.beta).add_(param.grad.float(), alpha=1 - self.beta)
            param.sub_((lr * torch.sign(m)).to(param.dtype))


class Adam(Optimizer):
    name = "adam"

    def __init__(self, params: dict[str, nn.Parameter], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params)
        self.betas, self.eps = betas, eps

    @torch.no_grad()
    def step(self, lr: float, t: int) -> None:
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        for p, param in self.params.items():
            if param.grad is None:
                continue
            g = param.grad.float()
            m, v = self.state[(p, "exp_avg")], self.state[(p, "exp_avg_sq")]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            update = (m / c1) / ((v / c2).sqrt() + self.eps)
            param.sub_((lr * update).to(param.dtype))


def make_optimizer(name: str, module: nn.Module) -> Optimizer:
    params = {n: p for n, p in module.named_parameters()}
    return {"signum": Signum, "adam": Adam}[name](params)


__all__ = ["Optimizer", "Signum", "Adam", "make_optimizer"]
