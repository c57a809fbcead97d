"""taskarith: edit pre-trained networks by task arithmetic.

>>> pre = load_pretrained()
>>> tau = TaskVector.load("runs/rt_sentiment/task_vector.safetensors")
>>> edited = pre.encoder + 0.5 * tau
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskarith.lazy import lazy_exports

__version__ = "0.2.0"

# Names are imported on first use (PEP 562), so `taskarith merge` or `import taskarith.vectors` does not
# pay for transformers. `finetune` the function stays in `taskarith.finetune`: exporting it here would
# shadow the module.
_EXPORTS: dict[str, str] = {
    "FinetuneConfig": "taskarith.finetune",
    "Pretrained": "taskarith.models",
    "Task": "taskarith.data",
    "TaskArithError": "taskarith.errors",
    "TaskVector": "taskarith.vectors",
    "accuracies": "taskarith.evaluate",
    "accuracy": "taskarith.evaluate",
    "combine": "taskarith.vectors",
    "cosine_similarity_matrix": "taskarith.vectors",
    "edited_encoder": "taskarith.evaluate",
    "load_pretrained": "taskarith.models",
    "load_task": "taskarith.data",
    "merge_checkpoints": "taskarith.merging",
    "merge_task_vectors": "taskarith.merging",
    "task_from_file": "taskarith.data",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


if TYPE_CHECKING:
    from taskarith.data import Task, load_task, task_from_file
    from taskarith.errors import TaskArithError
    from taskarith.evaluate import accuracies, accuracy, edited_encoder
    from taskarith.finetune import FinetuneConfig
    from taskarith.merging import merge_checkpoints, merge_task_vectors
    from taskarith.models import Pretrained, load_pretrained
    from taskarith.vectors import TaskVector, combine, cosine_similarity_matrix
