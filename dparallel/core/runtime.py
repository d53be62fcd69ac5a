"""Where and in what precision a process runs: torchrun's rank and world, the device, the weights' dtype."""

from __future__ import annotations

import os


def rank_world() -> tuple[int, int]:
    """(global rank, world size) from torchrun's environment, or (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_rank_zero() -> bool:
    return rank_world()[0] == 0


def pick_device(device: str = "auto") -> str:
    """``auto``: cuda when a GPU is visible, else cpu; anything else is returned unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def weights_dtype(dtype: str, device: str, frozen: bool = True) -> str:
    """The dtype ``auto`` means on ``device``: bfloat16 on a GPU for weights that are frozen (inference, a LoRA
    base, a component's base); float32 for trained weights and on the CPU. Anything else is returned unchanged."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if frozen and pick_device(device).startswith("cuda") else "float32"
