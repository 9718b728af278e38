"""Random weights for checkpoints in the ADP-C reference implementation's layout, by name and seed.

Shared by ``tests/reference/make_vectors.py`` (which runs the reference implementation's model on
these weights and stores its outputs) and ``tests/test_reference_outputs.py`` (which loads the same
weights into anytimeify's model through ``load_reference_checkpoint`` and compares). Every tensor
depends only on the seed, its name and its shape, so both sides get the same weights whatever
order their models list their parameters in.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

__all__ = ["reference_tensor", "reference_state", "square_distances", "LAMBDA_RANGE"]

#: interpolation lambdas are drawn uniformly from this range (trained ADP-C models learn 0.3-3)
LAMBDA_RANGE = (0.3, 3.0)


def square_distances() -> torch.Tensor:
    """The reference's fixed 7x7 table of squared distances, centre set to 1e5."""
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    table = offsets[:, None] ** 2 + offsets[None, :] ** 2
    table[3, 3] = 100000.0
    return table


def reference_tensor(name: str, shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    """The tensor called ``name`` (a reference-layout key) of ``shape`` for ``seed``.

    Conv weights: He-normal. BN: weight in [0.5, 1], bias and running mean N(0, 0.1^2), running variance in [0.5, 1.5]. Conv biases
    N(0, 0.1^2). ``Lambda`` uniform in :data:`LAMBDA_RANGE`.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 62))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    if leaf == "square_dis":
        return square_distances()
    if leaf == "Lambda":
        low, high = LAMBDA_RANGE
        return (low + (high - low) * torch.rand(shape, generator=generator)).to(torch.float32)
    if leaf == "running_mean":
        return 0.1 * torch.randn(shape, generator=generator)
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=generator)
    if leaf == "weight" and len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
    if leaf == "weight" and len(shape) == 1:
        return 0.5 + 0.5 * torch.rand(shape, generator=generator)
    if leaf == "bias":
        return 0.1 * torch.randn(shape, generator=generator)
    raise ValueError(f"no rule for a reference tensor named {name!r} of shape {shape}")


def reference_state(shapes: Iterable[Tuple[str, Tuple[int, ...]]], seed: int,
                    gains: Optional[Mapping[str, float]] = None, bn_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """A state dict of :func:`reference_tensor` for every ``(name, shape)``, the tensors named in
    ``gains`` multiplied by their gain (the vectors' script scales each exit's classifier so that
    all exits give logits of a similar spread, and records the gains), and every BN weight by
    ``bn_scale`` (deep networks whose activations would otherwise grow without bound)."""
    gains = gains or {}
    state = {name: reference_tensor(name, tuple(shape), seed) for name, shape in shapes}
    if bn_scale != 1.0:
        for name, value in state.items():
            if name.endswith(".weight") and value.dim() == 1:
                state[name] = value * bn_scale
    for name, gain in gains.items():
        state[name] = state[name] * gain
    return state
