"""Per-tensor static FP8 KV scales: one K and one V scale per layer, calibrated on a text.

The default FP8 cache scales every (token, KV head) row by its own amax (dynamic scales, 4 bytes per row).
Static scales instead fix one scale per layer for K and one for V from the largest |K| (after RoPE) and
|V| seen on a calibration text; values beyond it saturate at run time. They save the per-row scale bytes
and let a kernel skip the amax reduction, at some cost in accuracy (docs/accuracy.md measures it).

The calibration stores amax, not scales, so one file serves both FP8 formats (scale = amax / FP8_MAX).
It is saved as JSON beside the model (SCALES_FILE in the model's folder) and loaded from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from xpu_coopt.ops import fp8

if TYPE_CHECKING:
    from xpu_coopt.model.optimized import OptimizedModel

SCALES_FILE = "xpu_coopt_kv_scales.json"


@dataclass(frozen=True)
class KVScales:
    key_amax: tuple[float, ...]  # per layer: the largest |K| after RoPE on the calibration text
    value_amax: tuple[float, ...]  # per layer: the largest |V|
    calibration: dict[str, Any] = field(default_factory=dict)  # what it was measured on

    def __post_init__(self) -> None:
        if len(self.key_amax) != len(self.value_amax) or not self.key_amax:
            raise ValueError("KVScales needs one key and one value amax per layer, for at least one layer")
        if not all(value >= 0 and value != float("inf") for value in (*self.key_amax, *self.value_amax)):
            raise ValueError("KVScales amax values must be finite and non-negative")

    @property
    def num_layers(self) -> int:
        return len(self.key_amax)

    def tensors(self, kv_dtype: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[layers] K and V scales for an FP8 format, in fp8.SCALE_DTYPE: amax / FP8_MAX (at least
        fp8.MIN_SCALE), rounded up to a bfloat16 value so the calibrated amax still fits the range."""
        if not fp8.is_fp8(kv_dtype):
            raise ValueError(f"static KV scales apply to FP8 caches, not kv_dtype={kv_dtype!r}")
        limit = fp8.FP8_MAX[kv_dtype]
        return tuple(
            fp8.round_up_to_bfloat16(
                (torch.tensor(amax, dtype=torch.float32) / limit).clamp_min(fp8.MIN_SCALE)
            ).to(device=device, dtype=fp8.SCALE_DTYPE)
            for amax in (self.key_amax, self.value_amax)
        )

    def save(self, path: str | Path) -> Path:
        """Writes the scales to `path`: a folder (the model's: SCALES_FILE inside it) or a .json file."""
        target = Path(path)
        if target.is_dir():
            target = target / SCALES_FILE
        target.write_text(json.dumps({"format": "xpu_coopt.kv_scales/1", **self._fields()}, indent=2) + "\n")
        return target

    def _fields(self) -> dict[str, Any]:
        return {
            "key_amax": list(self.key_amax),
            "value_amax": list(self.value_amax),
            "calibration": self.calibration,
        }

    @classmethod
    def load(cls, path: str | Path) -> KVScales:
        """Reads scales saved by save(): from a model folder holding SCALES_FILE, or from a .json file."""
        source = Path(path)
        if source.is_dir():
            source = source / SCALES_FILE
        if not source.is_file():
            raise FileNotFoundError(
                f"no KV scales at {source}: calibrate them first (xpu-coopt calibrate-kv or calibrate_kv_scales)"
            )
        data = json.loads(source.read_text())
        if data.get("format") != "xpu_coopt.kv_scales/1":
            raise ValueError(f"{source} is not an xpu_coopt KV scales file")
        return cls(tuple(data["key_amax"]), tuple(data["value_amax"]), data.get("calibration", {}))


@torch.inference_mode()
def calibrate_kv_scales(
    model: OptimizedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    description: str = "",
    progress: bool = True,
) -> KVScales:
    """Measures each layer's largest |K| (after RoPE) and |V| over `windows` [N, P] of token ids, with a
    progress bar over its batches of windows (progress=False: none).

    Runs the prefill into a 16-bit cache, whatever the model's kv_dtype, and reads the K/V rows exactly
    as they would be written to an FP8 cache: every column of the windows, also those a sliding window on
    every layer would not keep.
    """
    if windows.dim() != 2 or windows.numel() == 0:
        raise ValueError(f"calibration takes token windows [N, P] with N, P >= 1, got {tuple(windows.shape)}")
    layers = model.spec.num_layers
    key_amax = torch.zeros(layers, dtype=torch.float32)
    value_amax = torch.zeros(layers, dtype=torch.float32)
    batches = windows.to(model.device).split(batch_size)
    for batch in tqdm(batches, desc="calibrating KV scales", unit="batch", disable=not progress, leave=False):
        starts = torch.zeros(batch.shape[0], dtype=torch.int32, device=model.device)
        cache = model.decoder.new_cache(starts, batch.shape[1], 1, 0, "auto", keep_whole_prompt=True)
        positions = torch.arange(batch.shape[1], device=model.device).expand_as(batch)
        model.decoder.forward(batch.long(), positions, cache, last_only=True)
        # Unwritten capacity columns hold zeros, which never raise an amax.
        layers = cache.prompt.storage.layers
        key_amax = torch.maximum(
            key_amax, torch.stack([layer.k.abs().amax() for layer in layers]).float().cpu()
        )
        value_amax = torch.maximum(
            value_amax, torch.stack([layer.v.abs().amax() for layer in layers]).float().cpu()
        )
    calibration = {"description": description, "windows": windows.shape[0], "tokens": windows.numel()}
    return KVScales(tuple(key_amax.tolist()), tuple(value_amax.tolist()), calibration)
