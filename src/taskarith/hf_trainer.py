"""Tangent-space fine-tuning and interference penalties inside an ordinary Hugging Face ``Trainer`` run.

    trainer = TaskArithTrainer(
        model=model,                       # any transformers model (or nn.Module) returning logits
        args=TrainingArguments(...),       # gradient accumulation, resume, torchrun/accelerate, bf16: as usual
        train_dataset=train,
        linearize=True,                    # train f_lin: only delta = theta - theta0 trains
        trainable="attention",             # optional subset (a preset or a regular expression)
        penalty=TauJp(model, other_inputs, collate=collate),  # or KFACPenalty(...), OrthoReg()
        reg_strength=0.1,
        task="sst2",
    )
    trainer.train()
    trainer.save_task_vector("sst2.safetensors")

A ``Trainer`` subclass rather than a callback: a callback cannot change the loss, and overriding
``compute_loss`` is how transformers expects a loss term to be added. The loss of a step is the task's
cross-entropy on the logits (of f_lin when linearized; the model's own loss otherwise) plus
``reg_strength * penalty(delta, global_step)``, a per-micro-batch mean, so gradient accumulation of
2 x B equals one batch of 2B. The penalty draws its inputs from the global step, so a resumed run sees the
same inputs; under several processes every process computes the whole penalty and DDP's averaging of
the gradients leaves it counted once. Mixed precision is the Trainer's (its autocast wraps the JVP too).

Weight decay when linearized (``weight_decay_on``): ``"theta"`` (the default, the tangent and tau-Jp papers'
and ``taskarith finetune``'s) decays theta = theta0 + delta of every trained tensor, biases and norms too,
just before each optimizer step (:func:`taskarith.training.decay_theta_`, the Trainer's own decay off);
``"delta"`` (TAK's) leaves it to the Trainer's AdamW on delta, with its usual exclusions (biases, norms).
The decay reads the learning rate of the optimizer's first group (the Trainer schedules all its groups
alike), so with theta decay the Trainer builds the optimizer: an ``optimizers=`` of one's own is refused.
In standard mode the Trainer's AdamW decays theta without biases and norms (``taskarith finetune`` decays
every trained tensor).

Where it differs from ``taskarith finetune``: in standard mode dropout is the model's own (the Trainer
trains in train mode), while f_lin is always taken in eval mode; a token-level loss (causal LM) is a
per-micro-batch mean, so there accumulation equals a large batch only for micro-batches of equal token
counts. Sharded training (FSDP, DeepSpeed ZeRO-3) is not supported: delta must be whole on every process.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from taskarith.display import shown
from taskarith.errors import TaskArithError
from taskarith.io import state_hash
from taskarith.linearize import Linearized
from taskarith.outputs import output_file
from taskarith.regularizers import Penalty, TauJp
from taskarith.training import DECAY_TARGETS, decay_theta_, task_vector, trainable_parameters
from taskarith.vectors import FORMAT as VECTOR_FORMAT
from taskarith.vectors import TaskVector


def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else outputs
    if isinstance(outputs, (tuple, list)):
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TaskArithError("TaskArithTrainer: the model's output has no logits to compute the task loss from")
    return logits


class _ThetaDecay(TrainerCallback):
    """Decays theta = theta0 + delta just before each optimizer step, at the step's learning rate."""

    def __init__(self, trainer: TaskArithTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = self.trainer._unwrapped(), self.trainer.optimizer
        if isinstance(model, Linearized) and optimizer is not None and args.weight_decay > 0:
            lr = optimizer.param_groups[0]["lr"]
            decay_theta_(model.deltas(), model.theta0(), lr, args.weight_decay)


class TaskArithTrainer(Trainer):
    """A ``Trainer`` that fine-tunes linearized (or not), on a parameter subset, with an interference penalty.

    ``penalty`` must be built on the same pre-trained model that is handed to the Trainer (checked by the
    hash of its weights); ``reg_strength`` is its lambda. ``task_vector()`` returns the trained task vector
    with its metadata; ``save_task_vector(path)`` writes it (rank 0 only).
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        linearize: bool = False,
        trainable: str | None = None,
        penalty: Penalty | None = None,
        reg_strength: float = 0.0,
        task: str | None = None,
        weight_decay_on: str = "theta",
        **kwargs: Any,
    ) -> None:
        if weight_decay_on not in DECAY_TARGETS:
            raise TaskArithError(
                f"TaskArithTrainer: weight_decay_on={weight_decay_on!r} is not one of {', '.join(DECAY_TARGETS)}"
            )
        if isinstance(model, Linearized):
            raise TaskArithError("TaskArithTrainer: give the pre-trained model itself and linearize=True")
        own_optimizer = kwargs.get("optimizers", (None, None))[0] is not None
        if linearize and weight_decay_on == "theta" and own_optimizer:
            raise TaskArithError(
                "TaskArithTrainer: with your own optimizer (optimizers=...) pass weight_decay_on='delta' and "
                "decay as you choose; weight_decay_on='theta' decays at the Trainer's own optimizer's rate"
            )
        if penalty is not None and not reg_strength > 0:
            raise TaskArithError(f"TaskArithTrainer: reg_strength={reg_strength!r} must be > 0 with a penalty")
        names = trainable_parameters(model, trainable, model_name=type(model).__name__)
        self.pretrained_hash = state_hash(dict(model.named_parameters()))
        if isinstance(penalty, TauJp):
            built_on = penalty.theta0 if penalty.theta0 is not None else dict(penalty.model.named_parameters())
            if state_hash(built_on) != self.pretrained_hash:
                raise TaskArithError(
                    "TaskArithTrainer: the penalty was built on another model than the one given to the Trainer "
                    "(their weights differ); build it on the pre-trained model you train"
                )
        self.linearized = linearize
        self.weight_decay_on = weight_decay_on if linearize else "theta"  # standard mode trains theta itself
        self.task_name, self.penalty, self.reg_strength = task, penalty, float(reg_strength)
        self.trained_names = names
        trained = set(names)
        if linearize:
            model = Linearized(model, trainable=True, params=names)
            # The model's own loss would be the linearization of the loss, not the loss of f_lin.
            model.accepts_loss_kwargs = False  # type: ignore[assignment]
        else:
            for name, param in model.named_parameters():
                param.requires_grad_(name in trained)
        # theta0 of the trained parameters, on the CPU: standard fine-tuning moves the weights themselves.
        self.theta0 = (
            {name: param.detach().cpu().clone() for name, param in model.named_parameters() if name in trained}
            if not linearize
            else {}
        )
        if isinstance(penalty, TauJp) and not linearize and penalty.model is model and penalty.theta0 is None:
            penalty.theta0 = {name: param.detach().clone() for name, param in model.named_parameters()}
        self.model_class = type(model.base if isinstance(model, Linearized) else model).__name__
        super().__init__(model, *args, **kwargs)
        if self.linearized and self.weight_decay_on == "theta":
            self.add_callback(_ThetaDecay(self))
        if isinstance(self.model, Linearized) and not self.label_names:
            # The Trainer finds the label names from the model's signature, which the wrapper hides; without
            # them evaluate() and predict() would never compute a loss or return labels.
            from transformers.utils import find_labels

            self.label_names = self.args.label_names or find_labels(type(self.model.base)) or ["labels"]

    def _set_signature_columns_if_needed(self) -> None:
        # The dataset's columns are the pre-trained model's arguments, not the wrapper's (*args, **kwargs).
        if self._signature_columns is None and isinstance(self.model, Linearized):
            columns = list(inspect.signature(self.model.base.forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})  # type: ignore[assignment]
        super()._set_signature_columns_if_needed()

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Decaying theta is _ThetaDecay's: AdamW's own decay (of delta) is off for every tensor.
        if self.linearized and self.weight_decay_on == "theta":
            return []
        return super().get_decay_parameter_names(model)

    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def delta(self) -> dict[str, torch.Tensor]:
        """delta = theta - theta0 of the trained parameters, differentiable."""
        model = self._unwrapped()
        if isinstance(model, Linearized):
            return model.deltas()
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device
        if self.theta0 and next(iter(self.theta0.values())).device != device:
            self.theta0 = {name: value.to(device) for name, value in self.theta0.items()}  # moved once
        return {name: params[name] - self.theta0[name] for name in self.theta0}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if self.linearized:
            inputs = dict(inputs)
            if "labels" not in inputs:
                raise TaskArithError("TaskArithTrainer (linearize=True): the batch has no 'labels' to compute the loss")
            labels = inputs.pop("labels")
            # Eval mode inside f_lin, as taskarith finetune and the papers' linear runs: dropout would make
            # f(x; theta0) and its Jacobian random functions of the step.
            unwrapped = self._unwrapped()
            if isinstance(unwrapped, Linearized):
                unwrapped.base.eval()
            outputs = model(**inputs)
            loss = F.cross_entropy(_logits(outputs).float(), labels)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if self.penalty is not None and model.training:
            loss = loss + self.reg_strength * self.penalty(self.delta(), self.state.global_step)
        return (loss, outputs) if return_outputs else loss

    def task_vector(self) -> TaskVector:
        """The task vector trained so far, with the Trainer's options in its configuration."""
        from taskarith.regularizers import PENALTY_FORMS

        model = self._unwrapped()
        name = getattr(self.penalty, "name", None)
        args = self.args
        config = {
            "trainer": "transformers.Trainer",
            "model_class": self.model_class,
            "pretrained_hash": self.pretrained_hash,
            "linearize": self.linearized,
            "trained_parameters": len(self.trained_names),
            "penalty": name,
            "penalty_form": PENALTY_FORMS.get(name or "", ""),
            "penalty_options": {
                key: getattr(self.penalty, key)
                for key in ("sampling", "batch_size", "every", "seed", "options")
                if hasattr(self.penalty, key)
            },
            "reg_strength": self.reg_strength,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "weight_decay_on": self.weight_decay_on,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "processes": args.world_size,
            "steps": self.state.global_step,
            "seed": args.seed,
        }
        if self.linearized:
            return task_vector(model, model.base, task=self.task_name, config=config)  # type: ignore[arg-type]
        return task_vector(model, self.theta0, task=self.task_name, config=config, params=list(self.theta0))

    def save_task_vector(self, path: str | Path, *, overwrite: bool = False) -> TaskVector | None:
        """Write the task vector through taskarith's output rules (rank 0 only; others return None)."""
        target = Path(path)
        if target.suffix != ".safetensors":  # checked on every process, so all of them refuse alike
            raise TaskArithError(f"{shown(target)}: a task vector file ends in .safetensors")
        vector = self.task_vector()
        if self.is_world_process_zero():
            with output_file(target, (), overwrite=overwrite, format=VECTOR_FORMAT) as tmp:
                vector.save(tmp)
        self.accelerator.wait_for_everyone()
        return vector if self.is_world_process_zero() else None
