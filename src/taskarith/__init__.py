"""taskarith: edit pre-trained networks by task arithmetic.

>>> pre = load_pretrained()
>>> tau = TaskVector.load("runs/rt_sentiment/task_vector.safetensors")
>>> edited = pre.encoder + 0.5 * tau
"""

__version__ = "0.1.0"

# `finetune` the function stays in `taskarith.finetune`: exporting it here would shadow the module.

from taskarith.data import Task, load_task, task_from_file  # noqa: E402
from taskarith.errors import TaskArithError  # noqa: E402
from taskarith.evaluate import accuracies, accuracy, edited_encoder  # noqa: E402
from taskarith.finetune import FinetuneConfig  # noqa: E402
from taskarith.models import Pretrained, load_pretrained  # noqa: E402
from taskarith.vectors import TaskVector, combine, cosine_similarity_matrix  # noqa: E402

__all__ = [
    "FinetuneConfig",
    "Pretrained",
    "Task",
    "TaskArithError",
    "TaskVector",
    "accuracies",
    "accuracy",
    "combine",
    "cosine_similarity_matrix",
    "edited_encoder",
    "load_pretrained",
    "load_task",
    "task_from_file",
]
