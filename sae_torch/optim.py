"""The two optimizers, written out by hand so that the MLX twin implements the identical math and a run can
resume on either backend: signum (sparsify's schedule-free sign-SGD, the same operations in the same order) and
Adam. The math, operation by operation, is in docs/SPEC.md section 3; the state names (`optimizer.<param>.<slot>`
and `optimizer.<scalar>` [1] tensors) are in docs/SPEC.md section 4 (sae_core.training_state).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_core.training_state import (OPTIMIZER_SCALARS, OPTIMIZER_SLOTS, TRAIN_POINT_SLOT, optimizer_scalar_name,
                                     optimizer_tensor_name)


class Optimizer:
    name = ""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.state = {(p, slot): torch.zeros_like(param, dtype=torch.float32)
                      for p, param in params.items() for slot in OPTIMIZER_SLOTS[self.name]
                      if slot != TRAIN_POINT_SLOT}

    def zero_grad(self) -> None:
        for param in self.params.values():
            param.grad = None

    def train(self) -> None:
        """Put the parameters at the point where gradients are taken (a no-op unless schedule-free)."""

    def eval(self) -> None:
        """Put the parameters at the point to evaluate and save (a no-op unless schedule-free)."""

    def state_tensors(self) -> dict[str, Tensor]:
        return {optimizer_tensor_name(p, slot): t for (p, slot), t in self.state.items()}

    def load_state_tensors(self, tensors: dict) -> None:
        """Tensors or NumPy arrays by state name (the scalars stay float64: NumPy keeps them exact)."""
        for (p, slot), t in self.state.items():
            t.copy_(torch.as_tensor(tensors[optimizer_tensor_name(p, slot)]))


class Signum(Optimizer):
    """Schedule-free sign-SGD (sparsify's signum); the math is in docs/SPEC.md section 3."""
    name = "signum"

    def __init__(self, params: dict[str, nn.Parameter], momentum: float = 0.95, weight_lr_power: float = 2.0,
                 average_power: float = 2.0):
        super().__init__(params)
        self.momentum, self.weight_lr_power, self.average_power = momentum, weight_lr_power, average_power
        self.k, self.lr_max, self.weight_sum = 0, 0.0, 0.0
        self.train_mode = True
        self._train_point: dict[str, Tensor] | None = None  # y, kept aside while in eval mode

    @torch.no_grad()
    def step(self, lr: float, t: int | None = None) -> None:
        """One step at learning rate `lr` (`t` is unused: the step count `k` is the optimizer's own state)."""
        if not self.train_mode:
            raise RuntimeError("schedule-free signum stepped in eval mode: call train() after eval()")
        stepped = {p: param for p, param in self.params.items() if param.grad is not None}
        if self.k == 0:  # the wrapper starts z at the parameters' value at the first step
            for p, param in self.params.items():
                self.state[(p, "z")].copy_(param)
        for p, param in stepped.items():
            param.lerp_(self.state[(p, "z")], 1 - 1 / self.momentum)
        for p, param in stepped.items():
            self.state[(p, "z")].add_(param.grad.sign(), alpha=-lr)
        self.lr_max = max(lr, self.lr_max)
        weight = (self.k + 1) ** self.average_power * self.lr_max ** self.weight_lr_power  # the wrapper's r
        self.weight_sum = self.weight_sum + weight
        ckp1 = weight / self.weight_sum
        for p, param in stepped.items():
            z = self.state[(p, "z")]
            param.lerp_(z, ckp1)
            param.lerp_(z, 1 - self.momentum)
        self.k += 1

    @torch.no_grad()
    def eval(self) -> None:
        if self.train_mode and self.k > 0:
            self._train_point = {p: param.detach().clone() for p, param in self.params.items()}
            for p, param in self.params.items():
                param.lerp_(self.state[(p, "z")], 1 - 1 / self.momentum)
        self.train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        if not self.train_mode and self.k > 0:
            for p, param in self.params.items():
                if self._train_point is not None:
                    param.copy_(self._train_point[p])
                else:
                    param.lerp_(self.state[(p, "z")], 1 - self.momentum)
        self._train_point = None
        self.train_mode = True

    def state_tensors(self) -> dict[str, Tensor]:
        """z, the train point y (the parameters in train mode, the kept copy in eval mode) and the scalars."""
        if not self.train_mode and self._train_point is None and self.k > 0:
            raise RuntimeError("the train point of this optimizer is not known (loaded in eval mode)")
        y = self._train_point if not self.train_mode and self._train_point is not None else \
            {p: param.detach() for p, param in self.params.items()}
        out = super().state_tensors()
        out |= {optimizer_tensor_name(p, TRAIN_POINT_SLOT): y[p].float() for p in self.params}
        scalars = {"k": torch.tensor([self.k], dtype=torch.int64),
                   "lr_max": torch.tensor([self.lr_max], dtype=torch.float64),
                   "weight_sum": torch.tensor([self.weight_sum], dtype=torch.float64)}
        return out | {optimizer_scalar_name(s): scalars[s] for s in OPTIMIZER_SCALARS[self.name]}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Load z and the scalars, and put the parameters at the saved train point y (train mode)."""
        super().load_state_tensors(tensors)
        for p, param in self.params.items():
            param.copy_(torch.as_tensor(tensors[optimizer_tensor_name(p, TRAIN_POINT_SLOT)]))
        self.k = int(tensors[optimizer_scalar_name("k")].reshape(-1)[0])
        self.lr_max = float(tensors[optimizer_scalar_name("lr_max")].reshape(-1)[0])
        self.weight_sum = float(tensors[optimizer_scalar_name("weight_sum")].reshape(-1)[0])
        self.train_mode, self._train_point = True, None


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


def make_optimizer(name: str, module: nn.Module, average_power: float = 2.0) -> Optimizer:
    params = {n: p for n, p in module.named_parameters()}
    return Signum(params, average_power=average_power) if name == "signum" else Adam(params)


__all__ = ["Optimizer", "Signum", "Adam", "make_optimizer"]
