"""How a backbone wants its input: size, interpolation and normalisation.

Shared by the tiler (which resizes and normalises patches in C++) and the backbones (which record it next
to their exported ONNX file), so that the index and the query always see identically prepared pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

INTERPOLATIONS = ("bilinear", "bicubic")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Patches and queries are resized (squashed, no crop) to ``input_size`` x ``input_size`` with
    ``interpolation`` (antialiased when shrinking, as Pillow does), scaled to [0, 1], then normalised
    per channel with ``mean`` and ``std``."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if int(self.input_size) < 1:
            raise ValueError(f"input_size must be >= 1, got {self.input_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have 3 values (RGB)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
        )
