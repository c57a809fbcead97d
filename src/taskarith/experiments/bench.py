"""The papers' protocol on a task suite: every fine-tuning method, task addition and negation with and
without alpha search, weight disentanglement, tau-Jp against measured interference, incremental learning.

Every number comes from running the library on the named model and tasks; nothing is filled in.
Fine-tuned vectors are cached by content hash (``finetune_cached``), so a second run only evaluates.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from taskarith.data import Task
from taskarith.display import StageProgress, shown
from taskarith.errors import TaskArithError
from taskarith.evaluate import (
    CONTROL_KEEP,
    PUBLISHED_ALPHA_GRID,
    EditedOutputs,
    TangentStore,
    best_normalized_alpha,
    check_reference,
    control_constrained_alpha,
    disentanglement_error,
    mean,
    normalized_accuracy,
)
from taskarith.experiments.claims import ledger
from taskarith.experiments.stats import correlation, off_diagonal
from taskarith.finetune import FinetuneConfig, finetune_cached, run_key
from taskarith.io import state_hash
from taskarith.merging.adamerging import AdaMergingConfig, adamerge_tasks
from taskarith.merging.hyperparameters import LEARNED_METHODS, STATISTICS, check_method
from taskarith.merging.methods import merge_task_vectors
from taskarith.merging.statistics import COMPUTATION as STATISTICS_COMPUTATION
from taskarith.merging.statistics import DEFAULT_EXAMPLES as DEFAULT_STATISTICS_EXAMPLES
from taskarith.merging.statistics import FORMAT as STATISTICS_FORMAT
from taskarith.merging.statistics import MergeStatistics, compute_merge_statistics
from taskarith.models import Pretrained
from taskarith.regularizers import PUBLISHED_STRENGTH
from taskarith.training import trainable_parameters
from taskarith.vectors import TaskVector

# A method is how a task vector is fine-tuned: FinetuneConfig fields on top of the profile's, plus
# "evaluate_as" where its vectors are read in another mode (post-hoc linearization: standard vectors
# evaluated through f_lin, the tangent paper's third baseline; it shares the standard runs' cache).
# Regularized methods protect the other tasks of the suite (or, incrementally, the ones seen so far) and,
# for tau-Jp, the control task, as the tau-Jp code's regularization set holds ImageNet.
METHODS: dict[str, dict[str, Any]] = {
    "standard": {"mode": "standard"},
    "linear": {"mode": "linear"},
    "posthoc": {"mode": "standard", "evaluate_as": "linear"},
    "linear_taujp": {"mode": "linear", "regularizer": "taujp"},
    "linear_kfac": {"mode": "linear", "regularizer": "kfac", "weight_decay_on": "delta"},  # as TAK decays
    # Beyond the papers: tau-Jp in standard mode (the released code cannot run it), and the squared form.
    "standard_taujp": {"mode": "standard", "regularizer": "taujp"},
    "linear_taujp_sq": {"mode": "linear", "regularizer": "taujp_sq"},
    # Opt-in (not in DEFAULT_METHODS): cheaper routes to disentanglement without a JVP. Attention-only
    # fine-tuning (Jin et al., ICLR 2025), with tau-Jp on top, and OrthoReg (Liu et al., CVPR 2026), which
    # needs no other task's data; only for models with attention (not the embedded EfficientNet).
    "attention_only": {"mode": "standard", "trainable": "attention"},
    "attention_only_taujp": {"mode": "standard", "trainable": "attention", "regularizer": "taujp"},
    "standard_orthoreg": {"mode": "standard", "regularizer": "orthoreg"},
    "attention_only_orthoreg": {"mode": "standard", "trainable": "attention", "regularizer": "orthoreg"},
    "lora": {"mode": "lora"},  # LoRA on the attention projections (rank 8, alpha 16): a standard vector
    "linear_lora": {"mode": "linear_lora"},  # LoRA linearized at PEFT's init (Tang et al. 2024): a linear vector
}
# Regularizers that need nothing of the other tasks: their runs name no protected tasks or factor files.
DATALESS_REGULARIZERS = ("orthoreg", "orthoreg_sq")
DEFAULT_METHODS = ("standard", "linear", "posthoc", "linear_taujp", "linear_kfac")
LAMBDA_CRITERION = (
    "mean validation accuracy of the sum at alpha = 1, each task over its unregularized vector's "
    "(taskarith's criterion; the papers do not say how they chose lambda)"
)


# OrthoReg's lambda has no published value (the paper searches [0.1, 100] on validation): a grid the bench
# chooses from, ten times apart, over the lower end of that range.
ORTHOREG_GRID = (0.1, 1.0, 10.0)


def _published_strengths() -> dict[str, tuple[float, ...]]:
    # One value: no selection. taujp_sq has no published strength; its grid must come from the profile.
    return {**{name: (value,) for name, value in PUBLISHED_STRENGTH.items()}, "orthoreg": ORTHOREG_GRID}


@dataclass(frozen=True)
class BenchProfile:
    tasks: tuple[str, ...]
    control: str
    model: str = "all-MiniLM-L6-v2"  # what the CLI loads unless told otherwise
    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int | None = None  # None: 10% of the steps (the papers: 500 of ~2000)
    seeds: tuple[int, ...] = (0,)
    # lambda per regularizer: one value is used as is (the published ones by default, tuned on CLIP ViT-B/32);
    # several are a grid, chosen per method on the first seed with no alpha tuning (Suite.choose_strength),
    # ties to the smaller lambda, then used for every seed.
    reg_strengths: dict[str, tuple[float, ...]] = field(default_factory=_published_strengths)
    reg_sampling: str = "strict"
    reg_batch_size: int = 16
    reg_control: bool = True  # tau-Jp's regularization set holds the control task's training inputs
    kfac_examples: int = 128
    alpha_grid: tuple[float, ...] = PUBLISHED_ALPHA_GRID
    negation_grid: tuple[float, ...] = PUBLISHED_ALPHA_GRID
    xi_grid: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    eval_limit: int | None = 500  # examples per test split (and val split, unless val_limit says otherwise)
    val_limit: int | None = (
        None  # examples per val split, where alpha, lambda and negation are chosen (None: eval_limit)
    )
    xi_limit: int = 200
    xi_pairs: int | None = None  # how many task pairs get a xi grid (None: all pairs)
    xi_seeds: int | None = None  # how many seeds (the first ones) get xi grids (None: all); xi is a diagnostic
    incremental_methods: tuple[str, ...] = ("linear_taujp",)
    checkpoint_method: str = "linear_taujp"  # how the new task is fine-tuned on top of checkpoints made elsewhere
    # Merging methods compared with the plain sum in task addition (each with its default hyper-parameters,
    # its scaling searched on validation like the sum's alpha); any of taskarith.merging's registry.
    merge_methods: tuple[str, ...] = ()
    # AdaMerging (a learned merge, LEARNED_METHODS): optimizer steps (the paper: 500) and the unlabeled inputs
    # per task it learns on: the first of each test split (the paper's transductive setting), eval_limit of them.
    adamerging_steps: int = 500

    @property
    def choice_limit(self) -> int | None:
        """Examples per validation split: the inputs every choice (alpha, lambda, negation) is made on."""
        return self.eval_limit if self.val_limit is None else self.val_limit

    def __post_init__(self) -> None:
        unknown = [m for m in (*self.methods, *self.incremental_methods, self.checkpoint_method) if m not in METHODS]
        if unknown:
            raise TaskArithError(f"unknown methods {unknown} (known: {', '.join(METHODS)})")
        for name in self.merge_methods:
            if name not in LEARNED_METHODS:
                check_method(name)
        if self.adamerging_steps < 0:
            raise TaskArithError(f"bench option adamerging_steps={self.adamerging_steps} must be >= 0")
        if len(self.tasks) < 2:
            raise TaskArithError(f"the protocol needs at least two tasks, got {list(self.tasks)}")
        if self.control in self.tasks:
            raise TaskArithError(f"control task {self.control!r} must not be one of the fine-tuned tasks")
        if not self.seeds:
            raise TaskArithError("at least one seed is needed")
        for name, limit in (("eval_limit", self.eval_limit), ("val_limit", self.val_limit)):
            if limit is not None and limit < 1:
                raise TaskArithError(f"bench option {name}={limit}: must be at least 1 (None: every example)")
        for name, grid in (
            ("alpha_grid", self.alpha_grid),
            ("negation_grid", self.negation_grid),
            ("xi_grid", self.xi_grid),
        ):
            if not grid or not all(isinstance(a, (int, float)) and math.isfinite(a) for a in grid):
                raise TaskArithError(f"bench option {name}={list(grid)} must be a non-empty list of finite numbers")
        if any(a < 0 for a in self.negation_grid):
            raise TaskArithError(
                f"bench option negation_grid={list(self.negation_grid)}: the grid holds the magnitudes "
                "subtracted (pre - alpha * tau), so no value may be negative"
            )
        for method in {*self.methods, *self.incremental_methods, self.checkpoint_method}:
            regularizer = METHODS[method].get("regularizer")
            grid = self.reg_strengths.get(regularizer, ()) if regularizer else (1.0,)
            if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
                raise TaskArithError(
                    f"method {method!r} needs positive strengths for regularizer {regularizer!r} "
                    f"(reg_strengths has {list(grid)})"
                )


# Deviations of the embedded profiles from the published protocol (each a row of docs/protocol.md): CPU-sized
# runs, lambda chosen on validation from a grid (the published values were tuned on CLIP's 512-d embedding),
# and, in the quick profiles only, coarser alpha grids.
_QUICK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
_TEXT_QUICK = BenchProfile(
    # The demo's few minutes on 2 CPU cores: two tasks from different domains, one seed, 20 steps of batch 8,
    # 50 examples per split; it shows the machinery, not effect sizes.
    tasks=("rt_sentiment", "wordnet_topic"),
    control="fortune_topic",
    steps=20,
    batch_size=8,
    lr=2e-4,
    eval_limit=50,
    xi_limit=50,
    xi_grid=(-1.0, 0.0, 1.0),
    alpha_grid=_QUICK_GRID,
    negation_grid=_QUICK_GRID,
    reg_strengths={"taujp": (1.0,), "taujp_sq": (1.0,), "kfac": (500.0,), "orthoreg": (ORTHOREG_GRID[0],)},
    reg_batch_size=8,
)
_TEXT_FULL = BenchProfile(
    # Meant to fit an hour on 2 CPU cores: three tasks, two of them from one domain (movie reviews), three seeds,
    # 16 steps (20 before the published strict tau-Jp, whose 3 x 16 protected inputs per step made it 70 min),
    # choices made on 60 validation examples per task and tested on 100 (val 150 / test 150 took 78 min and
    # val 100 / test 150 was projected at 65-78 min with the published 21-point grids: evaluation dominates).
    tasks=("rt_sentiment", "rt_subjectivity", "wordnet_topic"),
    control="fortune_topic",
    steps=16,
    batch_size=16,
    lr=2e-4,
    seeds=(0, 1, 2),
    eval_limit=100,
    val_limit=60,
    xi_limit=100,
    xi_grid=(-1.0, -0.5, 0.0, 0.5, 1.0),
    xi_seeds=1,
    xi_pairs=1,
    reg_strengths={
        "taujp": (0.1, 1.0, 10.0),
        "taujp_sq": (0.1, 1.0, 10.0),
        "kfac": (50.0, 500.0, 5000.0),
        "orthoreg": ORTHOREG_GRID,
    },
)
# The embedded vision suite: EfficientNet-Lite0 (ImageNet) at 32 px under frozen linear-probe heads, on
# real image tasks from packages; sklearn's 8x8 digits is the control. Above lr 1e-4 fine-tuning collapses.
# 60 steps a vector (100 before the published strict tau-Jp and the lambda grids); choices made on 150
# validation examples per task and tested on 300 (choosing on 300 as well took 61 min, just over the hour).
_VISION_FULL = BenchProfile(
    tasks=("fashion_mnist", "mnist", "animal_shapes"),
    control="digits",
    model="efficientnet-lite0",
    steps=60,
    batch_size=32,
    lr=1e-4,
    seeds=(0, 1, 2),
    eval_limit=300,
    val_limit=150,
    xi_limit=200,
    xi_grid=(-1.0, -0.5, 0.0, 0.5, 1.0),
    xi_seeds=1,
    xi_pairs=1,
    reg_strengths={
        "taujp": (0.1, 1.0, 10.0),
        "taujp_sq": (0.1, 1.0, 10.0),
        "kfac": (50.0, 500.0, 5000.0),
        "orthoreg": ORTHOREG_GRID,
    },
)
_VISION_QUICK = replace(
    _VISION_FULL,
    tasks=("fashion_mnist", "animal_shapes"),
    steps=60,
    seeds=(0,),
    eval_limit=200,
    xi_limit=100,
    xi_grid=(-1.0, 0.0, 1.0),
    alpha_grid=_QUICK_GRID,
    negation_grid=_QUICK_GRID,
    reg_strengths={"taujp": (1.0,), "taujp_sq": (1.0,), "kfac": (500.0,), "orthoreg": (ORTHOREG_GRID[0],)},
)

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
    # A non-default split rule rides on the spec as "PATH?splits=...".
    return source if source.startswith("torchvision:") or Path(source.partition("?")[0]).exists() else task.name


@dataclass
class Suite:
    pretrained: Pretrained
    tasks: list[Task]
    control: Task
    profile: BenchProfile
    cache_dir: Path
    on_stage: Callable[[str], None] = lambda stage: None
    progress: bool = False  # each fine-tuning run and evaluation draws its own bar (on a terminal)
    finetune_seconds: dict[str, float] = field(default_factory=dict)
    strengths: dict[str, float] = field(default_factory=dict)  # lambda per regularized method, once chosen
    # JVPs of every vector the studies score, so a vector met again (lambda search, then evaluation;
    # incremental runs, then the full method) is not differentiated again. Exact: the same numbers.
    # run_bench empties it between seeds, which share no vector.
    store: TangentStore = field(default_factory=TangentStore)

    def outputs(self, vectors: Mapping[str, TaskVector]) -> EditedOutputs:
        return EditedOutputs(self.pretrained, vectors, store=self.store)

    def kfac_file(self, task: Task) -> Path:
        """The task's K-FAC factors, computed once per base model, sample size and factor format (by the data owner)."""
        from taskarith.kfac import FORMAT, compute_kfac_factors

        version = FORMAT.rsplit("/", 1)[-1]
        path = (
            self.cache_dir
            / "kfac"
            / f"{task.name}-{self.pretrained.base_hash[:12]}-{self.profile.kfac_examples}-v{version}.safetensors"
        )
        if not path.is_file():
            self.on_stage(f"K-FAC factors of {task.name}")
            compute_kfac_factors(self.pretrained, task, num_examples=self.profile.kfac_examples, progress=False).save(
                path
            )
        return path

    def merge_statistics(self, method: str, task: Task, vector: TaskVector) -> tuple[MergeStatistics, bool]:
        """(the statistics ``method`` needs of ``vector``'s model on ``task``, read from the cache?): computed once
        per vector content, mode, task, base and settings, as K-FAC factors are. A cache file that cannot be
        read (damaged) is computed again and replaced: the cache folder is the bench's own."""
        version = STATISTICS_FORMAT.rsplit("/", 1)[-1]
        settings = {
            "gram": method == "regmean",
            "fisher": method == "fisher",
            "num_examples": DEFAULT_STATISTICS_EXAMPLES,
            "max_length": self.pretrained.max_length,
            "computation": STATISTICS_COMPUTATION,
        }
        digest = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=6).hexdigest()
        name = (
            f"{task.name}-{task.fingerprint}-{self.pretrained.base_hash[:12]}-{vector.mode}-"
            f"{state_hash(vector.deltas)}-{method}-{digest}-v{version}.safetensors"
        )
        path = self.cache_dir / "statistics" / name
        if path.is_file():
            try:
                return MergeStatistics.load(path), True
            except TaskArithError:
                self.on_stage(f"statistics cache file {path.name} unreadable: computing it again")
        stats = compute_merge_statistics(
            self.pretrained,
            task,
            vector,
            gram=method == "regmean",
            fisher=method == "fisher",
            num_examples=DEFAULT_STATISTICS_EXAMPLES,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
        return stats, False

    def protected(self, method: str, task: Task, seen: Sequence[Task]) -> list[Task]:
        """What a regularized run of ``method`` on ``task`` protects: ``seen`` (the other tasks), plus the control
        for tau-Jp when the profile says so (the published regularization set includes the negation control)."""
        regularizer = METHODS[method].get("regularizer")
        others = [t for t in seen if t is not task]
        if regularizer in ("taujp", "taujp_sq") and self.profile.reg_control:
            others.append(self.control)
        return others

    def config(
        self, method: str, task: Task, protected: Sequence[Task], seed: int, strength: float | None = None
    ) -> FinetuneConfig:
        settings = {k: v for k, v in METHODS[method].items() if k != "evaluate_as"}
        regularizer = settings.get("regularizer")
        p = self.profile
        if regularizer is None or not protected:
            settings.pop("regularizer", None)  # nothing to protect: the run is the plain one (and shares its cache)
        else:
            settings["reg_strength"] = strength if strength is not None else self.strength(method)
            if regularizer in DATALESS_REGULARIZERS:
                pass
            elif regularizer == "kfac":
                settings["reg_factors"] = tuple(str(self.kfac_file(t)) for t in protected)
            else:
                settings.update(
                    reg_tasks=tuple(_spec(t) for t in protected),
                    reg_batch_size=p.reg_batch_size,
                    reg_sampling=p.reg_sampling,
                )
        return FinetuneConfig(
            task=task.name,
            model=self.pretrained.name,
            steps=p.steps,
            batch_size=p.batch_size,
            lr=p.lr,
            warmup_steps=p.warmup_steps,
            seed=seed,
            checkpoint_every=0,
            **settings,
        )

    def strength(self, method: str) -> float:
        regularizer = METHODS[method]["regularizer"]
        if method in self.strengths:
            return self.strengths[method]
        grid = self.profile.reg_strengths[regularizer]
        if len(grid) > 1:
            raise TaskArithError(f"lambda of {method} has not been chosen from {list(grid)} yet")
        return grid[0]

    def vector(
        self, method: str, task: Task, protected: Sequence[Task], seed: int, strength: float | None = None
    ) -> TaskVector:
        config = self.config(method, task, protected, seed, strength)
        protecting = "no data" if config.regularizer in DATALESS_REGULARIZERS else f"protecting {len(protected)}"
        label = f"{method}, {task.name}" + (
            f", {protecting}, lambda {config.reg_strength:g}" if config.regularizer else ""
        )
        self.on_stage(f"fine-tuning ({label}, seed {seed})")
        # K-FAC factor paths live in the cache folder: key the run on their content, not their location.
        key = run_key(
            replace(config, reg_factors=tuple(Path(f).name for f in config.reg_factors)), self.pretrained.base_hash
        )
        result = finetune_cached(
            config, self.pretrained, task, self.cache_dir / "vectors", progress=self.progress, key=key
        )
        self.finetune_seconds[f"{method}/{task.name}/{key}"] = result.record["train_seconds"]
        evaluate_as = METHODS[method].get("evaluate_as")
        return result.task_vector.with_mode(evaluate_as) if evaluate_as else result.task_vector

    def vectors(self, method: str, seed: int, strength: float | None = None) -> dict[str, TaskVector]:
        """One vector per suite task, each protecting the others (and the control, for tau-Jp)."""
        return {
            t.name: self.vector(method, t, self.protected(method, t, self.tasks), seed, strength) for t in self.tasks
        }

    def choose_strength(self, method: str, seed: int) -> dict[str, Any]:
        """lambda for ``method``, chosen with no alpha tuning: the grid value whose vectors, summed at alpha = 1,
        give the best mean validation accuracy, each task's accuracy divided by that of the *unregularized*
        vector of the same mode alone (ties to the smaller lambda).

        The denominator does not depend on lambda on purpose: dividing by each lambda's own single-task
        accuracy would reward a lambda so large that the task is barely learnt (the sum then matches the
        barely-changed single vectors and scores near 1)."""
        regularizer = METHODS[method].get("regularizer")
        if regularizer is None:
            return {}
        grid = tuple(sorted(self.profile.reg_strengths[regularizer]))
        if len(grid) == 1:
            self.strengths[method] = grid[0]
            return {"grid": list(grid), "chosen": grid[0], "criterion": "fixed"}
        limit, names = self.profile.choice_limit, [t.name for t in self.tasks]
        plain = self.outputs({t.name: self.vector(method, t, (), seed) for t in self.tasks})
        reference = {t.name: plain.accuracy(t, "val", ((t.name, 1.0),), limit) for t in self.tasks}
        check_reference(reference, f"the accuracy of its unregularized {METHODS[method]['mode']} vector")
        scores = {}
        for strength in grid:
            outputs = self.outputs(self.vectors(method, seed, strength))
            merged = {t.name: outputs.accuracy(t, "val", _edit(names, 1.0), limit) for t in self.tasks}
            scores[strength] = mean(normalized_accuracy(merged, reference).values())
        chosen = best_normalized_alpha(grid, lambda v: scores[v])
        self.strengths[method] = chosen
        return {
            "grid": list(grid),
            "val_normalized_alpha_1": {str(k): v for k, v in scores.items()},
            "unregularized_val": reference,
            "chosen": chosen,
            "seed": seed,
            "criterion": LAMBDA_CRITERION,
        }


# -------------------------------------------------------------------------------------------------
# Evaluation of one method's vectors


def _edit(names: Sequence[str], alpha: float) -> tuple[tuple[str, float], ...]:
    return tuple((name, alpha) for name in names)


def _addition(
    outputs: EditedOutputs,
    tasks: Sequence[Task],
    finetuned: Mapping[str, float],
    names: Sequence[str],
    alpha: float,
    limit: int | None,
) -> dict[str, Any]:
    """Test accuracy of pre + alpha * (sum of the vectors ``names``), absolute and normalized by fine-tuned."""
    accuracy = {t.name: outputs.accuracy(t, "test", _edit(names, alpha), limit) for t in tasks}
    normalized = normalized_accuracy(accuracy, finetuned)
    return {
        "alpha": alpha,
        "accuracy": accuracy,
        "normalized": normalized,
        "mean_accuracy": mean(accuracy.values()),
        "mean_normalized": mean(normalized.values()),
    }


def _addition_with_search(
    outputs: EditedOutputs,
    tasks: Sequence[Task],
    finetuned: Mapping[str, float],
    finetuned_val: Mapping[str, float],
    names: Sequence[str],
    grid: Sequence[float],
    limit: int | None,
    val_limit: int | None,
) -> dict[str, Any]:
    """Addition at alpha = 1 (untuned) and at the alpha of ``grid`` chosen as published: the best mean
    normalized validation accuracy (each task over its own vector's validation accuracy), ties to the smallest."""
    check_reference(finetuned_val, "the accuracy of its own vector")
    val_curve = {
        alpha: {t.name: outputs.accuracy(t, "val", _edit(names, alpha), val_limit) for t in tasks} for alpha in grid
    }
    normalized_curve = {
        alpha: mean(normalized_accuracy(acc, finetuned_val).values()) for alpha, acc in val_curve.items()
    }
    chosen = best_normalized_alpha(grid, lambda a: normalized_curve[a])
    return {
        "alpha_1": _addition(outputs, tasks, finetuned, names, 1.0, limit),
        "alpha_searched": _addition(outputs, tasks, finetuned, names, chosen, limit),
        "val_curve": {str(a): mean(v.values()) for a, v in val_curve.items()},
        "val_normalized_curve": {str(a): v for a, v in normalized_curve.items()},
    }


def evaluate_vectors(suite: Suite, vectors: Mapping[str, TaskVector], with_xi: bool = True) -> dict[str, Any]:
    """Addition, negation, disentanglement (unless ``with_xi`` is false) and pairwise interference of one method's vectors."""
    p, tasks, control = suite.profile, suite.tasks, suite.control
    names = [t.name for t in tasks]
    mode = next(iter(vectors.values())).mode if vectors else ""
    # Each merging method's merge of the vectors, under a name no task can have, beside the vectors themselves.
    merged, merge_cost, not_applicable = {}, {}, {}
    for method in p.merge_methods:
        started = time.perf_counter()
        statistics_of, cached = None, 0
        if method in LEARNED_METHODS or method in STATISTICS:  # minutes each: say what runs
            suite.on_stage(f"merging {mode} vectors by {method}")
        if method in LEARNED_METHODS:
            config = AdaMergingConfig(granularity=LEARNED_METHODS[method], steps=p.adamerging_steps)
            learned = adamerge_tasks(
                [vectors[n] for n in names], suite.pretrained, tasks, "test", config, limit=p.eval_limit
            )
            merged[f"{method}()"] = learned.vector
            record = learned.record()
            merge_cost[method] = {
                **record["cost"],
                "transductive": record["transductive"],
                "coefficients": record["coefficients"],
                "groups": len(record["groups"]),
            }
            continue
        if method in STATISTICS:
            # A linear-mode vector's statistics are f_lin's: pre-trained Grams, the Fisher in delta.
            try:
                read = [suite.merge_statistics(method, t, vectors[t.name]) for t in tasks]
            except TaskArithError as exc:  # e.g. RegMean on a CNN: no linear layer to take a Gram of
                not_applicable[method] = str(exc)
                continue
            statistics_of = [stats for stats, _ in read]
            cached = sum(from_cache for _, from_cache in read)
        merged[f"{method}()"] = merge_task_vectors([vectors[n] for n in names], method, statistics=statistics_of)
        merge_cost[method] = {
            "seconds": round(time.perf_counter() - started, 3),
            # Passes through the network to collect the statistics: one per example and task (the Fisher's
            # also a backward pass); the data-free methods need none.
            "statistics_examples": sum(s.examples for s in statistics_of) if statistics_of else 0,
            # Statistics read from the cache (an earlier run computed them) cost no pass now: seconds exclude them.
            **({"statistics_from_cache": cached} if statistics_of else {}),
        }
    outputs = suite.outputs({**vectors, **merged})
    limit, val_limit = p.eval_limit, p.choice_limit
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))][: p.xi_pairs] if with_xi else []
    # single-task, addition, each merge, each negation, interference, each xi pair, tau-Jp
    bar = tqdm(
        total=3 + len(merged) + len(tasks) + len(pairs) + 1,
        desc=f"evaluate ({mode})",
        unit="part",
        leave=False,
        disable=not suite.progress,
    )

    finetuned = {t.name: outputs.accuracy(t, "test", ((t.name, 1.0),), limit) for t in tasks}
    finetuned_val = {t.name: outputs.accuracy(t, "val", ((t.name, 1.0),), val_limit) for t in tasks}
    bar.update()
    # Task addition: one alpha for the sum, chosen on validation, and alpha = 1 untuned.
    addition = _addition_with_search(outputs, tasks, finetuned, finetuned_val, names, p.alpha_grid, limit, val_limit)
    bar.update()
    merging: dict[str, Any] = {}
    for method in merge_cost:
        # A learned merge's coefficients are its scaling: it is read at alpha = 1 only.
        grid = (1.0,) if method in LEARNED_METHODS else p.alpha_grid
        merging[method] = _addition_with_search(
            outputs, tasks, finetuned, finetuned_val, [f"{method}()"], grid, limit, val_limit
        )
        merging[method]["cost"] = merge_cost[method]
        bar.update()
    if not_applicable:
        merging["not_applicable"] = not_applicable

    # Task negation: the largest drop on the target that keeps control >= 95% of its pre-trained accuracy
    # (validation); alpha = 0 always qualifies, so every seed has an answer.
    control_floor = CONTROL_KEEP * outputs.accuracy(control, "val", (), val_limit)
    negation = {}
    for t in tasks:

        def target(a: float, t: Task = t) -> float:
            return outputs.accuracy(t, "val", ((t.name, -a),), val_limit)

        def kept(a: float, t: Task = t) -> float:
            return outputs.accuracy(control, "val", ((t.name, -a),), val_limit)

        best = control_constrained_alpha(p.negation_grid, target, kept, control_floor)
        negation[t.name] = {
            label: {
                "alpha": alpha,
                "target": outputs.accuracy(t, "test", ((t.name, -alpha),), limit),
                "control": outputs.accuracy(control, "test", ((t.name, -alpha),), limit),
            }
            for label, alpha in (("alpha_1", 1.0), ("alpha_searched", best))
        }
        bar.update()

    # Pairwise interference: the drop of task j's accuracy when task i's vector joins its own.
    drops = [
        [
            math.nan
            if i == j
            else finetuned[tj.name] - outputs.accuracy(tj, "test", ((tj.name, 1.0), (ti.name, 1.0)), limit)
            for j, tj in enumerate(tasks)
        ]
        for i, ti in enumerate(tasks)
    ]
    bar.update()

    # Weight disentanglement error over a grid, for every pair of tasks.
    xi = {}
    for i, j in pairs:
        xi[f"{names[i]}+{names[j]}"] = disentanglement_error(
            outputs, (tasks[i], tasks[j]), (names[i], names[j]), p.xi_grid, "test", p.xi_limit
        )
        bar.update()

    # The same quantities as `taskarith interference` (validation inputs), from the cached JVPs: tau-Jp as
    # published (mean unsquared norm) and its square.
    taujp = [[outputs.taujp(ti.name, tj, "val", val_limit) for tj in tasks] for ti in tasks]
    taujp_sq = [[outputs.taujp_sq(ti.name, tj, "val", val_limit) for tj in tasks] for ti in tasks]
    bar.update()
    bar.close()
    return {
        "finetuned": finetuned,
        "addition": addition,
        "merging": merging,
        "negation": negation,
        "interference_drop": drops,
        "xi": xi,
        "xi_mean": mean(v for grid in xi.values() for row in grid for v in row) if xi else math.nan,
        "taujp": taujp,
        "taujp_sq": taujp_sq,
        "encoder_passes": outputs.passes,
    }


# -------------------------------------------------------------------------------------------------
# Incremental learning


def incremental(suite: Suite, method: str, seed: int) -> dict[str, Any]:
    """Tasks arrive in order; task k is regularized against tasks 1..k-1 only (and, for tau-Jp, the control,
    which is always at hand, like ImageNet in the papers). Accuracy of the running sum at alpha = 1."""
    tasks, limit = suite.tasks, suite.profile.eval_limit
    # Vector k never depends on the accuracies after earlier arrivals, so all are fine-tuned first and one
    # EditedOutputs scores every prefix: each (vector, task) JVP is computed once, not once per arrival.
    vectors = {
        task.name: suite.vector(method, task, suite.protected(method, task, tasks[:k]), seed)
        for k, task in enumerate(tasks)
    }
    outputs = suite.outputs(vectors)
    after = []
    for k, task in enumerate(tasks):
        seen = tasks[: k + 1]
        accuracy = {t.name: outputs.accuracy(t, "test", _edit([s.name for s in seen], 1.0), limit) for t in seen}
        after.append({"arrived": task.name, "accuracy": accuracy, "mean_accuracy": mean(accuracy.values())})
    return {"method": method, "after_each_arrival": after}


# -------------------------------------------------------------------------------------------------
# Random-initialization control

RANDOM_INIT_METHODS = ("standard", "linear")
LEARNT_ABOVE_CHANCE = 0.10  # fine-tuning must reach chance + 10 points on every task for a verdict


def random_init_study(suite: Suite, seed: int) -> dict[str, Any]:
    """The protocol's unregularized methods from a randomly initialized model of the same architecture.

    The tangent paper's claim is that weight disentanglement comes from pre-training, so task arithmetic
    should fail from a random start. The heads are random too (built by the random encoder), so the study
    first asks whether fine-tuning learnt the tasks at all: below chance + 10 points on any task, addition
    and negation numbers measure nothing, and the study says it is not applicable.
    """
    methods = {
        method: evaluate_vectors(suite, suite.vectors(method, seed), with_xi=False) for method in RANDOM_INIT_METHODS
    }
    chance = {t.name: 1 / len(t.classes) for t in suite.tasks}
    unlearnt = sorted(
        f"{name} {100 * accuracy:.1f}% (chance {100 * chance[name]:.1f}%)"
        for name, accuracy in methods["linear"]["finetuned"].items()
        if accuracy < chance[name] + LEARNT_ABOVE_CHANCE
    )
    why = (
        (
            f"linear fine-tuning from random init stays within {100 * LEARNT_ABOVE_CHANCE:.0f} points of chance on "
            + ", ".join(unlearnt)
        )
        if unlearnt
        else ""
    )
    return {
        "model": suite.pretrained.name,
        "methods": methods,
        "chance": chance,
        "applicable": not unlearnt,
        "why": why,
    }


# -------------------------------------------------------------------------------------------------
# Fine-tuned checkpoints made elsewhere


def existing_checkpoints(
    suite: Suite, checkpoints: Sequence[tuple[Task, str | Path]], new_task: Task, seed: int = 0
) -> dict[str, Any]:
    """Vectors of public checkpoints ((task, model folder) pairs), their tau-Jp, and a new task added to them.

    The new task is fine-tuned twice with the profile's ``checkpoint_method`` (by default the published one,
    linear fine-tuning + tau-Jp) and its unregularized mode: with the penalty against the checkpoint tasks'
    inputs and without. Each is added (alpha = 1) to the sum of the checkpoint vectors. The checkpoints are
    non-linear fine-tunes; for a linear-mode method they are read through f_lin (post-hoc linearization), so
    that all vectors edit one function.
    """
    tasks = [task for task, _ in checkpoints]
    if new_task.name in {task.name for task in tasks}:
        raise TaskArithError(f"the new task {new_task.name!r} already has a checkpoint")
    method = suite.profile.checkpoint_method
    mode = METHODS[method]["mode"]
    vectors = {
        task.name: TaskVector.from_finetuned_checkpoint(suite.pretrained.encoder, path, task=task.name).with_mode(mode)
        for task, path in checkpoints
    }
    new = {
        "plain": suite.vector(mode, new_task, [], seed),
        "taujp": suite.vector(method, new_task, suite.protected(method, new_task, tasks), seed),
    }
    limit = suite.profile.eval_limit
    everyone = [*tasks, new_task]
    result: dict[str, Any] = {
        "checkpoints": {task.name: str(path) for task, path in checkpoints},
        "new_task": new_task.name,
        "method": method,
        "checkpoints_read_as": "post-hoc linearized" if mode == "linear" else "weights",
    }
    existing = suite.outputs(vectors)
    val_limit = suite.profile.choice_limit
    result["taujp"] = [[existing.taujp(ti.name, tj, "val", val_limit) for tj in tasks] for ti in tasks]
    result["finetuned"] = {t.name: existing.accuracy(t, "test", ((t.name, 1.0),), limit) for t in tasks}
    result["merged_existing"] = {t.name: existing.accuracy(t, "test", _edit(list(vectors), 1.0), limit) for t in tasks}
    for label, tau in new.items():
        outputs = suite.outputs({**vectors, new_task.name: tau})
        merged = _edit([*vectors, new_task.name], 1.0)
        accuracy = {t.name: outputs.accuracy(t, "test", merged, limit) for t in everyone}
        result[f"with_new_{label}"] = {
            "accuracy": accuracy,
            "mean_accuracy": mean(accuracy.values()),
            "new_task_alone": outputs.accuracy(new_task, "test", ((new_task.name, 1.0),), limit),
            "taujp_on_checkpoint_tasks": {t.name: outputs.taujp(new_task.name, t, "val", val_limit) for t in tasks},
        }
    return result


# -------------------------------------------------------------------------------------------------
# The whole protocol


def _spread(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }


def summarize(per_seed: Mapping[int, Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of the headline numbers, per method."""
    seeds = list(per_seed)
    summary: dict[str, Any] = {}
    for method in methods:
        runs = [per_seed[s]["methods"][method] for s in seeds]
        entry: dict[str, Any] = {
            "finetuned_mean": _spread([mean(r["finetuned"].values()) for r in runs]),
            "xi_mean": _spread([r["xi_mean"] for r in runs]),
        }
        for label in ("alpha_1", "alpha_searched"):
            entry[f"addition_{label}_accuracy"] = _spread([r["addition"][label]["mean_accuracy"] for r in runs])
            entry[f"addition_{label}_normalized"] = _spread([r["addition"][label]["mean_normalized"] for r in runs])
            entry[f"negation_{label}_target"] = _spread(
                [mean(n[label]["target"] for n in r["negation"].values()) for r in runs]
            )
            entry[f"negation_{label}_control"] = _spread(
                [mean(n[label]["control"] for n in r["negation"].values()) for r in runs]
            )
        entry["addition_alpha_chosen"] = [r["addition"]["alpha_searched"]["alpha"] for r in runs]
        entry["negation_alpha_chosen"] = [
            {t: n["alpha_searched"]["alpha"] for t, n in r["negation"].items()} for r in runs
        ]
        entry["merging"] = {
            merge: {
                **{
                    f"{label}_normalized": _spread([r["merging"][merge][label]["mean_normalized"] for r in runs])
                    for label in ("alpha_1", "alpha_searched")
                },
                "alpha_chosen": [r["merging"][merge]["alpha_searched"]["alpha"] for r in runs],
                "seconds": _spread([r["merging"][merge].get("cost", {}).get("seconds", math.nan) for r in runs]),
            }
            for merge in runs[0].get("merging", {})
            if merge != "not_applicable"
        }
        xs = [x for r in runs for x in off_diagonal(r["taujp"])]
        ys = [y for r in runs for y in off_diagonal(r["interference_drop"])]
        entry["taujp_vs_drop"] = correlation(xs, ys)
        entry["taujp_sq_vs_drop"] = correlation([x for r in runs for x in off_diagonal(r["taujp_sq"])], ys)
        summary[method] = entry
    xs = [x for s in seeds for m in methods for x in off_diagonal(per_seed[s]["methods"][m]["taujp"])]
    ys = [y for s in seeds for m in methods for y in off_diagonal(per_seed[s]["methods"][m]["interference_drop"])]
    summary["taujp_vs_drop_all_methods"] = correlation(xs, ys)
    return summary


def _planned_work(
    profile: BenchProfile, tasks: int, regularized: Sequence[str], checkpoints: bool, random_init: bool, ntk: bool
) -> tuple[dict[str, float], float]:
    """The work of one occurrence of each stage of :func:`run_bench`, in vectors fine-tuned or evaluated (one
    unit each), and the total over the run: what the estimate of the time left is scaled by. Vectors that
    another stage already made (post-hoc reuses standard's; the chosen lambda's first-seed vectors) count as
    requested: those stages just finish early, and the estimate follows."""
    weights: dict[str, float] = {}
    for method in regularized:
        grid = len(profile.reg_strengths[METHODS[method]["regularizer"]])
        weights[f"lambda {method}"] = float((grid + 1) * tasks) if grid > 1 else 0.0
    for method in profile.methods:
        weights[f"fine-tuning {method}"] = 0.0 if METHODS[method].get("evaluate_as") else float(tasks)
    weights.update(evaluating=float(tasks), incremental=float(tasks), checkpoints=2.0, ntk=2.0 * tasks)
    weights["random init"] = 4.0 * tasks  # two methods, each fine-tuned and evaluated
    seeds = len(profile.seeds)
    incremental_runs = len(set(profile.incremental_methods) | {METHODS[m]["mode"] for m in profile.incremental_methods})
    total = (
        sum(weights[f"lambda {m}"] for m in regularized)
        + seeds * sum(weights[f"fine-tuning {m}"] + weights["evaluating"] for m in profile.methods)
        + seeds * incremental_runs * weights["incremental"]
        + (seeds * weights["random init"] if random_init else 0.0)
        + (weights["checkpoints"] if checkpoints else 0.0)
        + (weights["ntk"] if ntk else 0.0)
    )
    return weights, total


def run_bench(
    pretrained: Pretrained,
    tasks: Sequence[Task],
    control: Task,
    profile: BenchProfile,
    cache_dir: str | Path,
    on_stage: Callable[[str], None] = lambda stage: None,
    checkpoints: Sequence[tuple[Task, str | Path]] = (),
    new_task: Task | None = None,
    random_model: Pretrained | None = None,
    ntk_examples: int = 0,
    progress: StageProgress | None = None,
) -> dict[str, Any]:
    """Every method, seed and measurement of the protocol; plain data for results.json and the report.

    ``checkpoints`` ((task, fine-tuned model folder made elsewhere) pairs) adds the public-checkpoint study,
    with ``new_task`` (default: the first suite task without a checkpoint) fine-tuned on top of them.
    ``random_model`` (the architecture with random weights) adds the random-initialization control.
    ``ntk_examples`` > 0 adds the NTK localization study on that many test inputs of the first two tasks,
    for the pre-trained model and a random one (``random_model`` or a fresh one).
    ``progress`` receives the stages (instead of ``on_stage``) and the share of the planned work each was.
    """
    if progress is not None:
        on_stage = progress.stage
    bars = progress is not None and progress.bars
    suite = Suite(pretrained, list(tasks), control, profile, Path(cache_dir), on_stage, progress=bars)
    for method in {*profile.methods, *profile.incremental_methods, profile.checkpoint_method}:
        # A subset the model does not have (attention on a CNN) is refused now, not after the other methods ran.
        settings = METHODS[method]
        lora = settings["mode"] in ("lora", "linear_lora")  # LoRA's targets default to the attention projections
        spec = settings.get("trainable", "attention" if lora else None)
        names = set(trainable_parameters(pretrained.encoder, spec, model_name=pretrained.name))
        matrices = [n for n, p in pretrained.encoder.named_parameters() if n in names and p.dim() == 2]
        if settings.get("regularizer") in DATALESS_REGULARIZERS and not matrices:
            raise TaskArithError(
                f"method {method!r}: OrthoReg regularizes weight matrices and {shown(pretrained.name)} trains none "
                "(a CNN's kernels are 4-D): leave the method out for this model"
            )
    ntk_models: dict[str, Pretrained] = {}
    if ntk_examples:  # built and checked now, so a study that cannot run fails before the fine-tuning, not after
        from taskarith.models import reinitialized
        from taskarith.ntk import check_ntk_study

        ntk_models = {
            "pretrained": pretrained,
            "random_init": random_model or reinitialized(pretrained, profile.seeds[0]),
        }
        check_ntk_study(ntk_models, list(tasks[:2]), examples=ntk_examples)
    started = time.perf_counter()
    zero_shot_outputs = suite.outputs({})
    zero_shot = {t.name: zero_shot_outputs.accuracy(t, "test", (), profile.eval_limit) for t in [*tasks, control]}
    per_seed: dict[int, dict[str, Any]] = {}
    # Where the time goes (fine-tuning includes the cache's loads), so a profile can be sized to a budget.
    stage_seconds: dict[str, float] = {}

    def timed(stage: str, weight: float, work: Callable[..., Any], *args: Any) -> Any:
        begun = time.perf_counter()
        value = work(*args)
        stage_seconds[stage] = round(stage_seconds.get(stage, 0.0) + time.perf_counter() - begun, 1)
        if progress is not None:
            progress.advance(weight)
        return value

    # lambda of each regularized method, chosen once on the first seed (or fixed by the profile).
    regularized = [
        m
        for m in dict.fromkeys(
            (*profile.methods, *profile.incremental_methods, *((profile.checkpoint_method,) if checkpoints else ()))
        )
        if METHODS[m].get("regularizer")
    ]
    plan, planned = _planned_work(
        profile, len(tasks), regularized, bool(checkpoints), random_model is not None, bool(ntk_models)
    )
    if progress is not None:
        progress.start(planned)
    strength_selection = {}
    for method in regularized:
        on_stage(f"choosing lambda of {method} on validation")
        strength_selection[method] = timed(
            f"choosing lambda {method}", plan[f"lambda {method}"], suite.choose_strength, method, profile.seeds[0]
        )
    for position, seed in enumerate(profile.seeds):
        if position:  # no vector is shared across seeds: let the previous seed's JVPs go
            suite.store = TangentStore()
        with_xi = profile.xi_seeds is None or position < profile.xi_seeds
        methods = {}
        for method in profile.methods:
            vectors = timed(f"fine-tuning {method}", plan[f"fine-tuning {method}"], suite.vectors, method, seed)
            on_stage(f"evaluating {method} (seed {seed})")
            methods[method] = timed(
                f"evaluating {method}", plan["evaluating"], evaluate_vectors, suite, vectors, with_xi
            )
        runs = {
            method: timed("incremental", plan["incremental"], incremental, suite, method, seed)
            for method in profile.incremental_methods
        }
        # The unregularized counterpart: the same method's mode without a regularizer.
        for method in profile.incremental_methods:
            plain = METHODS[method]["mode"]
            if plain not in runs:
                runs[plain] = timed("incremental", plan["incremental"], incremental, suite, plain, seed)
        per_seed[seed] = {"methods": methods, "incremental": runs}
        if random_model is not None:
            on_stage(f"random-initialization control (seed {seed})")
            random_suite = Suite(random_model, list(tasks), control, profile, Path(cache_dir), on_stage, progress=bars)
            per_seed[seed]["random_init"] = timed(
                "random init", plan["random init"], random_init_study, random_suite, seed
            )
    studies = {}
    if checkpoints:
        covered = {task.name for task, _ in checkpoints}
        if new_task is None:
            new_task = next((t for t in tasks if t.name not in covered), None)
        if new_task is None:
            raise TaskArithError("every suite task has a checkpoint; name a new task to add to them")
        on_stage(f"existing checkpoints of {', '.join(sorted(covered))}, adding {new_task.name}")
        studies["existing_checkpoints"] = timed(
            "checkpoints", plan["checkpoints"], existing_checkpoints, suite, checkpoints, new_task, profile.seeds[0]
        )
    if ntk_models:
        from taskarith.ntk import ntk_study

        studies["ntk"] = timed(
            "ntk",
            plan["ntk"],
            lambda: ntk_study(ntk_models, list(tasks[:2]), examples=ntk_examples, progress=bars, on_stage=on_stage),
        )
    if progress is not None:
        progress.close()
    result = {
        **studies,
        "model": {"name": pretrained.name, "hash": pretrained.base_hash},
        "profile": asdict(profile),
        "tasks": [t.name for t in tasks],
        "control_task": control.name,
        "num_classes": {t.name: len(t.classes) for t in [*tasks, control]},
        "reg_strength_selection": strength_selection,
        "zero_shot": zero_shot,
        "per_seed": {str(seed): value for seed, value in per_seed.items()},
        "summary": summarize(per_seed, profile.methods),
        "finetune_seconds": suite.finetune_seconds,
        "stage_seconds": stage_seconds,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    result["claims"] = ledger(result)
    return result
