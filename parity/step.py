"""Training-step parity: a few optimizer steps of each backend's real training loop against a float64 NumPy
reference of docs/SPEC.md section 3's step, and the step's invariants checked directly after every step.

The cross-backend comparison of `parity.training` cannot see a bug made the same way in both trainers, and the
forward suite never takes a step. Here each backend is compared with this module's float64 step instead:

Design notes: docs/internals.md, section `parity/step.py`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_core.config import SparseCoderConfig
from sae_core.train_config import TrainConfig
from sae_core.training_state import optimizer_tensor_name

from .oracle import evaluate
from .suite import Row

AUXK_ALPHA = 0.5  # larger than the training default: the AuxK gradient well above rounding
# The backends renormalise with W / (|W| + eps), eps of their float32 parameters; the reference does the same, so
# the comparison measures rounding, not this choice.
RENORM_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------------------------
# Reference optimizers (float64), pluggable: TrainConfig.optimizer -> a class with these pure functions of
# {name: array} dicts (state names as sae_core.training_state writes them: optimizer.<param>.<slot>):
#   init_state(params)                          the state before the first step
#   step_state(state, grads, t)                 the state after a step with these gradients (t = 1 on the first)
#   apply(params, state_before, state, lr, t)   the parameters after that step, given the state before and after
#   train_params(weights, state)                the parameters the step starts from, given the saved weights and
#                                               state (schedule-free saves its evaluation point, not these)
#   saved_weights(params, state)                what the trainer saves as the SAE weights
#   gradient(state_before, state, name)         the step's gradient of a parameter, if the state shows it, else None
# Split this way so that the state and the update given the state are checked separately
# (docs/internals.md, `parity/step.py`).
# ---------------------------------------------------------------------------------------------------------------

class AdamReference:
    """Adam as sae_torch/optim.py documents it: beta1 0.9, beta2 0.999, eps 1e-8, bias-corrected."""

    betas, eps = (0.9, 0.999), 1e-8

    @staticmethod
    def _names(name):
        return optimizer_tensor_name(name, "exp_avg"), optimizer_tensor_name(name, "exp_avg_sq")

    def init_state(self, params):
        return {key: np.zeros_like(p, dtype=np.float64) for n, p in params.items() for key in self._names(n)}

    def step_state(self, state, grads, t):
        b1, b2 = self.betas
        new = dict(state)
        for n, g in grads.items():
            m, v = self._names(n)
            new[m] = b1 * state[m] + (1 - b1) * g
            new[v] = b2 * state[v] + (1 - b2) * g * g
        return new

    def apply(self, params, state_before, state, lr, t):
        b1, b2 = self.betas
        out = dict(params)
        for n in params:
            m, v = (np.asarray(state[key], np.float64) for key in self._names(n))
            out[n] = params[n] - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + self.eps)
        return out

    def train_params(self, weights, state):
        return dict(weights)

    def saved_weights(self, params, state):
        return dict(params)

    def gradient(self, state_before, state, name):
        m = self._names(name)[0]
        return (np.asarray(state[m], np.float64) - self.betas[0] * np.asarray(state_before[m], np.float64)) \
            / (1 - self.betas[0])


REFERENCE_OPTIMIZERS = {"adam": AdamReference}


# ---------------------------------------------------------------------------------------------------------------
# The float64 reference step
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class StepSetup:
    """One small training problem: config, initial parameters, batches, and the latents dead at the start."""
    cfg: TrainConfig
    init: dict[str, np.ndarray]
    batches: list[np.ndarray]
    dead_at_start: np.ndarray  # [M] bool
    d_in: int

    @property
    def total_steps(self) -> int:
        return len(self.batches)

    def initial_tokens_since_fired(self) -> np.ndarray:
        return np.where(self.dead_at_start, self.cfg.dead_feature_threshold, 0).astype(np.int64)

    def lr(self, step: int) -> float:
        cfg, total = self.cfg, self.total_steps
        return cfg.lr_at(step, cfg.lr, cfg.warmup_steps(total), total)

    @property
    def normalize(self) -> bool:
        return self.cfg.sae.normalize_decoder and not self.cfg.sae.transcode


@dataclass
class StepState:
    """What a trainer saves after a step: the SAE weights, optimizer state and tokens_since_fired."""
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    tokens_since_fired: np.ndarray


def renormalise(w_dec: np.ndarray) -> np.ndarray:
    return w_dec / (np.linalg.norm(w_dec, axis=1, keepdims=True) + RENORM_EPS)


def reference_step(setup: StepSetup, step: int, before: StepState) -> tuple[StepState, dict]:
    """SPEC 3's step `step` (0-based) in float64 from the state `before` (a backend's saved state, or the start):
    (the state after it, {"grads": projected gradients, "start": the parameters the step started from})."""
    cfg, sae = setup.cfg, setup.cfg.sae
    opt = REFERENCE_OPTIMIZERS[cfg.optimizer]()
    as64 = lambda d: {n: np.asarray(v, np.float64) for n, v in d.items()}
    state = as64(before.optimizer)
    params = opt.train_params(as64(before.weights), state)
    x = setup.batches[step].astype(np.float64)
    if step == 0:
        params["b_dec"] = x.mean(axis=0)
    dead = before.tokens_since_fired >= cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
    res = evaluate(params, x, None, activation=sae.activation, k=sae.k, transcode=sae.transcode,
                   multi_topk=sae.multi_topk, dead_mask=dead, auxk_alpha=cfg.auxk_alpha,
                   auxk_raise_only=cfg.auxk_raise_only)
    grads = dict(res.grads)
    if setup.normalize:
        w = params["W_dec"]
        grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * w).sum(1, keepdims=True) / (w * w).sum(
            1, keepdims=True) * w
    new_state = opt.step_state(state, grads, step + 1)
    new_params = opt.apply(params, state, new_state, setup.lr(step), step + 1)
    if setup.normalize:
        new_params["W_dec"] = renormalise(new_params["W_dec"])
    fired = np.zeros(len(before.tokens_since_fired), bool)
    fired[res.latent_indices[res.latent_acts > 0]] = True
    tokens_since_fired = np.where(fired, 0, before.tokens_since_fired + len(x))
    return (StepState(opt.saved_weights(new_params, new_state), new_state, tokens_since_fired),
            {"grads": grads, "start": params})


def start_state(setup: StepSetup) -> StepState:
    opt = REFERENCE_OPTIMIZERS[setup.cfg.optimizer]()
    return StepState(dict(setup.init), opt.init_state(setup.init), setup.initial_tokens_since_fired())


def make_setup(optimizer: str = "adam", *, steps: int = 3, d_in: int = 23, expansion: int = 8, k: int = 6,
               tokens: int = 96, num_dead: int = 5, lr: float = 2e-3, seed: int = 0) -> StepSetup:
    """An autoencoder (d_in not a power of two) on sparse-structured batches (parity.training.make_batches), SPEC
    init; `num_dead` latents start dead (fewer than d_out // 2); a constant lr (no warm-up, no decay)."""
    from .training import make_batches, make_init

    cfg = TrainConfig(sae=SparseCoderConfig(k=k, expansion_factor=expansion), optimizer=optimizer, lr=lr,
                      lr_warmup_steps=0, lr_decay=False, batch_size=1, ctx_len=tokens, max_tokens=steps * tokens,
                      dead_feature_threshold=10**9, auxk_alpha=AUXK_ALPHA, log_every=1, save_every=10**6,
                      run_name="step", device="cpu")
    init = make_init(cfg.sae, d_in, seed)
    rng = np.random.default_rng([seed, 3])
    dead = np.zeros(cfg.sae.num_latents_for(d_in), bool)
    dead[rng.choice(len(dead), size=num_dead, replace=False)] = True
    assert num_dead < d_in // 2, "the compiled AuxK's zeroed slots are exercised only with few dead latents"
    return StepSetup(cfg, init, make_batches(steps, tokens, d_in, seed), dead, d_in)


# ---------------------------------------------------------------------------------------------------------------
# The backends: one step per fit() call, the checkpoint read back after each
# ---------------------------------------------------------------------------------------------------------------

BACKENDS = ("torch", "mlx", "mlx-compiled")


def backend_steps(backend: str, setup: StepSetup, root: Path) -> list[StepState]:
    """Run the backend's trainer for setup.total_steps steps, one `fit()` per step; the saved state after each."""
    from .training import HOOK, load_run

    run = Path(root) / backend
    cfg = setup.cfg
    batches = [{HOOK: b} for b in setup.batches]
    tsf = setup.initial_tokens_since_fired()
    if backend == "torch":
        import torch

        from sae_torch.activations import ArrayActivationSource

        from .training import torch_threads, torch_trainer

        trainer = torch_trainer(cfg, batches, setup.init, run, stop_after_steps=0, plots=False)
        for c in trainer.coders.values():
            c.tokens_since_fired.copy_(torch.from_numpy(tsf))
        fresh_source = lambda: ArrayActivationSource(iter(batches), "cpu")
        context = lambda: torch_threads(1)
    else:
        import mlx.core as mx

        from sae_mlx.activations import ArrayActivationSource

        from .training import mlx_trainer

        trainer = mlx_trainer(cfg, batches, setup.init, run, compiled="all" if backend == "mlx-compiled" else "off",
                              stop_after_steps=0, plots=False)
        for c in trainer.coders.values():
            c.tokens_since_fired = mx.array(tsf)
        fresh_source = lambda: ArrayActivationSource(iter(batches))
        context = lambda: mx.stream(mx.cpu)
    states = []
    for step in range(1, setup.total_steps + 1):
        trainer.stop_after_steps = step  # a planned pause after this step: fit() saves and returns
        trainer.source = fresh_source()  # the source resumes at the trainer's batch position
        with context():
            trainer.fit()
        weights, state = load_run(run)
        states.append(StepState(weights, {n: v for n, v in state.items() if n.startswith("optimizer.")},
                                state["tokens_since_fired"]))
    return states


# ---------------------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------------------

# quantity -> ceiling, each the worst over steps and tensors. Measured on Linux x86-64 CPU (torch 2.13, MLX 0.32.4,
# 3 steps, seeds 0-4; torch / MLX eager / MLX compiled) in the comments; the mutations each must catch, and what they
# measured, are listed in tests/test_step_parity.py.
CEILINGS = {
    # the optimizer state after the step vs the float64 step from the backend's own state before it:
    # max|diff| / max|ref| per state tensor (gradients and moments)
    "optimizer state": 1e-4,
    # the weights vs the update applied in float64 from the backend's own weights before and state after the step
    # (then the renormalisation): max|diff| / max|ref update| per tensor
    "update given the state": 1e-3,
    "tokens_since_fired": 0.0,  # fraction of latents that differ from the reference step's
    "decoder row norms": 1e-6,  # max |1 - |W_dec row|| after the step
    # |cos(gradient row, W_dec row)| of the step's W_dec gradient (where the optimizer state shows it) and the row
    # it started from: the projection removes that component
    "decoder gradient along rows": 1e-5,
}


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    return diff / scale if scale > 0 else diff


def compare_steps(got: list[StepState], setup: StepSetup) -> dict[str, float]:
    """The quantities of CEILINGS for a backend's saved states after each step (see CEILINGS)."""
    opt = REFERENCE_OPTIMIZERS[setup.cfg.optimizer]()
    out = dict.fromkeys(CEILINGS, 0.0)
    before = start_state(setup)
    for step, after in enumerate(got):
        ref, info = reference_step(setup, step, before)
        if set(after.weights) != set(ref.weights) or set(after.optimizer) != set(ref.optimizer):
            return dict.fromkeys(CEILINGS, float("inf"))
        worst = lambda key, value: out.__setitem__(key, max(out[key], value))
        worst("optimizer state", max(_rel(after.optimizer[n], ref.optimizer[n]) for n in ref.optimizer))
        start = info["start"]  # the backend's weights before the step (with step 0's b_dec init, from the batch)
        expected = opt.apply(start, before.optimizer, after.optimizer, setup.lr(step), step + 1)
        if setup.normalize:
            expected["W_dec"] = renormalise(expected["W_dec"])
        expected = opt.saved_weights(expected, after.optimizer)
        worst("update given the state", max(_rel(after.weights[n] - start[n], expected[n] - start[n])
                                            for n in expected))
        worst("tokens_since_fired", float(np.mean(after.tokens_since_fired != ref.tokens_since_fired)))
        if setup.normalize:
            norms = np.linalg.norm(np.asarray(after.weights["W_dec"], np.float64), axis=1)
            worst("decoder row norms", float(np.abs(norms - 1).max()))
            grad = opt.gradient(before.optimizer, after.optimizer, "W_dec")
            if grad is not None:
                # rows whose gradient stands well above the rounding of recovering it from the state (a latent
                # not selected in this step has gradient 0, recovered as m_t - beta1 m_{t-1}: rounding only)
                w, size = start["W_dec"], np.linalg.norm(grad, axis=1)
                rows = size >= 1e-2 * size.max()
                cos = np.abs((grad[rows] * w[rows]).sum(1)) / (size[rows] * np.linalg.norm(w[rows], axis=1))
                worst("decoder gradient along rows", float(cos.max()) if rows.any() else 0.0)
        before = after
    return out


def available_backends() -> dict[str, str | None]:
    import importlib.util

    has = lambda m: importlib.util.find_spec(m) is not None
    return {"torch": None if has("torch") else "torch is not installed",
            "mlx": None if has("mlx") else "mlx is not installed",
            "mlx-compiled": None if has("mlx") else "mlx is not installed"}


def run_step_parity(backends=None, optimizers=None, *, setup_kwargs: dict | None = None,
                    details: dict | None = None) -> list[Row]:
    """Rows (path `step:<backend>`, dtype float32) for every backend available here and every optimizer with a
    reference. `details`: filled with {(backend, optimizer): measured quantities}."""
    reasons = available_backends()
    backends = [b for b in BACKENDS if reasons[b] is None] if backends is None else list(backends)
    rows = []
    for optimizer in (optimizers or list(REFERENCE_OPTIMIZERS)):
        setup = make_setup(optimizer, **(setup_kwargs or {}))
        case = (f"{optimizer}, {setup.total_steps} steps, d_in={setup.d_in}, M={len(setup.dead_at_start)}, "
                f"k={setup.cfg.sae.k}, {int(setup.dead_at_start.sum())} dead at start")
        with tempfile.TemporaryDirectory(prefix="sae-step-parity-") as tmp:
            for backend in backends:
                measured = compare_steps(backend_steps(backend, setup, Path(tmp)), setup)
                if details is not None:
                    details[backend, optimizer] = measured
                rows += [Row(f"step:{backend}", case, "float32", f"step: {q}", measured[q], ceiling,
                             bool(measured[q] <= ceiling)) for q, ceiling in CEILINGS.items()]
    return rows
