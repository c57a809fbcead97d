"""Merging task vectors and whole checkpoints: a registry of methods, streamed merges, YAML recipes.

>>> merged = merge_task_vectors([tau_a, tau_b], "ties", density=0.2)
>>> merge_checkpoints("pretrained/", ["ft-a/", "ft-b/"], "merged/", "ties", density=0.2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskarith.lazy import lazy_exports

# Imported on first use (PEP 562): a streamed task-arithmetic or TIES merge of checkpoints never needs
# torch, and importing the methods module would import it.
_EXPORTS: dict[str, str] = {
    "DEFAULTS": "taskarith.merging.hyperparameters",
    "HYPERPARAMETERS": "taskarith.merging.hyperparameters",
    "check_hyperparameters": "taskarith.merging.hyperparameters",
    "MERGE_METHODS": "taskarith.merging.methods",
    "get_merge_method": "taskarith.merging.methods",
    "merge_task_vectors": "taskarith.merging.methods",
    "parameter_generator": "taskarith.merging.methods",
    "MergeRecipe": "taskarith.merging.recipe",
    "load_recipe": "taskarith.merging.recipe",
    "run_recipe": "taskarith.merging.recipe",
    "CheckpointIndex": "taskarith.merging.streaming",
    "merge_checkpoints": "taskarith.merging.streaming",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


if TYPE_CHECKING:
    from taskarith.merging.hyperparameters import DEFAULTS, HYPERPARAMETERS, check_hyperparameters
    from taskarith.merging.methods import MERGE_METHODS, get_merge_method, merge_task_vectors, parameter_generator
    from taskarith.merging.recipe import MergeRecipe, load_recipe, run_recipe
    from taskarith.merging.streaming import CheckpointIndex, merge_checkpoints
