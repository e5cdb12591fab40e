"""The two optimizers, MLX side: the math and state names of `sae_torch/optim.py`, so that a run resumes on either
backend. State tensors are named `optimizer.<param>.<slot>` (sae_core.training_state).

Signum (sign-SGD with momentum), per parameter p with gradient g, beta = 0.95:
    m <- beta * m + (1 - beta) * g          (m starts at 0)
    p <- p - lr * sign(m)                   (sign(0) = 0)

Adam, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, t = optimizer steps including this one (1 on the first):
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

All state is float32 whatever the parameter dtype. Parameters without a gradient are skipped (state untouched).

Differences forced by MLX (the math is the torch module's, operation for operation):

* Gradients are values, not `.grad` attributes: `step(grads, lr, t)` takes the gradient dict by parameter name
  (`{"encoder.weight": g, ...}`, or the nested tree `nn.value_and_grad` returns) and writes the new parameters
  into the module; there is no `zero_grad`.
* `self.state` is a nested dict {param: {slot: array}} (a tree, so it can be an input/output of `mx.compile`);
  `state_tensors()` / `load_state_tensors()` speak the flat `optimizer.<param>.<slot>` names as torch does.
* `lr` and `t` may be Python numbers or scalar arrays: `update_arrays(lr, t)` turns them into the float32 scalars
  the update uses, so a compiled step takes them as inputs and does not recompile when the learning rate changes.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from sae_core.training_state import OPTIMIZER_SLOTS, optimizer_tensor_name


def flat_grads(grads) -> dict[str, mx.array]:
    """{parameter name: gradient} from a flat dict or the nested tree of `nn.value_and_grad`."""
    if all(isinstance(v, mx.array) or v is None for v in grads.values()):
        return {k: v for k, v in grads.items() if v is not None}
    return dict(tree_flatten(grads))


class Optimizer:
    name = ""

    def __init__(self, module: nn.Module):
        self.module = module
        self.param_names = [p for p, _ in tree_flatten(module.trainable_parameters())]
        self.state = {p: {slot: mx.zeros(param.shape, dtype=mx.float32) for slot in OPTIMIZER_SLOTS[self.name]}
                      for p, param in tree_flatten(module.trainable_parameters())}

    def train(self) -> None:
        """Switch to the training point (a no-op here; schedule-free optimizers average their iterates)."""

    def eval(self) -> None:
        """Switch the parameters to the evaluation point, as saved (a no-op here)."""

    @property
    def params(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.module.trainable_parameters()))

    def state_tensors(self) -> dict[str, mx.array]:
        return {optimizer_tensor_name(p, slot): t for p, slots in self.state.items() for slot, t in slots.items()}

    def load_state_tensors(self, tensors: dict) -> None:
        for p, slots in self.state.items():
            for slot in slots:
                value = mx.array(tensors[optimizer_tensor_name(p, slot)]).astype(mx.float32)
                if tuple(value.shape) != tuple(slots[slot].shape):
                    raise ValueError(f"optimizer state {optimizer_tensor_name(p, slot)} has shape {value.shape}, "
                                     f"expected {slots[slot].shape}")
                slots[slot] = value

    def step(self, grads, lr, t) -> None:
        """One update of every parameter that has a gradient in `grads`, written into the module."""
        grads = flat_grads(grads)
        params = self.params
        new = {}
        for p, param in params.items():
            g = grads.get(p)
            if g is None:
                continue
            new[p] = self._update(p, param, g.astype(mx.float32), lr, t)
        self.module.update(tree_unflatten(list(new.items())))

    def _update(self, p: str, param: mx.array, g: mx.array, lr, t) -> mx.array:
        raise NotImplementedError


def _f32(value) -> mx.array:
    return value.astype(mx.float32) if isinstance(value, mx.array) else mx.array(value, dtype=mx.float32)


class Signum(Optimizer):
    name = "signum"

    def __init__(self, module: nn.Module, beta: float = 0.95):
        super().__init__(module)
        self.beta = beta

    def _update(self, p, param, g, lr, t):
        slots = self.state[p]
        m = slots["momentum"] * self.beta + g * (1 - self.beta)
        slots["momentum"] = m
        return param - (_f32(lr) * mx.sign(m)).astype(param.dtype)


class Adam(Optimizer):
    name = "adam"

    def __init__(self, module: nn.Module, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(module)
        self.betas, self.eps = betas, eps

    def bias_corrections(self, t) -> tuple[mx.array, mx.array]:
        """(1 - beta1^t, 1 - beta2^t) as float32 scalars, computed in float64 on the host when t is a number (as
        torch does), in float32 from an array t inside a compiled step."""
        b1, b2 = self.betas
        if isinstance(t, mx.array):
            tf = t.astype(mx.float32)
            return 1 - mx.power(mx.array(b1, mx.float32), tf), 1 - mx.power(mx.array(b2, mx.float32), tf)
        return mx.array(1 - b1 ** t, dtype=mx.float32), mx.array(1 - b2 ** t, dtype=mx.float32)

    def step(self, grads, lr, t, corrections: tuple[mx.array, mx.array] | None = None) -> None:
        self._corrections = corrections if corrections is not None else self.bias_corrections(t)
        super().step(grads, lr, t)

    def _update(self, p, param, g, lr, t):
        b1, b2 = self.betas
        c1, c2 = self._corrections
        slots = self.state[p]
        m = slots["exp_avg"] * b1 + g * (1 - b1)
        v = slots["exp_avg_sq"] * b2 + ((1 - b2) * g) * g  # torch's addcmul order
        slots["exp_avg"], slots["exp_avg_sq"] = m, v
        update = (m / c1) / (mx.sqrt(v / c2) + self.eps)
        return param - (_f32(lr) * update).astype(param.dtype)


def make_optimizer(name: str, module: nn.Module) -> Optimizer:
    return {"signum": Signum, "adam": Adam}[name](module)


__all__ = ["Optimizer", "Signum", "Adam", "make_optimizer", "flat_grads"]
