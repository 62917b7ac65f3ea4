"""Numerics telemetry of the quantized GEMMs: per layer and tensor role, how much a format loses.

For every operand a quantized layer quantizes (roles below), on the steps that are measured:
- ``underflow``: the fraction of its non-zero elements that quantize to zero (flushed; the Nemotron 3
  team found Mamba out_proj flushing up to 40% under NVFP4 this way);
- ``saturated``: the fraction of its elements clipped by the format's clamp, |x·m| > 6 for NVFP4
  (only possible when the E4M3 block scale rounded down) or |x/2^E| > 448 for MXFP8 (never with TE's
  "rceil" scales), by more than float32 rounding (2^-20 relative). Elements on ±6 are
  representable, not saturated;
- ``rel_error``: ‖x − x̂‖ / ‖x‖ (0 for an all-zero tensor);
- ``amax``: the tensor's global amax (after the Hadamard transform where one applies).
Everything is computed in the quantizer's own domain (the RHT-transformed, token-padded operand for
wgrad) and accumulated on the device; ``end_step`` moves it to the host with one synchronisation.

Roles (gemm, tensor), following the recipe table (docs/precision.md): ("fprop", "x"), ("fprop", "w"),
("dgrad", "dy"), ("dgrad", "w") — only when W is quantized separately for dgrad (1D, i.e.
``disable_2d_quantization``, and MXFP8); with 2D tiles it is the fprop copy —, ("wgrad", "dy"),
("wgrad", "x").

The same object also watches every backward, measured step or not, for a non-zero gradient that
quantizes to all zeros (a quantizer bug: one TE release did this with stochastic rounding on one
GPU family). ``end_step`` warns with the layer's name (``QuantizationWarning``), or raises with
``strict_zero_gradient``.

Trainer protocol (one object per process, handed to ``apply_precision``)::

    tel = Telemetry.from_config(cfg.precision)
    tel.start_step(step)            # before the step's forward/backward (step counts from 1)
    rows = tel.end_step()           # after backward: [] or one dict per (layer, gemm, tensor)
    ...
    tel.summary()                   # at the end: per (layer, gemm, tensor) means and maxima
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch
from hymoe.precision import mxfp8, nvfp4

SATURATION_SLACK = 1 + 2.0**-20
# Accumulator slots (one float64 vector per (layer, gemm, tensor) and step).
_FLUSHED, _NONZERO, _SATURATED, _NUMEL, _ERR_SQ, _REF_SQ, _AMAX = range(7)
_SLOTS = 7


class QuantizationWarning(RuntimeWarning):
    """A quantized GEMM saw something that is a bug, not a result (e.g. a zeroed gradient)."""


def tensor_stats(src: torch.Tensor, q) -> torch.Tensor:
    """Statistics of one quantization, as a float64 vector on src's device (no host sync).

    src: the tensor handed to the quantizer (before any RHT; padding included or not — zeros
    count only towards ``numel``). q: the ``NVFP4Tensor`` or ``MXFP8Tensor`` made from it.
    Returns [flushed, nonzero, saturated, numel, err², ref², amax] (see the module docstring).
    """
    x = src.detach()
    if isinstance(q, nvfp4.NVFP4Tensor) and q.rht:
        x = nvfp4.rht_transform(x)
    x = x.to(torch.float32)
    xhat = q.dequantize(torch.float32)
    nonzero = x != 0
    flushed = nonzero & (xhat == 0)
    scaled = _scaled_magnitudes(x, q)
    # Beyond the clamp by more than float32 noise: x·m carries ~3 ulps of rounding, so a block's
    # amax element can come out a hair above 6 although its scale was exact.
    limit = (nvfp4.FP4_MAX if isinstance(q, nvfp4.NVFP4Tensor) else mxfp8.E4M3_MAX) * SATURATION_SLACK
    err = (x - xhat).double()
    return torch.stack(
        [
            flushed.sum().double(),
            nonzero.sum().double(),
            (scaled > limit).sum().double(),
            torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
            err.square().sum(),
            x.double().square().sum(),
            x.abs().amax().double() if x.numel() else x.new_zeros((), dtype=torch.float64),
        ]
    )


def _scaled_magnitudes(x: torch.Tensor, q) -> torch.Tensor:
    """|x| in the element format's units before the clamp: |x·m| (NVFP4), |x|/2^E (MXFP8)."""
    block = nvfp4.BLOCK if isinstance(q, nvfp4.NVFP4Tensor) else mxfp8.BLOCK
    k = x.shape[-1]
    xp = torch.nn.functional.pad(x, (0, -k % block))
    if isinstance(q, nvfp4.NVFP4Tensor):
        mult = nvfp4.block_multiplier(q.block_scales(), q.decode_scale)
        if q.two_d:
            mult = mult[: x.shape[0]]
        scaled = xp.unflatten(-1, (-1, block)) * mult.unsqueeze(-1)
    else:
        scaled = xp.unflatten(-1, (-1, block)) / q.scale_float().unsqueeze(-1)
    return scaled.flatten(-2)[..., :k].abs()


def _row(key, acc: list[float]) -> dict:
    layer, fmt, gemm, tensor = key
    return {
        "layer": layer,
        "format": fmt,
        "gemm": gemm,
        "tensor": tensor,
        "underflow": acc[_FLUSHED] / acc[_NONZERO] if acc[_NONZERO] else 0.0,
        "saturated": acc[_SATURATED] / acc[_NUMEL] if acc[_NUMEL] else 0.0,
        "rel_error": math.sqrt(acc[_ERR_SQ] / acc[_REF_SQ]) if acc[_REF_SQ] else 0.0,
        "amax": acc[_AMAX],
    }


class Telemetry:
    """Collects quantization statistics every ``interval`` steps (0: never) and watches for zeroed
    gradients on every step. See the module docstring for the protocol.

    Args:
        interval: measure steps whose number is a multiple of this (0 turns measuring off; the
            zero-gradient watch stays on).
        strict_zero_gradient: raise (RuntimeError) instead of warning on a zeroed gradient.
    """

    def __init__(self, interval: int = 0, *, strict_zero_gradient: bool = False):
        if interval < 0:
            raise ValueError(f"telemetry interval must be >= 0, got {interval}")
        self.interval = int(interval)
        self.strict_zero_gradient = strict_zero_gradient
        self.active = False
        self.step: int | None = None
        self._acc: dict[tuple, torch.Tensor] = {}
        self._zero_grad: dict[tuple[str, str], torch.Tensor] = {}
        self._history: dict[tuple, list[dict]] = defaultdict(list)

    @classmethod
    def from_config(cls, cfg) -> Telemetry:
        """From a PrecisionConfig: ``telemetry_interval`` and ``strict_zero_gradient``."""
        return cls(cfg.telemetry_interval, strict_zero_gradient=cfg.strict_zero_gradient)

    # -- the trainer's side ----------------------------------------------------------------------
    def start_step(self, step: int) -> bool:
        """Begin step ``step`` (counted from 1); returns whether it is measured."""
        self.step = step
        self.active = self.interval > 0 and step % self.interval == 0
        self._acc.clear()
        return self.active

    def end_step(self) -> list[dict]:
        """Finish the step: report zeroed gradients (warning or error naming the layer), and return
        this step's rows — one dict per (layer, gemm, tensor) with step, layer, format, gemm,
        tensor, underflow, saturated, rel_error, amax — or [] if the step was not measured."""
        self._report_zero_gradients()
        rows = []
        if self._acc:
            keys = list(self._acc)
            values = torch.stack([self._acc[k] for k in keys]).cpu().tolist()  # one sync
            for key, acc in zip(keys, values):
                row = {"step": self.step, **_row(key, acc)}
                rows.append(row)
                self._history[key].append(row)
        self._acc.clear()
        self.active = False
        return rows

    def summary(self) -> list[dict]:
        """Over all measured steps, per (layer, gemm, tensor): steps measured, mean and max of
        underflow, mean and max of saturated, mean rel_error, max amax; sorted by layer."""
        out = []
        for (layer, fmt, gemm, tensor), rows in sorted(self._history.items()):
            n = len(rows)
            out.append(
                {
                    "layer": layer,
                    "format": fmt,
                    "gemm": gemm,
                    "tensor": tensor,
                    "steps": n,
                    "underflow_mean": sum(r["underflow"] for r in rows) / n,
                    "underflow_max": max(r["underflow"] for r in rows),
                    "saturated_mean": sum(r["saturated"] for r in rows) / n,
                    "saturated_max": max(r["saturated"] for r in rows),
                    "rel_error_mean": sum(r["rel_error"] for r in rows) / n,
                    "amax_max": max(r["amax"] for r in rows),
                }
            )
        return out

    def format_summary(self, top: int = 10) -> str:
        """A console table of the ``top`` operands by mean underflow (the first thing to look at)."""
        rows = sorted(self.summary(), key=lambda r: -r["underflow_mean"])[:top]
        if not rows:
            return "precision telemetry: no measured steps"
        width = max(len(r["layer"]) for r in rows)
        lines = [
            f"precision telemetry over {rows[0]['steps']} measured step(s), top {len(rows)} by underflow",
            f"{'layer':{width}s}  format  gemm   tensor  underflow  saturated  rel_err  amax",
        ]
        for r in rows:
            lines.append(
                f"{r['layer']:{width}s}  {r['format']:6s}  {r['gemm']:5s}  {r['tensor']:6s}  "
                f"{r['underflow_mean']:9.2%}  {r['saturated_mean']:9.3%}  "
                f"{r['rel_error_mean']:7.3f}  {r['amax_max']:.3g}"
            )
        return "\n".join(lines)

    def reset(self) -> None:
        """Forget everything collected (history, the current step, pending zero-gradient flags)."""
        self._acc.clear()
        self._zero_grad.clear()
        self._history.clear()
        self.active = False
        self.step = None

    # -- the quantized GEMMs' side ---------------------------------------------------------------
    def observe(self, layer: str, fmt: str, gemm: str, tensor: str, src: torch.Tensor, q) -> None:
        """Accumulate the statistics of one quantization (call only when ``active``)."""
        stats = tensor_stats(src, q)
        key = (layer, fmt, gemm, tensor)
        prev = self._acc.get(key)
        if prev is None:
            self._acc[key] = stats
        else:
            amax = torch.maximum(prev[_AMAX], stats[_AMAX])
            self._acc[key] = torch.cat([(prev + stats)[:_AMAX], amax.view(1)])

    def watch_gradient(self, layer: str, where: str, src: torch.Tensor, q) -> None:
        """Record, on the device, whether a non-zero gradient ``src`` quantized (``q``, an NVFP4 or
        MXFP8 tensor) to all zeros."""
        if not src.numel():  # an expert that received no tokens
            return
        bad = (src.abs().amax() > 0) & ~q.any_nonzero()
        key = (layer, where)
        prev = self._zero_grad.get(key)
        self._zero_grad[key] = bad if prev is None else prev | bad

    def _report_zero_gradients(self) -> None:
        if not self._zero_grad:
            return
        keys = list(self._zero_grad)
        flags = torch.stack([self._zero_grad[k] for k in keys]).cpu().tolist()
        self._zero_grad.clear()
        bad = [f"{layer} ({where})" for (layer, where), flag in zip(keys, flags) if flag]
        if not bad:
            return
        msg = (
            f"step {self.step}: a non-zero gradient quantized to all zeros in "
            + ", ".join(bad)
            + " (a quantizer bug, not a result; see docs/precision.md)"
        )
        if self.strict_zero_gradient:
            raise RuntimeError(msg)
        warnings.warn(msg, QuantizationWarning, stacklevel=2)
