"""The papers' protocol on a task suite: every fine-tuning method, task addition and negation with and
without alpha search, weight disentanglement, tau-Jp against measured interference, incremental learning.

Every number comes from running the library on the named model and tasks; nothing is filled in.
Fine-tuned vectors are cached by content hash (``finetune_cached``), so a second run only evaluates.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from taskarith.data import Task
from taskarith.errors import TaskArithError
from taskarith.evaluate import CONTROL_KEEP, EditedOutputs, control_constrained_alpha, disentanglement_error, mean
from taskarith.finetune import FinetuneConfig, finetune_cached, run_key
from taskarith.merging.hyperparameters import check_method
from taskarith.merging.methods import merge_task_vectors
from taskarith.models import Pretrained
from taskarith.vectors import TaskVector

# A method is how a task vector is fine-tuned: FinetuneConfig fields on top of the profile's.
# Regularized methods protect the other tasks of the suite (or, incrementally, the ones seen so far).
METHODS: dict[str, dict[str, Any]] = {
    "standard": {"mode": "standard"},
    "linear": {"mode": "linear"},
    "standard_taujp": {"mode": "standard", "regularizer": "taujp"},
    "linear_taujp": {"mode": "linear", "regularizer": "taujp"},
    "linear_kfac": {"mode": "linear", "regularizer": "kfac"},
}


@dataclass(frozen=True)
class BenchProfile:
    tasks: tuple[str, ...]
    control: str
    model: str = "all-MiniLM-L6-v2"  # what the CLI loads unless told otherwise
    methods: tuple[str, ...] = tuple(METHODS)
    steps: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    seeds: tuple[int, ...] = (0,)
    reg_strength: float = 1.0
    reg_batch_size: int = 8
    kfac_examples: int = 256
    alpha_grid: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
    negation_grid: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5)
    xi_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
    eval_limit: int | None = 500  # examples per val and test split
    xi_limit: int = 200
    xi_pairs: int | None = None  # how many task pairs get a xi grid (None: all pairs)
    xi_seeds: int | None = None  # how many seeds (the first ones) get xi grids (None: all); xi is a diagnostic
    incremental_methods: tuple[str, ...] = ("standard_taujp",)
    # Merging methods compared with the plain sum in task addition (each with its default hyper-parameters,
    # its scaling searched on validation like the sum's alpha); any of taskarith.merging's registry.
    merge_methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [m for m in (*self.methods, *self.incremental_methods) if m not in METHODS]
        if unknown:
            raise TaskArithError(f"unknown methods {unknown} (known: {', '.join(METHODS)})")
        for name in self.merge_methods:
            check_method(name)
        if len(self.tasks) < 2:
            raise TaskArithError(f"the protocol needs at least two tasks, got {list(self.tasks)}")
        if self.control in self.tasks:
            raise TaskArithError(f"control task {self.control!r} must not be one of the fine-tuned tasks")
        if not self.seeds:
            raise TaskArithError("at least one seed is needed")


_TEXT_QUICK = BenchProfile(
    # The demo's few minutes on 2 CPU cores: two tasks from different domains, one seed, 20 steps of batch 8,
    # 50 examples per split; it shows the machinery, not effect sizes. (Batch 16 with 60 examples took 9 min:
    # 309 s fine-tuning, 216 s evaluation.)
    tasks=("rt_sentiment", "wordnet_topic"), control="fortune_topic", steps=20, batch_size=8, lr=2e-4,
    eval_limit=50, xi_limit=50, xi_grid=(0.0, 0.5, 1.0), alpha_grid=(0.4, 0.7, 1.0), negation_grid=(0.25, 0.5, 1.0))
_TEXT_FULL = BenchProfile(
    # Meant to fit an hour on 2 CPU cores: three tasks, two of them from one domain (movie reviews), three seeds.
    # Evaluation, not fine-tuning, dominates its cost (results.json: stage_seconds), hence few grid points.
    tasks=("rt_sentiment", "rt_subjectivity", "wordnet_topic"), control="fortune_topic", steps=20, batch_size=16,
    lr=2e-4, seeds=(0, 1, 2), eval_limit=150, xi_limit=100, xi_grid=(0.0, 0.5, 1.0), xi_seeds=1,
    alpha_grid=(0.4, 0.7, 1.0, 1.3), negation_grid=(0.5, 0.75, 1.0))
# The embedded vision suite: EfficientNet-Lite0 (ImageNet) at 32 px under frozen linear-probe heads, on
# real image tasks from packages; sklearn's 8x8 digits is the control. Above lr 1e-4 fine-tuning collapses.
_VISION_FULL = BenchProfile(
    # Fine-tuning dominates here (the quick profile: 336 of 386 s), so 100 steps keep 3 tasks x 3 seeds in the hour.
    tasks=("fashion_mnist", "mnist", "animal_shapes"), control="digits", model="efficientnet-lite0", steps=100,
    batch_size=32, lr=1e-4, seeds=(0, 1, 2), eval_limit=300, xi_limit=200, xi_grid=(0.0, 0.5, 1.0, 1.5),
    alpha_grid=(0.2, 0.4, 0.6, 0.8, 1.0, 1.2), negation_grid=(0.25, 0.5, 0.75, 1.0, 1.5))
_VISION_QUICK = replace(_VISION_FULL, tasks=("fashion_mnist", "animal_shapes"), steps=60, seeds=(0,), eval_limit=200,
                        xi_limit=100, xi_grid=(0.0, 0.5, 1.0), alpha_grid=(0.4, 0.7, 1.0), negation_grid=(0.25, 0.5, 1.0))

# (suite, size) -> profile; the CLI picks one with --suite and --quick/--full.
PROFILES: dict[tuple[str, str], BenchProfile] = {
    ("text", "quick"): _TEXT_QUICK,
    ("text", "full"): _TEXT_FULL,
    ("vision", "quick"): _VISION_QUICK,
    ("vision", "full"): _VISION_FULL,
}
SUITES = tuple(sorted({suite for suite, _ in PROFILES}))


# -------------------------------------------------------------------------------------------------
# Fine-tuning


def _spec(task: Task) -> str:
    """What ``load_task`` resolves back to this task: a user task's file or folder, a torchvision spec, else the built-in name."""
    source = str(task.source)
    return source if source.startswith("torchvision:") or Path(source).exists() else task.name


@dataclass
class Suite:
    pretrained: Pretrained
    tasks: list[Task]
    control: Task
    profile: BenchProfile
    cache_dir: Path
    on_stage: Callable[[str], None] = lambda stage: None
    finetune_seconds: dict[str, float] = field(default_factory=dict)

    def kfac_file(self, task: Task) -> Path:
        """The task's K-FAC factors, computed once per base model and sample size (made by the data owner)."""
        from taskarith.kfac import compute_kfac_factors

        path = self.cache_dir / "kfac" / f"{task.name}-{self.pretrained.base_hash[:12]}-{self.profile.kfac_examples}.safetensors"
        if not path.is_file():
            self.on_stage(f"K-FAC factors of {task.name}")
            compute_kfac_factors(self.pretrained, task, num_examples=self.profile.kfac_examples, progress=False).save(path)
        return path

    def config(self, method: str, task: Task, protected: Sequence[Task], seed: int) -> FinetuneConfig:
        settings = dict(METHODS[method])
        regularizer = settings.get("regularizer")
        if regularizer is None or not protected:
            settings.pop("regularizer", None)  # nothing to protect: the run is the plain one (and shares its cache)
        elif regularizer == "taujp":
            settings.update(reg_strength=self.profile.reg_strength, reg_tasks=tuple(_spec(t) for t in protected),
                            reg_batch_size=self.profile.reg_batch_size)
        else:
            settings.update(reg_strength=self.profile.reg_strength,
                            reg_factors=tuple(str(self.kfac_file(t)) for t in protected))
        p = self.profile
        return FinetuneConfig(task=task.name, model=self.pretrained.name, steps=p.steps, batch_size=p.batch_size,
                              lr=p.lr, seed=seed, checkpoint_every=0, **settings)

    def vector(self, method: str, task: Task, protected: Sequence[Task], seed: int) -> TaskVector:
        config = self.config(method, task, protected, seed)
        label = f"{method}, {task.name}" + (f", protecting {len(protected)}" if config.regularizer else "")
        self.on_stage(f"fine-tuning ({label}, seed {seed})")
        # K-FAC factor paths live in the cache folder: key the run on their content, not their location.
        key = run_key(replace(config, reg_factors=tuple(Path(f).name for f in config.reg_factors)),
                      self.pretrained.base_hash)
        result = finetune_cached(config, self.pretrained, task, self.cache_dir / "vectors", progress=False, key=key)
        self.finetune_seconds[f"{method}/{task.name}/{key}"] = result.record["train_seconds"]
        return result.task_vector


# -------------------------------------------------------------------------------------------------
# Evaluation of one method's vectors


def _edit(names: Sequence[str], alpha: float) -> tuple[tuple[str, float], ...]:
    return tuple((name, alpha) for name in names)


def _addition(outputs: EditedOutputs, tasks: Sequence[Task], finetuned: Mapping[str, float], names: Sequence[str],
              alpha: float, limit: int | None) -> dict[str, Any]:
    """Test accuracy of pre + alpha * (sum of the vectors ``names``), absolute and normalized by fine-tuned."""
    accuracy = {t.name: outputs.accuracy(t, "test", _edit(names, alpha), limit) for t in tasks}
    normalized = {t.name: accuracy[t.name] / finetuned[t.name] if finetuned[t.name] > 0 else math.nan for t in tasks}
    return {"alpha": alpha, "accuracy": accuracy, "normalized": normalized,
            "mean_accuracy": mean(accuracy.values()), "mean_normalized": mean(normalized.values())}


def _addition_with_search(outputs: EditedOutputs, tasks: Sequence[Task], finetuned: Mapping[str, float],
                          names: Sequence[str], grid: Sequence[float], limit: int | None) -> dict[str, Any]:
    """Addition at alpha = 1 (untuned) and at the alpha of ``grid`` with the best mean validation accuracy."""
    val_curve = {alpha: mean(outputs.accuracy(t, "val", _edit(names, alpha), limit) for t in tasks) for alpha in grid}
    chosen = max(grid, key=lambda a: (val_curve[a], -abs(a - 1.0)))
    return {"alpha_1": _addition(outputs, tasks, finetuned, names, 1.0, limit),
            "alpha_searched": _addition(outputs, tasks, finetuned, names, chosen, limit),
            "val_curve": {str(a): v for a, v in val_curve.items()}}


def evaluate_vectors(suite: Suite, vectors: Mapping[str, TaskVector], with_xi: bool = True) -> dict[str, Any]:
    """Addition, negation, disentanglement (unless ``with_xi`` is false) and pairwise interference of one method's vectors."""
    p, tasks, control = suite.profile, suite.tasks, suite.control
    names = [t.name for t in tasks]
    # Each merging method's merge of the vectors, under a name no task can have, beside the vectors themselves.
    merged = {f"{method}()": merge_task_vectors([vectors[n] for n in names], method) for method in p.merge_methods}
    outputs = EditedOutputs(suite.pretrained, {**vectors, **merged})
    limit = p.eval_limit

    finetuned = {t.name: outputs.accuracy(t, "test", ((t.name, 1.0),), limit) for t in tasks}
    # Task addition: one alpha for the sum, chosen on validation (mean accuracy), and alpha = 1 untuned.
    addition = _addition_with_search(outputs, tasks, finetuned, names, p.alpha_grid, limit)
    merging = {method: _addition_with_search(outputs, tasks, finetuned, [f"{method}()"], p.alpha_grid, limit)
               for method in p.merge_methods}

    # Task negation: the largest drop on the target that keeps control >= 95% of its pre-trained accuracy.
    control_floor = CONTROL_KEEP * outputs.accuracy(control, "val", (), limit)
    negation = {}
    for t in tasks:
        best = control_constrained_alpha(
            p.negation_grid, lambda a, t=t: outputs.accuracy(t, "val", ((t.name, -a),), limit),
            lambda a, t=t: outputs.accuracy(control, "val", ((t.name, -a),), limit), control_floor)
        rows = {}
        for label, alpha in (("alpha_1", 1.0), ("alpha_searched", best)):
            if alpha is None:
                rows[label] = {"alpha": None, "target": math.nan, "control": math.nan}
                continue
            rows[label] = {"alpha": alpha, "target": outputs.accuracy(t, "test", ((t.name, -alpha),), limit),
                           "control": outputs.accuracy(control, "test", ((t.name, -alpha),), limit)}
        negation[t.name] = rows

    # Pairwise interference: the drop of task j's accuracy when task i's vector joins its own.
    drops = [[math.nan if i == j else finetuned[tj.name] - outputs.accuracy(tj, "test", ((tj.name, 1.0), (ti.name, 1.0)), limit)
              for j, tj in enumerate(tasks)] for i, ti in enumerate(tasks)]

    # Weight disentanglement error over a grid, for every pair of tasks.
    xi = {}
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))][: p.xi_pairs] if with_xi else []
    for i, j in pairs:
        xi[f"{names[i]}+{names[j]}"] = disentanglement_error(outputs, (tasks[i], tasks[j]), (names[i], names[j]),
                                                             p.xi_grid, "test", p.xi_limit)

    # The same quantity as `taskarith interference` (mean squared norm, validation inputs), from the cached JVPs.
    taujp = [[outputs.taujp(ti.name, tj, "val", limit) for tj in tasks] for ti in tasks]
    return {
        "finetuned": finetuned,
        "addition": addition,
        "merging": merging,
        "negation": negation,
        "interference_drop": drops,
        "xi": xi,
        "xi_mean": mean(v for grid in xi.values() for row in grid for v in row) if xi else math.nan,
        "taujp": taujp,
        "encoder_passes": outputs.passes,
    }


# -------------------------------------------------------------------------------------------------
# Incremental learning


def incremental(suite: Suite, method: str, seed: int) -> dict[str, Any]:
    """Tasks arrive in order; task k is regularized against tasks 1..k-1 only. Accuracy of the running sum."""
    tasks, limit = suite.tasks, suite.profile.eval_limit
    vectors: dict[str, TaskVector] = {}
    after = []
    for k, task in enumerate(tasks):
        vectors[task.name] = suite.vector(method, task, tasks[:k], seed)
        outputs = EditedOutputs(suite.pretrained, vectors)
        seen = tasks[: k + 1]
        accuracy = {t.name: outputs.accuracy(t, "test", _edit([s.name for s in seen], 1.0), limit) for t in seen}
        after.append({"arrived": task.name, "accuracy": accuracy, "mean_accuracy": mean(accuracy.values())})
    return {"method": method, "after_each_arrival": after}


# -------------------------------------------------------------------------------------------------
# Fine-tuned checkpoints made elsewhere


def existing_checkpoints(suite: Suite, checkpoints: Sequence[tuple[Task, str | Path]], new_task: Task,
                         seed: int = 0) -> dict[str, Any]:
    """Vectors of public checkpoints ((task, model folder) pairs), their tau-Jp, and a new task added to them.

    The new task is fine-tuned twice in standard mode: plainly, and with tau-Jp against the checkpoint
    tasks' inputs; each is added (alpha = 1) to the sum of the checkpoint vectors.
    """
    tasks = [task for task, _ in checkpoints]
    if new_task.name in {task.name for task in tasks}:
        raise TaskArithError(f"the new task {new_task.name!r} already has a checkpoint")
    vectors = {task.name: TaskVector.from_finetuned_checkpoint(suite.pretrained.encoder, path, task=task.name)
               for task, path in checkpoints}
    new = {"plain": suite.vector("standard", new_task, [], seed),
           "taujp": suite.vector("standard_taujp", new_task, tasks, seed)}
    limit = suite.profile.eval_limit
    everyone = [*tasks, new_task]
    result: dict[str, Any] = {"checkpoints": {task.name: str(path) for task, path in checkpoints},
                              "new_task": new_task.name}
    existing = EditedOutputs(suite.pretrained, vectors)
    result["taujp"] = [[existing.taujp(ti.name, tj, "val", limit) for tj in tasks] for ti in tasks]
    result["finetuned"] = {t.name: existing.accuracy(t, "test", ((t.name, 1.0),), limit) for t in tasks}
    result["merged_existing"] = {t.name: existing.accuracy(t, "test", _edit(list(vectors), 1.0), limit) for t in tasks}
    for label, tau in new.items():
        outputs = EditedOutputs(suite.pretrained, {**vectors, new_task.name: tau})
        merged = _edit([*vectors, new_task.name], 1.0)
        accuracy = {t.name: outputs.accuracy(t, "test", merged, limit) for t in everyone}
        result[f"with_new_{label}"] = {
            "accuracy": accuracy,
            "mean_accuracy": mean(accuracy.values()),
            "new_task_alone": outputs.accuracy(new_task, "test", ((new_task.name, 1.0),), limit),
            "taujp_on_checkpoint_tasks": {t.name: outputs.taujp(new_task.name, t, "val", limit) for t in tasks},
        }
    return result


# -------------------------------------------------------------------------------------------------
# The whole protocol


def _spread(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0, "n": len(finite)}


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return math.nan
    return statistics.correlation(xs, ys)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def correlation(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman (Pearson of ranks, ties averaged) correlation of paired values."""
    return {"pearson": _pearson(xs, ys), "spearman": _pearson(_ranks(xs), _ranks(ys)), "points": len(xs)}


def _off_diagonal(matrix: Sequence[Sequence[float]]) -> list[float]:
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j]


def summarize(per_seed: Mapping[int, Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of the headline numbers, per method."""
    seeds = list(per_seed)
    summary: dict[str, Any] = {}
    for method in methods:
        runs = [per_seed[s]["methods"][method] for s in seeds]
        entry = {
            "finetuned_mean": _spread([mean(r["finetuned"].values()) for r in runs]),
            "xi_mean": _spread([r["xi_mean"] for r in runs]),
        }
        for label in ("alpha_1", "alpha_searched"):
            entry[f"addition_{label}_accuracy"] = _spread([r["addition"][label]["mean_accuracy"] for r in runs])
            entry[f"addition_{label}_normalized"] = _spread([r["addition"][label]["mean_normalized"] for r in runs])
            entry[f"negation_{label}_target"] = _spread([mean(n[label]["target"] for n in r["negation"].values()) for r in runs])
            entry[f"negation_{label}_control"] = _spread([mean(n[label]["control"] for n in r["negation"].values()) for r in runs])
        entry["addition_alpha_chosen"] = [r["addition"]["alpha_searched"]["alpha"] for r in runs]
        entry["merging"] = {merge: {
            **{f"{label}_normalized": _spread([r["merging"][merge][label]["mean_normalized"] for r in runs])
               for label in ("alpha_1", "alpha_searched")},
            "alpha_chosen": [r["merging"][merge]["alpha_searched"]["alpha"] for r in runs],
        } for merge in runs[0].get("merging", {})}
        xs = [x for r in runs for x in _off_diagonal(r["taujp"])]
        ys = [y for r in runs for y in _off_diagonal(r["interference_drop"])]
        entry["taujp_vs_drop"] = correlation(xs, ys)
        summary[method] = entry
    xs = [x for s in seeds for m in methods for x in _off_diagonal(per_seed[s]["methods"][m]["taujp"])]
    ys = [y for s in seeds for m in methods for y in _off_diagonal(per_seed[s]["methods"][m]["interference_drop"])]
    summary["taujp_vs_drop_all_methods"] = correlation(xs, ys)
    return summary


def run_bench(
    pretrained: Pretrained,
    tasks: Sequence[Task],
    control: Task,
    profile: BenchProfile,
    cache_dir: str | Path,
    on_stage: Callable[[str], None] = lambda stage: None,
    checkpoints: Sequence[tuple[Task, str | Path]] = (),
    new_task: Task | None = None,
) -> dict[str, Any]:
    """Every method, seed and measurement of the protocol; plain data for results.json and the report.

    ``checkpoints`` ((task, fine-tuned model folder made elsewhere) pairs) adds the public-checkpoint study,
    with ``new_task`` (default: the first suite task without a checkpoint) fine-tuned on top of them.
    """
    suite = Suite(pretrained, list(tasks), control, profile, Path(cache_dir), on_stage)
    started = time.perf_counter()
    zero_shot_outputs = EditedOutputs(pretrained, {})
    zero_shot = {t.name: zero_shot_outputs.accuracy(t, "test", (), profile.eval_limit) for t in [*tasks, control]}
    per_seed: dict[int, dict[str, Any]] = {}
    # Where the time goes (fine-tuning includes the cache's loads), so a profile can be sized to a budget.
    stage_seconds: dict[str, float] = {}

    def timed(stage: str, work: Callable[[], Any]) -> Any:
        begun = time.perf_counter()
        value = work()
        stage_seconds[stage] = round(stage_seconds.get(stage, 0.0) + time.perf_counter() - begun, 1)
        return value

    for position, seed in enumerate(profile.seeds):
        with_xi = profile.xi_seeds is None or position < profile.xi_seeds
        methods = {}
        for method in profile.methods:
            vectors = timed(f"fine-tuning {method}", lambda: {
                t.name: suite.vector(method, t, [o for o in tasks if o is not t], seed) for t in tasks})
            on_stage(f"evaluating {method} (seed {seed})")
            methods[method] = timed(f"evaluating {method}", lambda: evaluate_vectors(suite, vectors, with_xi))
        runs = {method: timed("incremental", lambda: incremental(suite, method, seed))
                for method in profile.incremental_methods}
        # The unregularized counterpart: the same method's mode without a regularizer.
        for method in profile.incremental_methods:
            plain = METHODS[method]["mode"]
            if plain not in runs:
                runs[plain] = timed("incremental", lambda: incremental(suite, plain, seed))
        per_seed[seed] = {"methods": methods, "incremental": runs}
    studies = {}
    if checkpoints:
        covered = {task.name for task, _ in checkpoints}
        if new_task is None:
            new_task = next((t for t in tasks if t.name not in covered), None)
        if new_task is None:
            raise TaskArithError("every suite task has a checkpoint; name a new task to add to them")
        on_stage(f"existing checkpoints of {', '.join(sorted(covered))}, adding {new_task.name}")
        studies["existing_checkpoints"] = existing_checkpoints(suite, checkpoints, new_task, profile.seeds[0])
    return {
        **studies,
        "model": {"name": pretrained.name, "hash": pretrained.base_hash},
        "profile": asdict(profile),
        "tasks": [t.name for t in tasks],
        "control_task": control.name,
        "zero_shot": zero_shot,
        "per_seed": {str(seed): value for seed, value in per_seed.items()},
        "summary": summarize(per_seed, profile.methods),
        "finetune_seconds": suite.finetune_seconds,
        "stage_seconds": stage_seconds,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
