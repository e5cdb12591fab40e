"""The two optimizers, MLX side: the math and state names of `sae_torch/optim.py`, so that a run resumes on either
backend. State is named as sae_core.training_state says (`optimizer.<param>.<slot>`, `optimizer.<scalar>`).

Signum (schedule-free sign-SGD) and Adam: the math, operation by operation, is in docs/SPEC.md section 3.
All state tensors are float32 whatever the parameter dtype; signum's scalars are Python floats (float64) on the
host. Parameters without a gradient are skipped (state untouched).

Differences forced by MLX (the math is the torch module's, operation for operation):

* Gradients are values, not `.grad` attributes: `step(grads, lr, t)` takes the gradient dict by parameter name
  (`{"encoder.weight": g, ...}`, or the nested tree `nn.value_and_grad` returns) and writes the new parameters
  into the module; there is no `zero_grad`.
* `self.state` is a nested dict {param: {slot: array}} (a tree, so it can be an input/output of `mx.compile`);
  `state_tensors()` / `load_state_tensors()` speak the flat `optimizer.<param>.<slot>` names as torch does.
* `lr` and `t` may be Python numbers or scalar arrays, so a compiled step takes them as inputs and does not recompile
  when the learning rate changes. What the host computes per step (Adam's bias corrections, signum's averaging
  weight and running sums) comes from `step_scalars(lr, t)`, called once per step outside any compiled function and
  passed to `step(grads, lr, t, scalars)`.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from sae_core.training_state import (OPTIMIZER_SCALARS, OPTIMIZER_SLOTS, TRAIN_POINT_SLOT, optimizer_scalar_name,
                                     optimizer_tensor_name)


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
        self.state = {p: {slot: mx.zeros(param.shape, dtype=mx.float32) for slot in OPTIMIZER_SLOTS[self.name]
                          if slot != TRAIN_POINT_SLOT}
                      for p, param in tree_flatten(module.trainable_parameters())}

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

    def train(self) -> None:
        """Put the parameters at the point where gradients are taken (a no-op unless schedule-free)."""

    def eval(self) -> None:
        """Put the parameters at the point to evaluate and save (a no-op unless schedule-free)."""

    def step_scalars(self, lr, t):
        """What the host computes for one step, before `step` (which may be compiled); call it once per step.
        None here: the base update needs nothing."""

    def step(self, grads, lr, t, scalars=None) -> None:
        """One update of every parameter that has a gradient in `grads`, written into the module. `scalars`: this
        step's `step_scalars(lr, t)` (computed here when not given)."""
        self._scalars = self.step_scalars(lr, t) if scalars is None else scalars
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


def lerp(a: mx.array, b: mx.array, weight) -> mx.array:
    """torch.lerp(a, b, weight) for a scalar weight: a + w * (b - a) when |w| < 0.5, else b - (b - a) * (1 - w)
    (torch's two forms, for accuracy at both ends). `weight` a Python float, or a float32 scalar array (both forms
    are then evaluated in one expression: base + coeff * (b - a))."""
    if not isinstance(weight, mx.array):
        w = mx.array(weight, dtype=mx.float32)
        return a + w * (b - a) if abs(weight) < 0.5 else b - (b - a) * (1 - w)
    small = mx.abs(weight) < 0.5
    coeff = mx.where(small, weight, weight - 1)
    return mx.where(small, a, b) + coeff * (b - a)


class Signum(Optimizer):
    """Schedule-free sign-SGD (sparsify's signum); the math is in docs/SPEC.md section 3."""
    name = "signum"

    def __init__(self, module: nn.Module, momentum: float = 0.95, weight_lr_power: float = 2.0,
                 average_power: float = 2.0):
        super().__init__(module)
        self.momentum, self.weight_lr_power, self.average_power = momentum, weight_lr_power, average_power
        self.k, self.lr_max, self.weight_sum = 0, 0.0, 0.0
        self.train_mode = True
        self._train_point: dict[str, mx.array] | None = None  # y, kept aside while in eval mode

    def step_scalars(self, lr, t):
        """Advance the host-side averaging sums by one step of learning rate `lr`; returns the averaging weight
        c = lr_max^2 / weight_sum as a float32 scalar array. The first call also starts z at the parameters."""
        if not self.train_mode:
            raise RuntimeError("schedule-free signum stepped in eval mode: call train() after eval()")
        if self.k == 0:  # the wrapper starts z at the parameters' value at the first step
            for p, param in self.params.items():
                self.state[p]["z"] = param.astype(mx.float32)
        lr = float(lr.item()) if isinstance(lr, mx.array) else float(lr)
        self.lr_max = max(lr, self.lr_max)
        weight = (self.k + 1) ** self.average_power * self.lr_max ** self.weight_lr_power  # the wrapper's r
        self.weight_sum = self.weight_sum + weight
        self.k += 1
        return mx.array(weight / self.weight_sum, dtype=mx.float32)

    def _update(self, p, param, g, lr, t):
        slots = self.state[p]
        x = lerp(param, slots["z"], 1 - 1 / self.momentum)
        z = slots["z"] - _f32(lr) * mx.sign(g)  # torch: z.add_(sign(g), alpha=-lr), the same bits
        slots["z"] = z
        x = lerp(x, z, self._scalars)
        return lerp(x, z, 1 - self.momentum).astype(param.dtype)

    def eval(self) -> None:
        if self.train_mode and self.k > 0:
            params = self.params
            self._train_point = params
            self.module.update(tree_unflatten([(p, lerp(param, self.state[p]["z"], 1 - 1 / self.momentum))
                                               for p, param in params.items()]))
        self.train_mode = False

    def train(self) -> None:
        if not self.train_mode and self.k > 0:
            if self._train_point is not None:
                new = self._train_point
            else:
                new = {p: lerp(param, self.state[p]["z"], 1 - self.momentum) for p, param in self.params.items()}
            self.module.update(tree_unflatten(list(new.items())))
        self._train_point = None
        self.train_mode = True

    def state_tensors(self) -> dict:
        """z, the train point y (the parameters in train mode, the kept copy in eval mode) and the scalars ([1]
        NumPy arrays: float64 is not an MLX dtype everywhere)."""
        import numpy as np

        if not self.train_mode and self._train_point is None and self.k > 0:
            raise RuntimeError("the train point of this optimizer is not known (loaded in eval mode)")
        y = self._train_point if not self.train_mode and self._train_point is not None else self.params
        out = super().state_tensors()
        out |= {optimizer_tensor_name(p, TRAIN_POINT_SLOT): y[p].astype(mx.float32) for p in self.state}
        scalars = {"k": np.array([self.k], dtype=np.int64), "lr_max": np.array([self.lr_max], dtype=np.float64),
                   "weight_sum": np.array([self.weight_sum], dtype=np.float64)}
        return out | {optimizer_scalar_name(s): scalars[s] for s in OPTIMIZER_SCALARS[self.name]}

    def load_state_tensors(self, tensors: dict) -> None:
        """Load z and the scalars, and put the parameters at the saved train point y (train mode)."""
        import numpy as np

        super().load_state_tensors(tensors)
        params = self.params
        self.module.update(tree_unflatten([
            (p, mx.array(np.asarray(tensors[optimizer_tensor_name(p, TRAIN_POINT_SLOT)])).astype(params[p].dtype))
            for p in self.state]))
        self.k = int(np.asarray(tensors[optimizer_scalar_name("k")]).reshape(-1)[0])
        self.lr_max = float(np.asarray(tensors[optimizer_scalar_name("lr_max")]).reshape(-1)[0])
        self.weight_sum = float(np.asarray(tensors[optimizer_scalar_name("weight_sum")]).reshape(-1)[0])
        self.train_mode, self._train_point = True, None


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

    def step_scalars(self, lr, t):
        return self.bias_corrections(t)

    def _update(self, p, param, g, lr, t):
        b1, b2 = self.betas
        c1, c2 = self._scalars
        slots = self.state[p]
        m = slots["exp_avg"] * b1 + g * (1 - b1)
        v = slots["exp_avg_sq"] * b2 + ((1 - b2) * g) * g  # torch's addcmul order
        slots["exp_avg"], slots["exp_avg_sq"] = m, v
        update = (m / c1) / (mx.sqrt(v / c2) + self.eps)
        return param - (_f32(lr) * update).astype(param.dtype)


def make_optimizer(name: str, module: nn.Module, average_power: float = 2.0) -> Optimizer:
    return Signum(module, average_power=average_power) if name == "signum" else Adam(module)


__all__ = ["Optimizer", "Signum", "Adam", "make_optimizer", "flat_grads"]
