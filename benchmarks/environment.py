"""What every benchmark records about where it ran, so figures from different machines are never mixed up."""

from __future__ import annotations

import platform

import torch


def environment(device: torch.device) -> dict[str, str | int]:
    return {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}


def machine() -> str:
    text = f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text
