"""What every benchmark records about where it ran, so figures from different machines are never mixed up."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from taskarith.io import write_json
from taskarith.outputs import output_file


def environment(device: torch.device) -> dict[str, str | int]:
    return {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}


def machine() -> str:
    text = f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def write_results(path: Path, fmt: str, what: str, settings: dict[str, Any], **parts: Any) -> None:
    """A benchmark's result file: format, what it measures, where and when it ran, its settings and parts,
    written through taskarith's output helper (the file is the benchmark's own, so it is replaced)."""
    document = {
        "format": fmt,
        "what": what,
        "machine": machine(),
        "environment": environment(torch.device("cpu")),
        "settings": settings,
        **parts,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with output_file(path, (), overwrite=True, format=fmt) as tmp:
        write_json(tmp, document)
    print(f"wrote {path}")
