"""Fine-tuning the encoder under a frozen zero-shot head; the result is a task vector and a run record.

The loop reads top to bottom: batch, forward, loss, backward, clip, step, schedule, log, checkpoint.
Two choices keep runs reproducible and resumable. Dropout is off (the encoder stays in eval mode, as
the CLIP encoders of the task-arithmetic papers have no dropout), so the loss is a deterministic
function of the weights. The data order is a pure function of (seed, step), so a checkpoint needs only
weights, optimizer moments and the step number to continue exactly where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm.auto import tqdm

from taskarith import __version__
from taskarith.data import Task, load_task
from taskarith.display import quoted, shown
from taskarith.distributed import Cluster, cluster_from_environment
from taskarith.errors import TaskArithError
from taskarith.evaluate import accuracy
from taskarith.io import load_tensors, read_json, save_tensors, state_hash, write_json
from taskarith.linearize import Linearized, hidden_and_tangent
from taskarith.lora_training import LinearLora, LoraModel
from taskarith.models import DEFAULT_MODEL, Pretrained, ZeroShotClassifier
from taskarith.models.zero_shot import mean_pool
from taskarith.outputs import RunLock, check_output, output_file
from taskarith.regularizers import (
    PENALTY_FORMS,
    PUBLISHED_STRENGTH,
    REGULARIZERS,
    KFACPenalty,
    OrthoReg,
    Penalty,
    TauJp,
    pooled_tangents,
)
from taskarith.sampling import SAMPLINGS, batch_indices, derived_seed, regularization_draw, warmup_cosine
from taskarith.training import DECAY_TARGETS, decay_theta_, task_vector, trainable_parameters
from taskarith.training_log import LOG_FORMAT, TrainingLog, check_log_outputs
from taskarith.vectors import FORMAT as VECTOR_FORMAT
from taskarith.vectors import TaskVector

TASK_VECTOR_FILE = "task_vector.safetensors"
RECORD_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "taskarith.checkpoint/1"
RECORD_FORMAT = "taskarith.run_record/1"


REG_SAMPLINGS = SAMPLINGS


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines the task vector; stored in the run record and the vector's metadata."""

    task: str
    model: str = DEFAULT_MODEL
    mode: str = "standard"
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    # Train with the model's training augmentation where it has one (CLIP: open_clip's train_preprocess,
    # a RandomResizedCrop, as the papers' code trains); the embedded models have none.
    augment: bool = True
    seed: int = 0
    max_length: int = 64
    checkpoint_every: int = 50
    # Linear mode: what AdamW's decoupled weight decay pulls towards zero. "theta" (the tangent and tau-Jp
    # code, which train a copy of theta = theta0 + delta: every linear vector then carries a small shared
    # -theta0 component) or "delta" (TAK). Standard mode trains theta itself and always decays it.
    weight_decay_on: str = "theta"
    warmup_steps: int | None = None  # overrides warmup_fraction (the papers: 500 steps)
    # Interference regularization: lambda * penalty, see taskarith.regularizers.
    regularizer: str | None = None
    reg_strength: float | None = None  # None: the published strength of the regularizer (tau-Jp 0.1, K-FAC 500)
    reg_tasks: tuple[str, ...] = ()  # tasks whose unlabelled inputs tau-Jp uses (only already-seen ones, incrementally)
    reg_factors: tuple[str, ...] = ()  # K-FAC factor files (dataless: no other task's data needed)
    # How tau-Jp draws the other tasks' inputs: "strict" (every step a batch of reg_batch_size from every
    # other task, the published default), "cyclical" (one other task per step, task = step mod T, the
    # published efficient variant) or "pooled" (reg_batch_size inputs drawn i.i.d. from the union of the
    # other tasks: taskarith before the published form).
    reg_sampling: str = "strict"
    reg_batch_size: int = 16  # per other task (strict, cyclical) or in all (pooled); the papers: 16
    reg_every: int = 1
    # TAK's scalers of the K-FAC penalty: x10 on LayerNorm / class-token blocks, x0.1 on the final projection.
    kfac_norm_scale: float = 10.0
    kfac_projection_scale: float = 0.1
    penalty_form: str = ""  # filled in: the penalty's versioned form (regularizers.PENALTY_FORMS)
    # Which parameters train: None (all), a preset ("attention": the attention projections' weights) or a
    # regular expression searched in each parameter name (taskarith.training.trainable_parameters).
    trainable: str | None = None
    # LoRA modes (lora, linear_lora): the factors' rank r and alpha (dW = alpha / r * B @ A, as PEFT scales).
    # The targets are the weights ``trainable`` names, the attention projections when it is unset.
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        if isinstance(self.lora_alpha, int) and not isinstance(self.lora_alpha, bool):
            # 16 and 16.0 must give one run key.
            object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        object.__setattr__(self, "reg_tasks", tuple(self.reg_tasks))
        object.__setattr__(self, "reg_factors", tuple(str(f) for f in self.reg_factors))
        regularized = self.regularizer is not None
        name = self.regularizer or ""
        if self.reg_strength is None:
            strength = PUBLISHED_STRENGTH.get(name, math.nan) if regularized else 0.0
            if math.isnan(strength):
                raise TaskArithError(
                    f"fine-tuning option reg_strength must be given for regularizer "
                    f"{self.regularizer!r} (it has no published default)"
                )
            object.__setattr__(self, "reg_strength", float(strength))
        expected_form = PENALTY_FORMS.get(name, "") if regularized else ""
        if self.penalty_form not in ("", expected_form):
            raise TaskArithError(
                f"fine-tuning option penalty_form={self.penalty_form!r} is not the current form "
                f"{expected_form!r} of {self.regularizer!r}: the configuration was made by another "
                f"version of taskarith"
            )
        object.__setattr__(self, "penalty_form", expected_form)
        needs_inputs = regularized and self.regularizer in REGULARIZERS and REGULARIZERS[self.regularizer].needs_inputs
        checks = [
            ("mode", self.mode in MODES, f"must be one of {', '.join(MODES)}"),
            (
                "regularizer",
                not regularized or self.regularizer in REGULARIZERS,
                f"must be one of {', '.join(REGULARIZERS)}",
            ),
            (
                "reg_strength",
                (self.strength > 0) if regularized else self.strength == 0,
                "must be > 0 with a regularizer, and 0 without one",
            ),
            (
                "reg_tasks",
                not needs_inputs or bool(self.reg_tasks),
                f"must name at least one other task for {self.regularizer}",
            ),
            ("reg_sampling", self.reg_sampling in REG_SAMPLINGS, f"must be one of {', '.join(REG_SAMPLINGS)}"),
            ("weight_decay_on", self.weight_decay_on in DECAY_TARGETS, f"must be one of {', '.join(DECAY_TARGETS)}"),
            (
                "warmup_steps",
                self.warmup_steps is None or 0 <= self.warmup_steps <= 10_000_000,
                "must be between 0 and 10,000,000 (or unset: warmup_fraction)",
            ),
            ("kfac_norm_scale", self.kfac_norm_scale >= 0, "must be >= 0"),
            ("kfac_projection_scale", self.kfac_projection_scale >= 0, "must be >= 0"),
            ("reg_tasks", self.task not in self.reg_tasks, "must not include the task being fine-tuned"),
            (
                "reg_factors",
                self.regularizer != "kfac" or bool(self.reg_factors),
                "must name at least one factor file for kfac",
            ),
            ("reg_batch_size", 1 <= self.reg_batch_size <= 65_536, "must be between 1 and 65,536"),
            ("reg_every", self.reg_every >= 1, "must be >= 1"),
            ("steps", 1 <= self.steps <= 10_000_000, "must be between 1 and 10,000,000"),
            ("batch_size", 1 <= self.batch_size <= 65_536, "must be between 1 and 65,536"),
            ("lr", 0 < self.lr < 1, "must be in (0, 1)"),
            ("weight_decay", 0 <= self.weight_decay < 10, "must be in [0, 10)"),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1, "must be in [0, 1)"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be positive"),
            ("max_length", 2 <= self.max_length <= 8192, "must be between 2 and 8192"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0 (0: only at the end)"),
            (
                "trainable",
                self.trainable is None or (isinstance(self.trainable, str) and 0 < len(self.trainable) <= 1000),
                "must be 'attention' or a regular expression of 1 to 1,000 characters (or unset: all parameters)",
            ),
            (
                "lora_rank",
                isinstance(self.lora_rank, int)
                and not isinstance(self.lora_rank, bool)
                and 1 <= self.lora_rank <= 65_536,
                "must be an integer between 1 and 65,536",
            ),
            ("lora_alpha", isinstance(self.lora_alpha, float) and self.lora_alpha > 0, "must be a positive number"),
            (
                "lora_rank",
                self.mode in LORA_MODES or self.lora_rank == LATER_OPTIONS["lora_rank"],
                f"applies only to the LoRA modes ({', '.join(LORA_MODES)}), not to mode {self.mode!r}",
            ),
            (
                "lora_alpha",
                self.mode in LORA_MODES or self.lora_alpha == LATER_OPTIONS["lora_alpha"],
                f"applies only to the LoRA modes ({', '.join(LORA_MODES)}), not to mode {self.mode!r}",
            ),
            ("seed", 0 <= self.seed <= MAX_SEED, f"must be between 0 and {MAX_SEED} (torch's generators take 64 bits)"),
        ]
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise TaskArithError(f"fine-tuning option {name}={quoted(value)} {rule}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskArithError(f"{source}: unknown fine-tuning options {unknown} (known: {sorted(known)})")
        if data.get("regularizer") and not data.get("penalty_form"):
            # A record from before penalty forms were recorded: today's penalty of that name may be another one.
            raise TaskArithError(
                f"{source}: regularizer {data['regularizer']!r} without penalty_form was recorded "
                f"before taskarith 0.2, whose penalty of that name differs from today's; replaying it "
                f"would train something else (see docs/protocol.md)"
            )
        return cls(**data)

    @property
    def strength(self) -> float:
        """``reg_strength`` as set by ``__post_init__`` (the published one where it was left unset)."""
        return float(self.reg_strength or 0.0)

    def to_json(self) -> dict[str, Any]:
        """The configuration as it reads back from JSON (tuples become lists).

        Options added after 0.2 are recorded only when set, so every earlier configuration keeps its run
        key and its checkpoints stay resumable. The LoRA options are recorded whenever the mode is a LoRA
        mode (its record then says its rank and alpha) and never otherwise (they must stay at their defaults).
        """
        data = asdict(self)
        for name, default in LATER_OPTIONS.items():
            if data[name] == default and not (name in LORA_OPTIONS and self.mode in LORA_MODES):
                del data[name]
        return json.loads(json.dumps(data))


# Options added after taskarith 0.2, with the default that leaves them out of the record.
LATER_OPTIONS: dict[str, Any] = {"trainable": None, "lora_rank": 8, "lora_alpha": 16.0}
LORA_OPTIONS = ("lora_rank", "lora_alpha")
LORA_MODES = ("lora", "linear_lora")


@dataclass(frozen=True)
class FinetuneResult:
    task_vector: TaskVector
    record: dict[str, Any]


# The largest seed a run takes: torch.manual_seed refuses more than 64 bits, and only after the model loaded.
MAX_SEED = 2**63 - 1


def check_against_task(config: FinetuneConfig, task: Task) -> None:
    """Refuse, for options typed by a user, a batch the task's data cannot fill, before the model loads.

    A batch larger than the training split repeats its examples within the step (65,536 copies of 46
    examples took 7.3 GB before failing in the allocator). The library itself keeps walking seeded epochs
    end to end, which a small task (a probe, a test) may want; the command line calls this check.
    """
    examples = len(task.train)
    if config.batch_size > examples:
        raise TaskArithError(
            f"fine-tuning option batch_size={config.batch_size} is more than the {examples} training "
            f"examples of task {shown(task.name)}; use at most {examples}"
        )


def _save_checkpoint(
    path: Path,
    step: int,
    config: FinetuneConfig,
    base_hash: str,
    named_params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
) -> None:
    # Raw weights, not deltas: pre + (theta - pre) is not always theta in floating point, and resuming
    # must continue from exactly the same numbers.
    tensors: dict[str, torch.Tensor] = {}
    for name, param in named_params:
        tensors[f"param/{name}"] = param.detach()
        state = optimizer.state.get(param, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                tensors[f"{moment}/{name}"] = state[moment]
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "base_hash": base_hash,
        "config": json.dumps(config.to_json(), sort_keys=True),
    }
    save_tensors(path, tensors, metadata)


def _load_checkpoint(
    path: Path,
    config: FinetuneConfig,
    base_hash: str,
    named_params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
) -> int:
    tensors, metadata = load_tensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise TaskArithError(f"{path}: not a taskarith fine-tuning checkpoint")
    if metadata.get("base_hash") != base_hash:
        raise TaskArithError(f"{path}: checkpoint of base model {metadata.get('base_hash')}, not {base_hash}")
    try:
        recorded = json.loads(metadata.get("config", "{}"))
    except (ValueError, RecursionError):  # ValueError: also an integer of over 4300 digits
        recorded = None
    if recorded != config.to_json():
        raise TaskArithError(f"{path}: checkpoint was made with another configuration; delete it or use another --out")
    # A checkpoint is a file someone may have edited or damaged: its step and tensors are checked before use.
    step_text = metadata.get("step", "")
    if not (step_text.isascii() and step_text.isdigit() and len(step_text) < 19 and int(step_text) <= config.steps):
        raise TaskArithError(
            f"{path}: checkpoint step {quoted(step_text)} is not a step of this run "
            f"(0 to {config.steps}); delete it or use another --out"
        )
    step = int(step_text)
    for name, param in named_params:
        for prefix in ("param", "exp_avg", "exp_avg_sq"):
            saved = tensors.get(f"{prefix}/{name}")
            if (saved is None and prefix == "param") or (
                saved is not None and (saved.shape != param.shape or saved.dtype != param.dtype)
            ):
                raise TaskArithError(
                    f"{path}: checkpoint tensor {quoted(f'{prefix}/{name}')} is missing or not "
                    f"{param.dtype} {tuple(param.shape)}; delete it or use another --out"
                )
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(tensors[f"param/{name}"])
            if f"exp_avg/{name}" in tensors:
                optimizer.state[param] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[f"exp_avg/{name}"].to(param.device),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(param.device),
                }
    return step


def environment() -> dict[str, str]:
    return {
        "taskarith": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


@dataclass
class Trainable:
    """What a fine-tuning mode trains: the encoder the head runs on, its parameters, and theta - theta0.

    ``delta`` is always in the base's parameter space (what the penalties take). ``linearized``: the encoder
    has ``hidden_and_tangent``, so one JVP serves the task's loss and tau-Jp. ``vector_mode``: the task
    vector is ``delta()`` read in that mode; None: it is measured from the encoder (:func:`task_vector`).
    """

    encoder: nn.Module
    named_params: list[tuple[str, nn.Parameter]]
    delta: Callable[[], dict[str, torch.Tensor]]
    linearized: bool = False
    vector_mode: str | None = None
    # What the run record says about the mode beyond the configuration (LoRA: targets, what trains).
    summary: dict[str, Any] | None = None


def standard_trainable(
    pretrained: Pretrained, names: Sequence[str] | None = None, config: FinetuneConfig | None = None
) -> Trainable:
    encoder = pretrained.trainable_copy()
    chosen = set(names) if names is not None else None
    for name, param in encoder.named_parameters():
        param.requires_grad_(chosen is None or name in chosen)
    theta0 = dict(pretrained.encoder.named_parameters())
    named = [(name, param) for name, param in encoder.named_parameters() if param.requires_grad]
    return Trainable(encoder, named, lambda: {name: param - theta0[name] for name, param in named})


def linear_trainable(
    pretrained: Pretrained, names: Sequence[str] | None = None, config: FinetuneConfig | None = None
) -> Trainable:
    encoder = Linearized(pretrained.encoder, trainable=True, params=names)
    named = list(encoder.deltas().items())
    return Trainable(encoder, named, encoder.deltas, linearized=True)  # type: ignore[arg-type]


def _lora_model(
    kind: type[LoraModel], pretrained: Pretrained, names: Sequence[str] | None, config: FinetuneConfig | None
) -> LoraModel:
    if names is None:
        try:
            names = trainable_parameters(pretrained.encoder, "attention", model_name=pretrained.name)
        except TaskArithError as exc:
            raise TaskArithError(
                f"LoRA targets the attention projections unless the option trainable names the weights: {exc}"
            ) from None
    config = config or FinetuneConfig(task="?", mode="lora")
    return kind(pretrained.encoder, names, rank=config.lora_rank, alpha=config.lora_alpha, seed=config.seed)


def lora_trainable(
    pretrained: Pretrained, names: Sequence[str] | None = None, config: FinetuneConfig | None = None
) -> Trainable:
    """Standard LoRA on ``names`` (default: the attention projections): A and B train, the vector is dW."""
    model = _lora_model(LoraModel, pretrained, names, config)
    summary = {**model.summary(), "trained": "lora_A and lora_B"}
    return Trainable(model, model.named_factors(), model.deltas, vector_mode="standard", summary=summary)


def linear_lora_trainable(
    pretrained: Pretrained, names: Sequence[str] | None = None, config: FinetuneConfig | None = None
) -> Trainable:
    """LoRA linearized at its initialisation: only B trains (the Jacobian in A is 0 at B = 0), the vector is
    the linear-mode dW = s B A0 (:mod:`taskarith.lora_training`)."""
    model = _lora_model(LinearLora, pretrained, names, config)
    summary = {**model.summary(), "trained": "lora_B only: at B = 0 the Jacobian in lora_A is zero, so A stays A0"}
    return Trainable(model, model.named_factors(), model.deltas, linearized=True, vector_mode="linear", summary=summary)


class TrainableBuilder(Protocol):
    def __call__(
        self, pretrained: Pretrained, names: Sequence[str] | None = None, config: FinetuneConfig | None = None
    ) -> Trainable: ...


TRAINABLES: dict[str, TrainableBuilder] = {
    "standard": standard_trainable,
    "linear": linear_trainable,
    "lora": lora_trainable,
    "linear_lora": linear_lora_trainable,
}
MODES = tuple(TRAINABLES)


def regularization_pools(config: FinetuneConfig) -> list[list[Any]]:
    """Unlabelled inputs of each other task named in the config (their training splits), in config order."""
    return [list(load_task(name).train.inputs) for name in config.reg_tasks]


def regularization_factors(config: FinetuneConfig, pretrained: Pretrained) -> Any:
    if config.regularizer != "kfac":
        return None
    from taskarith.kfac import KFACFactors, merge_factors, uncovered_parameters

    factors = merge_factors([KFACFactors.load(path) for path in config.reg_factors])
    if factors.base_hash != pretrained.base_hash:
        raise TaskArithError(
            f"K-FAC factors {list(config.reg_factors)} were computed on base model {factors.base_hash}, "
            f"not on {pretrained.base_hash}"
        )
    uncovered = uncovered_parameters(pretrained.encoder, factors)
    if uncovered:
        # Fine-tuned but free of the penalty: the user must know which, or the protection is overstated.
        shown = ", ".join(uncovered[:8]) + (f" and {len(uncovered) - 8} more" if len(uncovered) > 8 else "")
        warnings.warn(
            f"the K-FAC factors {list(config.reg_factors)} do not cover {len(uncovered)} trained "
            f"parameters, which the penalty leaves free: {shown}",
            stacklevel=2,
        )
    return factors.to(pretrained.device)


def build_penalty(config: FinetuneConfig, pretrained: Pretrained) -> Penalty | None:
    """The config's interference penalty as an object (:mod:`taskarith.regularizers`), or None without one."""
    name = config.regularizer
    if name is None:
        return None
    if name in ("taujp", "taujp_sq"):
        return TauJp(
            pretrained.encoder,
            regularization_pools(config),
            collate=lambda items: pretrained.tokenize(items, train=config.augment),
            form=name,
            sampling=config.reg_sampling,
            batch_size=config.reg_batch_size,
            every=config.reg_every,
            seed=config.seed,
        )
    if name == "kfac":
        return KFACPenalty(
            regularization_factors(config, pretrained),
            norm_scale=config.kfac_norm_scale,
            projection_scale=config.kfac_projection_scale,
        )
    if name in ("orthoreg", "orthoreg_sq"):
        return OrthoReg(form=name)
    raise TaskArithError(f"fine-tuning option regularizer={quoted(name)} has no penalty object")


def regularization_batches(pools: list[list[Any]], config: FinetuneConfig, step: int) -> list[list[Any]]:
    """The other tasks' inputs penalized at ``step`` under the config's sampling (see :func:`sampling.regularization_draw`)."""
    return regularization_draw(
        pools,
        step,
        sampling=config.reg_sampling,
        batch_size=config.reg_batch_size,
        every=config.reg_every,
        seed=config.seed,
    )


def _split(tangents: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(tangents, sizes, dim=0))


def check_run_folder(
    out_dir: str | Path | None, inputs: Sequence[tuple[str, str]] = (), *, resume: bool = True, overwrite: bool = False
) -> None:
    """Refuse, before any training, a run folder whose outputs this run may not write.

    A finished run's task vector and record are replaced only with ``overwrite``, and only if taskarith
    wrote them (:func:`taskarith.outputs.check_output`). Resuming from the folder's own checkpoint is not
    an overwrite: what that unfinished run already wrote is its own (a kill between the vector and the
    record leaves both). Starting afresh (``resume=False``) discards a checkpoint only with ``overwrite``.
    """
    if out_dir is None:
        return
    out = Path(out_dir)
    checkpoint = out / CHECKPOINT_FILE
    resuming = resume and checkpoint.exists()
    for name, form in ((TASK_VECTOR_FILE, VECTOR_FORMAT), (RECORD_FILE, RECORD_FORMAT)):
        check_output(out / name, inputs, overwrite=overwrite or resuming, format=form, folder=False)
    check_log_outputs(out)
    if checkpoint.exists() and not resume:
        if not overwrite:
            raise TaskArithError(
                f"{checkpoint} holds an unfinished run; resume it (--resume) or discard it (--overwrite)"
            )
        check_output(checkpoint, inputs, overwrite=True, format=CHECKPOINT_FORMAT, folder=False)


def finetune(
    config: FinetuneConfig,
    pretrained: Pretrained,
    task: Task,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    protect: Sequence[tuple[str, str]] = (),
    cluster: Cluster | None = None,
    log_every: int = 10,
    val_every: int = 0,
    tensorboard: bool | None = None,
) -> FinetuneResult:
    """Fine-tune on ``task`` in the config's mode; write the task vector and run record to ``out_dir``.

    Every ``log_every`` steps the loss, learning rate, gradient norm and penalty go to the run record and to
    ``out_dir/train_log.jsonl`` (and TensorBoard, if installed and ``tensorboard`` is not False); every
    ``val_every`` updates (0: only at the end) the validation accuracy too (:mod:`taskarith.training_log`).
    None of these change the task vector.

    Under ``torchrun`` (or ``accelerate launch``) the batch is split across processes and only rank 0 writes;
    see :mod:`taskarith.distributed`. ``out_dir`` is locked for the whole run (by rank 0 only: the lock is
    about writers) and its outputs are checked before training (:func:`check_run_folder`; ``protect`` holds
    ``(role, path)`` pairs of inputs they must not write over), so a refusal never costs a run.
    """
    cluster = cluster or cluster_from_environment()
    run = functools.partial(
        _finetune,
        config,
        pretrained,
        task,
        out_dir,
        progress=progress,
        resume=resume,
        overwrite=overwrite,
        protect=protect,
        cluster=cluster,
        log_every=log_every,
        val_every=val_every,
        tensorboard=tensorboard,
    )
    if log_every < 1 or val_every < 0:
        raise TaskArithError(f"log_every={log_every} must be >= 1 and val_every={val_every} >= 0 (0: at the end)")
    if out_dir is None:
        return run()
    lock, refusal = None, None
    if cluster.is_main:
        try:
            lock = RunLock(out_dir)
            check_run_folder(out_dir, protect, resume=resume, overwrite=overwrite)
        except TaskArithError as exc:
            refusal = exc
    try:
        # Every process must see the verdict, or the others would wait at their first collective forever.
        if cluster.sum_(torch.tensor([float(refusal is not None)], device=pretrained.device)).item():
            raise refusal or TaskArithError(f"{out_dir}: refused by the main process (see its error)")
        return run()
    finally:
        if lock is not None:
            lock.release()


def _finetune(
    config: FinetuneConfig,
    pretrained: Pretrained,
    task: Task,
    out_dir: str | Path | None,
    *,
    progress: bool,
    resume: bool,
    overwrite: bool,
    protect: Sequence[tuple[str, str]],
    cluster: Cluster,
    log_every: int,
    val_every: int,
    tensorboard: bool | None,
) -> FinetuneResult:
    samples_inputs = config.regularizer is not None and REGULARIZERS[config.regularizer].needs_inputs
    if config.batch_size < cluster.world or (samples_inputs and config.reg_batch_size < cluster.world):
        raise TaskArithError(
            f"batch_size={config.batch_size} and reg_batch_size={config.reg_batch_size} must be at "
            f"least the number of processes ({cluster.world}), so that every process has examples"
        )
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(config.seed)
    base_hash = pretrained.base_hash
    names = trainable_parameters(pretrained.encoder, config.trainable, model_name=pretrained.name)
    trainable = TRAINABLES[config.mode](pretrained, None if config.trainable is None else names, config)
    classifier = ZeroShotClassifier(trainable.encoder, pretrained.head(task), pretrained.logit_scale).eval()
    params = [param for _, param in trainable.named_params]
    theta0 = dict(pretrained.encoder.named_parameters())
    # Decaying theta = theta0 + delta while training delta: AdamW's own decay is turned off and the same
    # decoupled step, delta -= lr * wd * (theta0 + delta), is taken by hand just before each update.
    decay_theta = config.mode == "linear" and config.weight_decay_on == "theta" and config.weight_decay > 0
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0 if decay_theta else config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_fraction * config.steps)
    schedule = warmup_cosine(config.steps, warmup)
    penalty_term = build_penalty(config, pretrained)

    start_step = 0
    checkpoint = out / CHECKPOINT_FILE if out is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        start_step = _load_checkpoint(checkpoint, config, base_hash, trainable.named_params, optimizer)

    log = None
    if out is not None and cluster.is_main:
        header = {"format": LOG_FORMAT, "task": task.name, "mode": config.mode, "steps": config.steps}
        log = TrainingLog(out, {**header, "regularizer": config.regularizer}, start=start_step, tensorboard=tensorboard)
    try:
        train = task.train
        labels = torch.tensor(train.labels, device=pretrained.device)
        history: list[dict[str, float]] = []
        step_seconds: list[float] = []
        started = time.perf_counter()
        bar = tqdm(
            range(start_step, config.steps),
            desc=f"fine-tune {shown(task.name, 60)} ({config.mode})",
            disable=not progress or not cluster.is_main,
            initial=start_step,
            total=config.steps,
            leave=False,
        )
        for step in bar:
            step_started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.lr * schedule(step)
            global_indices = batch_indices(len(train), config.batch_size, config.seed, step)
            indices = cluster.shard(global_indices)
            inputs = [train.inputs[i] for i in indices]
            # One augmentation seed per input of the global batch, so a run gives the same vector however it
            # is split over processes; the regularization inputs draw from a stream of their own.
            seeds = cluster.shard(
                [derived_seed(config.seed, "augment", step, k, bits=62) for k in range(len(global_indices))]
            )
            regularize = penalty_term is not None and step % config.reg_every == 0
            groups = penalty_term.batches(step) if isinstance(penalty_term, TauJp) and regularize else []
            local_groups = [cluster.shard(group) for group in groups]
            reg_inputs = [item for group in local_groups for item in group]
            sizes = [len(group) for group in local_groups]
            reg_seeds = [
                derived_seed(config.seed, "augment", step, "regularization", j, k, bits=62)
                for j, group in enumerate(groups)
                for k in cluster.shard(list(range(len(group))))
            ]

            def batch_of(items: list[Any], item_seeds: list[int]) -> dict[str, torch.Tensor]:
                return pretrained.tokenize(items, train=config.augment, seeds=item_seeds)

            tangents = None
            if reg_inputs and trainable.linearized:
                # One JVP serves both: the task's inputs give f_lin, the other tasks' inputs give J f . delta.
                batch = batch_of(inputs + reg_inputs, seeds + reg_seeds)
                primal, tangent = trainable.encoder.hidden_and_tangent(**batch)  # type: ignore[operator]
                mask, n = batch["attention_mask"], len(inputs)
                logits = classifier.logits_from_pooled(mean_pool(primal[:n] + tangent[:n], mask[:n]))
                tangents = _split(pooled_tangents(tangent[n:], mask[n:]), sizes)
            else:
                logits = classifier(**batch_of(inputs, seeds))
                if reg_inputs:
                    reg_batch = batch_of(reg_inputs, reg_seeds)
                    _, tangent = hidden_and_tangent(pretrained.encoder, theta0, trainable.delta(), reg_batch)
                    tangents = _split(pooled_tangents(tangent, reg_batch["attention_mask"]), sizes)
            # Each process's share of the global means: summed over processes they give the full-batch loss.
            task_loss = F.cross_entropy(logits, labels[indices]) * cluster.share(len(indices), len(global_indices))
            penalty = None
            if regularize and penalty_term is not None:
                # tau-Jp divides each group's sum by its global size, so the shares already add up; a dataless
                # penalty is computed whole on every process and counted once.
                if isinstance(penalty_term, TauJp):
                    assert tangents is not None
                    penalty = penalty_term.from_tangents(trainable.delta(), tangents, [len(g) for g in groups])
                else:
                    penalty = penalty_term(trainable.delta(), step) * cluster.share(1, cluster.world)
            loss = task_loss + config.strength * penalty if penalty is not None else task_loss
            # Every process must see the same verdict, or the healthy ones would wait forever for the others.
            if not torch.isfinite(cluster.sum_(loss.detach().clone())):
                raise TaskArithError(
                    f"loss became {loss.item()} at step {step} of fine-tuning '{task.name}' (lr={config.lr}); "
                    f"the last good checkpoint is kept in {checkpoint or 'memory only'}; try a lower learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            cluster.sum_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if decay_theta:
                decay_theta_(dict(trainable.named_params), theta0, optimizer.param_groups[0]["lr"], config.weight_decay)
            optimizer.step()
            step_seconds.append(time.perf_counter() - step_started)

            if step % log_every == 0 or step == config.steps - 1:
                reported_loss = cluster.sum_(task_loss.detach().clone()).item()
                entry = {
                    "step": step,
                    "loss": round(reported_loss, 5),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": round(float(grad_norm), 5),
                }
                if penalty is not None:
                    entry["penalty"] = round(cluster.sum_(penalty.detach().clone()).item(), 6)
                history.append(entry)
                if log is not None:
                    log.write(entry)
                bar.set_postfix(loss=f"{reported_loss:.3f}")
            done = step + 1
            if log is not None and val_every and done % val_every == 0 and done < config.steps:
                log.write({"step": done, "val_accuracy": accuracy(pretrained, task, "val", trainable.encoder)})
            if (
                checkpoint is not None
                and cluster.is_main
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
                and done < config.steps
            ):
                _save_checkpoint(checkpoint, done, config, base_hash, trainable.named_params, optimizer)
        bar.close()
        train_seconds = time.perf_counter() - started

        tau = _task_vector(trainable, pretrained, task, config)
        val_accuracy = accuracy(pretrained, task, "val", trainable.encoder)
        if log is not None:
            log.write({"step": config.steps, "val_accuracy": val_accuracy})
        record = {
            "format": RECORD_FORMAT,
            "config": config.to_json(),
            "task": {
                "name": task.name,
                "classes": list(task.classes),
                "train": len(task.train),
                "val": len(task.val),
                "test": len(task.test),
                "source": task.source,
                "fingerprint": task.fingerprint,
            },
            "base_model": {"name": pretrained.name, "hash": base_hash},
            "resumed_from_step": start_step,
            "train_seconds": round(train_seconds, 3),
            "step_seconds_median": round(statistics.median(step_seconds), 4) if step_seconds else None,
            "history": history,
            "val_accuracy": val_accuracy,
            "task_vector_norm": tau.norm(),
            "environment": environment(),
        }
        if trainable.summary is not None:
            record["lora"] = trainable.summary
        if cluster.world > 1:
            record["processes"] = cluster.world
        if out is not None and cluster.is_main:
            # A resumed run replaces what it wrote itself before it was interrupted (see check_run_folder).
            replace_outputs = overwrite or start_step > 0
            with output_file(out / TASK_VECTOR_FILE, protect, overwrite=replace_outputs, format=VECTOR_FORMAT) as tmp:
                tau.save(tmp)
            with output_file(out / RECORD_FILE, protect, overwrite=replace_outputs, format=RECORD_FORMAT) as tmp:
                write_json(tmp, record)
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
        cluster.barrier()
        return FinetuneResult(task_vector=tau, record=record)
    finally:
        if log is not None:
            log.close()


def _task_vector(trainable: Trainable, pretrained: Pretrained, task: Task, config: FinetuneConfig) -> TaskVector:
    if trainable.vector_mode is None:
        return task_vector(trainable.encoder, pretrained.encoder, task=task.name, config=config)
    theta0 = dict(pretrained.encoder.named_parameters())
    with torch.no_grad():
        deltas = {name: value.detach().cpu() for name, value in sorted(trainable.delta().items())}
    return TaskVector(
        deltas=deltas,
        base_hash=state_hash({name: theta0[name] for name in deltas}),
        task=task.name,
        mode=trainable.vector_mode,
        config=config.to_json(),
    )


def run_key(config: FinetuneConfig, base_hash: str) -> str:
    """Content hash of what determines a task vector: base model, task, mode, hyper-parameters, seed."""
    payload = json.dumps({"base": base_hash, **config.to_json()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetune_cached(
    config: FinetuneConfig,
    pretrained: Pretrained,
    task: Task,
    cache_dir: str | Path,
    *,
    progress: bool = True,
    key: str | None = None,
) -> FinetuneResult:
    """Fine-tune once per content hash: a second call with the same inputs loads the saved vector.

    ``key`` replaces the config's own hash where the caller knows better (e.g. factor files named by content).
    """
    out = Path(cache_dir) / f"{task.name}-{config.mode}-{key or run_key(config, pretrained.base_hash)}"
    vector_file, record_file = out / TASK_VECTOR_FILE, out / RECORD_FILE
    if vector_file.is_file() and record_file.is_file():
        return FinetuneResult(task_vector=TaskVector.load(vector_file), record=read_json(record_file))
    # An entry with a vector but no record (a run killed between the two) is this cache's own: replace it.
    return finetune(config, pretrained, task, out, progress=progress, overwrite=True, tensorboard=False)
