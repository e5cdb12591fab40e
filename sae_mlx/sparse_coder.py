"""The TopK sparse coder (autoencoder or transcoder) of docs/SPEC.md section 2, with sparsify's API and names, in MLX.

The exact mirror of `sae_torch/sparse_coder.py`. The dense pre-activations are computed under `mx.stop_gradient`;
they choose the latents and give the chosen values by a gather. Those values carry a sparse vjp (`sparse_encode`
with `values=`), so the backward never touches a dense [N, M] array, and AuxK and Multi-TopK train the encoder
through exactly the latents they select. When few latents are dead, eager AuxK runs as dense matmuls over the dead
latents' rows only (`subset_decode`): the same loss and gradients.

Design notes: docs/internals.md, section `sae_mlx/sparse_coder.py`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten

from sae_core import inputs
from sae_core.checkpoint import (WEIGHTS_FILE, atomic_path, check_finite, load_weights_cast, validate_checkpoint,
                                 weights_dtype, write_config)
from sae_core.config import SparseCoderConfig
from sae_core.hub import coder_folders, hub_coder_folder

from .kernels.row_subset import raise_only_grad, subset_decode
from .kernels import sparse_rows
from .kernels.sparse_rows import sparse_decode, sparse_encode
from .kernels.topk import topk_indices

# F64 loads as float32: the Metal GPU has no float64 (every GPU op on it raises) and `mx.load` refuses F64 files.
_MLX_DTYPES = {"F32": mx.float32, "BF16": mx.bfloat16, "F16": mx.float16, "F64": mx.float32}

# A dense [rows, M] array (pre-activations, the selection's sort keys) stays below this many elements: MLX
# indexes elements with int32 in places. Read at call time, so a test can lower it.
_DENSE_LIMIT = 2**31


class EncoderOutput(NamedTuple):
    top_acts: mx.array
    top_indices: mx.array
    pre_acts: mx.array  # dense [N, M], under stop_gradient: used for selection only


class ForwardOutput(NamedTuple):
    sae_out: mx.array
    latent_acts: mx.array
    latent_indices: mx.array
    fvu: mx.array
    auxk_loss: mx.array
    multi_topk_fvu: mx.array


def row_chunks(num_rows: int, num_latents: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges whose dense [rows, num_latents] blocks each stay below `_DENSE_LIMIT` elements."""
    if num_rows * num_latents < _DENSE_LIMIT:
        return [(0, num_rows)]
    step = max(1, (_DENSE_LIMIT - 1) // num_latents)
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _topk_indices(values: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries of each row, in no particular order (int32): `mx.argpartition`, or the
    Metal radix select with SAE_MLX_TOPK=metal (see sae_mlx/kernels/topk.py)."""
    return topk_indices(values, k)


def _count_dead(dead_mask: mx.array) -> int | None:
    """The number of dead latents as a Python int (a host sync), or None inside `mx.compile`, where arrays
    cannot be evaluated."""
    count = _read(dead_mask.sum())
    return None if count is None else int(count)


def _read(value: mx.array):
    """An array's value as Python numbers (a host sync), or None inside `mx.compile`, where arrays cannot be
    evaluated."""
    try:
        return value.tolist()
    except ValueError as error:  # "[eval] Attempting to eval an array during function transformations ..."
        if "function transformations" in str(error):
            return None
        raise


def _info(value) -> inputs.ArrayInfo:
    """An argument as the shared checks (sae_core.inputs) see it."""
    if not isinstance(value, mx.array):
        return inputs.ArrayInfo(inputs.type_name(value), None, None)
    return inputs.ArrayInfo(None, tuple(value.shape), _dtype_name(value.dtype))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


class SparseCoder(nn.Module):
    # AuxK runs as dense matmuls over the dead latents' rows (`subset_decode`) when there are at most this many
    # times k_aux dead latents, else through the sparse kernels (as sae_torch; measured there, see its comment).
    # An instance may set it (0: always sparse). Inside mx.compile AuxK always takes the fixed-size sparse path.
    # aux_dense_max_fraction: also at most this fraction of all latents dead (as sae_torch).
    aux_dense_max_ratio: float = 16.0
    aux_dense_max_fraction: float = 0.25
    # AuxK's gradient at the chosen dead latents' activations clipped to min(g, 0) (as sae_torch; off here, the
    # trainer turns it on: TrainConfig.auxk_raise_only). An instance may set it.
    auxk_raise_only: bool = False

    def __init__(self, d_in: int, cfg: SparseCoderConfig, *, dtype: mx.Dtype | None = None,
                 decoder: bool = True, d_out: int | None = None):
        super().__init__()
        self._cfg = cfg
        self._d_in = d_in
        self._d_out = d_in if d_out is None else d_out
        self._num_latents = cfg.num_latents_for(d_in)
        cfg.validate(d_in, self._d_out)
        dtype = mx.float32 if dtype is None else dtype

        self.encoder = nn.Linear(d_in, self._num_latents)  # weight and bias uniform(+-1/sqrt(d_in))
        self.encoder.weight = self.encoder.weight.astype(dtype)
        self.encoder.bias = mx.zeros((self._num_latents,), dtype=dtype)
        if not decoder:
            self.W_dec = None
        elif cfg.transcode:
            self.W_dec = mx.zeros((self._num_latents, self._d_out), dtype=dtype)
        else:
            self.W_dec = mx.array(self.encoder.weight)
            self.set_decoder_norm_to_unit_norm()
        self.b_dec = mx.zeros((self._d_out,), dtype=dtype)
        if cfg.skip_connection:
            self.W_skip = mx.zeros((self._d_out, d_in), dtype=dtype)
        else:
            self.W_skip = None

    @property
    def cfg(self) -> SparseCoderConfig:
        return self._cfg

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def num_latents(self) -> int:
        return self._num_latents

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.weight.dtype

    # ---- selection (under stop_gradient: it only chooses indices) ----

    def select_indices(self, pre_acts: mx.array) -> mx.array:
        if self.cfg.activation == "groupmax":
            k = self.cfg.k
            group_max = pre_acts.reshape(*pre_acts.shape[:-1], k, -1).argmax(axis=-1).astype(mx.int32)
            offsets = mx.arange(0, self.num_latents, self.num_latents // k, dtype=mx.int32)
            return group_max + offsets
        return _topk_indices(pre_acts, self.cfg.k)

    def aux_indices(self, pre_acts: mx.array, dead_mask: mx.array) -> mx.array:
        """The AuxK latents: the k_aux largest pre-activations among the dead latents (reads num_dead: eager only)."""
        dead = _dead_latents(dead_mask)  # the top-k runs on dead columns only
        return dead[self._aux_slots(pre_acts[:, dead])]

    def _aux_slots(self, dead_pre: mx.array) -> mx.array:
        """Each token's AuxK slots: the k_aux largest of its pre-activations at the dead latents."""
        return _topk_indices(dead_pre, min(self.d_out // 2, dead_pre.shape[-1]))

    def _fixed_aux_indices(self, pre_acts: mx.array, dead_mask: mx.array) -> mx.array:
        """AuxK with a fixed number of slots, min(d_out // 2, M), for `mx.compile`: slots on live latents (if
        any) must be zeroed by the caller (`dead_mask[indices]`)."""
        dead_only = mx.where(dead_mask, pre_acts, -mx.inf)
        return _topk_indices(dead_only, min(self.d_out // 2, self.num_latents))

    def multi_topk_indices(self, pre_acts: mx.array) -> mx.array:
        return _topk_indices(pre_acts, min(4 * self.cfg.k, self.num_latents))

    # ---- the differentiable pieces ----

    def encoder_input(self, x: mx.array) -> mx.array:
        return x if self.cfg.transcode else x - self.b_dec

    def sparse_encoder_inputs(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(x_in, bias): the encoder input and bias through which the selected latents' sparse vjp reaches the
        encoder. For an autoencoder x_in = x - b_dec, but b_dec's gradient would come back as an [N, d_in] input
        cotangent that is then summed over tokens. So b_dec is under stop_gradient in x_in and enters through the
        equal bias b_enc - W_enc b_dec instead (W_enc under stop_gradient there: its gradient comes through x_in).
        Same values, same gradients, and MLX never evaluates the input cotangent unless x itself needs one."""
        if self.cfg.transcode:
            return x, self.encoder.bias
        return (x - mx.stop_gradient(self.b_dec),
                self.encoder.bias - mx.stop_gradient(self.encoder.weight) @ self.b_dec)

    def acts_at(self, x_in: mx.array, bias: mx.array, indices: mx.array, chosen: mx.array,
                csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """relu(pre-activation) of the chosen latents, with a sparse vjp that reaches the encoder.

        `chosen` holds the values gathered from the dense pre-activations (`gather_chosen`); `sparse_encode` only
        supplies the gradient path (chosen - bias + bias is exact where the latent fires, and 0 where it does
        not). (x_in, bias) come from `sparse_encoder_inputs`; `csr` from `_latent_csr`."""
        bias = bias[indices]
        values = chosen.astype(bias.dtype) - mx.stop_gradient(bias)
        return nn.relu(sparse_encode(x_in, self.encoder.weight, indices, values=values, csr=csr) + bias)

    @staticmethod
    def gather_chosen(pre_acts: mx.array, indices: mx.array) -> mx.array:
        return mx.take_along_axis(pre_acts, indices, axis=-1)

    def pre_acts(self, x_in: mx.array) -> mx.array:
        return mx.stop_gradient(nn.relu(x_in @ self.encoder.weight.T + self.encoder.bias))

    def _pre_acts_chunks(self, x_in: mx.array):
        """(rows, dense pre-activations of those rows) for row chunks below `_DENSE_LIMIT` elements."""
        for start, stop in row_chunks(x_in.shape[0], self.num_latents):
            rows = x_in if (start, stop) == (0, x_in.shape[0]) else x_in[start:stop]
            yield self.pre_acts(rows)

    def encode(self, x: mx.array) -> EncoderOutput:
        inputs.check_rows("x", _info(x), self.d_in, "d_in", _dtype_name(self.dtype))
        x_in, bias = self.sparse_encoder_inputs(x)
        pres = list(self._pre_acts_chunks(x_in))
        top_indices = _cat([self.select_indices(pre) for pre in pres])
        pre_acts = _cat(pres)  # the dense [N, M] array the caller asked for
        return EncoderOutput(self.acts_at(x_in, bias, top_indices, self.gather_chosen(pre_acts, top_indices)),
                             top_indices, pre_acts)

    def decode(self, top_acts: mx.array, top_indices: mx.array,
               csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """sum_j top_acts[:, j] * W_dec[top_indices[:, j]] + b_dec, for indices from any source: they are checked
        to lie in [0, M) (MLX would read out of bounds; one reduction and one host read, skipped inside
        `mx.compile`; the forward pass decodes its own indices unchecked)."""
        if inputs.check_codes(_info(top_acts), _info(top_indices), _dtype_name(self.dtype)):
            wide = top_indices.astype(mx.int64)
            bounds = _read(mx.stack([wide.min(), wide.max()]))
            if bounds is not None:
                inputs.check_index_range(*bounds, self.num_latents)
        return self._decode(top_acts, top_indices, csr)

    def _decode(self, top_acts: mx.array, top_indices: mx.array,
                csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
        if self.W_dec is None:
            raise ValueError("this coder was loaded with decoder=False: it cannot decode")
        return sparse_decode(top_acts, top_indices, self.W_dec, csr=csr) + self.b_dec

    def _latent_csr(self, indices: mx.array) -> tuple[mx.array, mx.array] | None:
        """The latent-sorted layout of a selection, built once for the encoder and decoder weight gradients
        (both scatter by the same indices), when the Metal kernels run; the reference path needs none."""
        return sparse_rows.latent_csr(indices, self.num_latents) if sparse_rows.use_metal() else None

    def __call__(self, x: mx.array, y: mx.array | None = None, *,
                 dead_mask: mx.array | None = None) -> ForwardOutput:
        inputs.check_forward(_info(x), None if y is None else _info(y), None if dead_mask is None else _info(dead_mask),
                             self.d_in, self.d_out, self.num_latents, _dtype_name(self.dtype))
        y = x if y is None else y
        y32 = y.astype(mx.float32)
        total_variance = mx.square(y32 - y32.mean(axis=0)).sum()
        total_variance_value = _read(total_variance)  # None: inside mx.compile
        if total_variance_value is not None:
            inputs.check_total_variance(total_variance_value, y.shape[0])
        x_in, bias = self.sparse_encoder_inputs(x)
        num_dead = None if dead_mask is None else _count_dead(dead_mask)  # None: inside mx.compile
        need_aux = dead_mask is not None and (num_dead is None or num_dead > 0)
        fixed_aux = need_aux and num_dead is None

        dead = _dead_latents(dead_mask) if need_aux and not fixed_aux else None

        # per selection and row chunk, (indices, their values); for eager AuxK the pre-activations at the dead
        # latents: only these live on, never a dense [N, M] array
        top, aux, multi = [], [], []
        for pre_acts in self._pre_acts_chunks(x_in):
            chosen = [(top, self.select_indices(pre_acts))]
            if fixed_aux:
                chosen.append((aux, self._fixed_aux_indices(pre_acts, dead_mask)))
            elif need_aux:
                aux.append(pre_acts[:, dead])
            if self.cfg.multi_topk:
                chosen.append((multi, self.multi_topk_indices(pre_acts)))
            for parts, indices in chosen:
                parts.append((indices, self.gather_chosen(pre_acts, indices)))
        top_indices, top_values = _cat_pairs(top)

        skip = x.astype(self.W_skip.dtype) @ self.W_skip.T if self.W_skip is not None else 0
        csr = self._latent_csr(top_indices)
        top_acts = self.acts_at(x_in, bias, top_indices, top_values, csr)
        sae_out = self._decode(top_acts, top_indices, csr) + skip
        e = y - sae_out
        fvu = mx.square(e.astype(mx.float32)).sum() / total_variance

        auxk_loss = multi_topk_fvu = mx.zeros((), dtype=mx.float32)
        if fixed_aux:  # num_dead as an array; slots that landed on live latents count for nothing
            aux_indices, aux_values = _cat_pairs(aux)
            aux_csr = self._latent_csr(aux_indices)
            aux_acts = mx.where(dead_mask[aux_indices],
                                self._aux_acts(x_in, bias, aux_indices, aux_values, aux_csr), 0)
            e_hat = sparse_decode(aux_acts, aux_indices, self.W_dec, csr=aux_csr)
            auxk_loss = self.auxk_loss(e, e_hat, dead_mask.sum(), total_variance)
        elif need_aux:
            e_hat = self.aux_reconstruction(x_in, bias, _cat(aux), dead)
            auxk_loss = self.auxk_loss(e, e_hat, num_dead, total_variance)
        if self.cfg.multi_topk:
            multi_indices, multi_values = _cat_pairs(multi)
            multi_csr = self._latent_csr(multi_indices)
            multi_acts = self.acts_at(x_in, bias, multi_indices, multi_values, multi_csr)
            multi_topk_fvu = self.multi_topk_fvu(y, multi_acts, multi_indices, skip, total_variance, multi_csr)
        return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)

    def aux_reconstruction(self, x_in: mx.array, bias: mx.array, dead_pre: mx.array, dead: mx.array) -> mx.array:
        """e_hat = sum over each token's AuxK latents of act * W_dec row (no b_dec), differentiable w.r.t. the
        encoder and decoder. `dead_pre` holds the pre-activations at the dead latents `dead`. Dense matmuls over
        the dead rows when few latents are dead, else the sparse kernels."""
        slots = self._aux_slots(dead_pre)
        chosen = self.gather_chosen(dead_pre, slots)
        if (dead.size <= self.aux_dense_max_ratio * slots.shape[-1]
                and dead.size <= self.aux_dense_max_fraction * self._num_latents):
            dense_acts = mx.put_along_axis(mx.zeros_like(dead_pre), slots, chosen, axis=-1)
            return subset_decode(dense_acts, dead, x_in, self.encoder.weight, bias, self.W_dec, self.auxk_raise_only)
        indices = dead[slots]
        csr = self._latent_csr(indices)
        return sparse_decode(self._aux_acts(x_in, bias, indices, chosen, csr), indices, self.W_dec, csr=csr)

    def _aux_acts(self, x_in: mx.array, bias: mx.array, indices: mx.array, chosen: mx.array, csr) -> mx.array:
        acts = self.acts_at(x_in, bias, indices, chosen, csr)
        return raise_only_grad(acts) if self.auxk_raise_only else acts

    def auxk_loss(self, e: mx.array, e_hat: mx.array, num_dead: int | mx.array, total_variance: mx.array) -> mx.array:
        """Bias-correct AuxK: dead latents reconstruct the residual e, which already holds b_dec and the skip term,
        so e_hat has neither; e is a fixed target; the chosen latents' pre-activations train the encoder.

        `num_dead` is a Python int (eager) or a scalar array (the fixed-size AuxK inside `mx.compile`, whose slots
        on live latents arrive with zero activations)."""
        half = self.d_out // 2
        if isinstance(num_dead, mx.array):
            scale = mx.minimum(num_dead.astype(mx.float32) / half, 1.0)
        else:
            scale = min(num_dead / half, 1.0)
        return scale * mx.square(e_hat.astype(mx.float32) - mx.stop_gradient(e).astype(mx.float32)).sum() \
            / total_variance

    def multi_topk_fvu(self, y: mx.array, multi_acts: mx.array, multi_indices: mx.array, skip,
                       total_variance: mx.array, csr: tuple[mx.array, mx.array] | None = None) -> mx.array:
        multi_out = self._decode(multi_acts, multi_indices, csr) + skip
        return mx.square((multi_out - y).astype(mx.float32)).sum() / total_variance

    forward = __call__

    # ---- decoder-norm utilities ----

    def set_decoder_norm_to_unit_norm(self):
        assert self.W_dec is not None, "this coder has no decoder"
        eps = mx.finfo(self.W_dec.dtype).eps
        norm = mx.linalg.norm(self.W_dec, axis=1, keepdims=True)
        self.W_dec = mx.stop_gradient(self.W_dec / (norm + eps)).astype(self.W_dec.dtype)

    def remove_gradient_parallel_to_decoder_directions(self, grads: dict) -> dict:
        """Remove from each W_dec row's gradient its component along that row. The same call in both backends:
        `grads = sae.remove_gradient_parallel_to_decoder_directions(grads)` with `grads` the gradient tree of this
        module (as `nn.value_and_grad` gives it) or a flat dict by parameter name. MLX arrays are immutable, so this
        returns a new dict (shallow copy) with a new W_dec gradient (torch edits its tensor in place)."""
        assert self.W_dec is not None and grads.get("W_dec") is not None, "no decoder gradient to project"
        w, g = self.W_dec, grads["W_dec"]
        parallel = (g * w).sum(axis=1, keepdims=True) / mx.maximum(mx.square(w).sum(axis=1, keepdims=True), 1e-30)
        return {**grads, "W_dec": (g - parallel * w).astype(g.dtype)}

    # ---- checkpoints (sparsify's layout: cfg.json + sae.safetensors) ----

    def save_to_disk(self, path: str | Path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = dict(tree_flatten(self.parameters()))
        mx.eval(state)
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            # mx.save_safetensors appends ".safetensors" to a name without it: write there, then move onto tmp
            staged = tmp.with_name(tmp.name + ".safetensors")
            try:
                mx.save_safetensors(str(staged), state)
                os.replace(staged, tmp)
            finally:
                staged.unlink(missing_ok=True)
        write_config(path, self.cfg, self.d_in, self.d_out)

    @classmethod
    def load_from_disk(cls, path: str | Path, *, decoder: bool = True, dtype: mx.Dtype | None = None) -> "SparseCoder":
        """Load a checkpoint folder; tensors keep the file's dtype unless `dtype` is given (float64 files load as
        float32, which Metal supports). With `decoder=False`
        `W_dec` is not loaded (`b_dec` is: an autoencoder's encoder input is x - b_dec)."""
        path = Path(path)
        cfg, d_in, d_out, header = validate_checkpoint(path)
        file_dtype = _MLX_DTYPES[weights_dtype(header)]
        if any(info["dtype"] == "F64" for info in header.values()):  # MLX's safetensors reader has no F64
            state = {name: mx.array(value) for name, value in load_weights_cast(path, header).items()}
        else:
            state = {name: tensor.astype(file_dtype) for name, tensor in mx.load(str(path / WEIGHTS_FILE)).items()}
        for name, tensor in state.items():
            check_finite(path, name, bool(mx.isfinite(tensor).all()))
        if not decoder:
            state = {n: t for n, t in state.items() if n != "W_dec"}
        # MLX is lazy: the random init below is never computed, the loaded arrays replace it
        sae = cls(d_in, cfg, dtype=file_dtype, decoder=decoder, d_out=d_out)
        sae.load_weights(list(state.items()), strict=True)
        if dtype is not None:
            sae.set_dtype(dtype)
        return sae

    @classmethod
    def load_many(cls, name_or_path: str | Path, local: bool | None = None, layers: list[str] | None = None, *,
                  decoder: bool = True, pattern: str | None = None, dtype: mx.Dtype | None = None,
                  revision: str | None = None) -> dict[str, "SparseCoder"]:
        """sparsify's load_many: every hookpoint folder of a run folder or a Hugging Face Hub repo (natural order),
        optionally only `layers` or those matching `pattern` (only those are downloaded). `local=None` reads an
        existing folder, else a hub name; `revision` picks a hub branch, tag or commit."""
        folders = coder_folders(name_or_path, layers, pattern=pattern, revision=revision, local=local)
        return {name: cls.load_from_disk(folder, decoder=decoder, dtype=dtype) for name, folder in folders.items()}

    @classmethod
    def load_from_hub(cls, name: str, hookpoint: str | None = None, *, decoder: bool = True,
                      dtype: mx.Dtype | None = None, revision: str | None = None) -> "SparseCoder":
        """sparsify's load_from_hub: the coder in folder `hookpoint` of hub repo `name` (only that folder is
        downloaded; None: a repo holding one coder at its root), through huggingface_hub's cache and settings."""
        return cls.load_from_disk(hub_coder_folder(name, hookpoint, revision=revision), decoder=decoder, dtype=dtype)


def _dead_latents(dead_mask: mx.array) -> mx.array:
    """Indices of the dead latents (int32; a host sync, so eager only)."""
    return mx.array(np.flatnonzero(np.array(dead_mask)).astype(np.int32))


def _cat_pairs(parts: list[tuple[mx.array, mx.array]]) -> tuple[mx.array, mx.array]:
    return _cat([indices for indices, _ in parts]), _cat([values for _, values in parts])


def _cat(parts: list[mx.array]) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)

