"""What is planned: a model (built without memory), its loss, a batch that scales along dim 0, a precision.

A :class:`Workload` comes from a preset (:func:`memfit.models.get_model`), from the user's own module or
zero-argument factory with ``loss_fn(model, batch)`` and an example batch, or from a Hugging Face config
(:func:`from_hf`: the model's own loss with labels). Nothing of a user's module is allocated: its parameters
and buffers are mapped to ``meta`` twins while the module is copied.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.utils import _pytree as pytree

from memfit.models import GPTConfig, ModelSpec

__all__ = ["PRECISIONS", "PlanInputError", "Precision", "Workload", "from_hf", "import_object", "scale_batch"]

Precision = Literal["fp32", "bf16", "bf16-autocast", "fp16-autocast"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "bf16-autocast", "fp16-autocast")


class PlanInputError(ValueError):
    """A model, loss or batch the planner cannot use; the message says which and what is allowed."""


@dataclass(kw_only=True)
class Workload:
    """A training step to plan.

    Attributes:
        name: how rows and tables name the model.
        build: returns the model with ``meta`` parameters (allocates nothing).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        make_batch: ``make_batch(batch_size)`` -> a batch of ``meta`` tensors with that size along dim 0.
        batch_size: the batch size planned.
        seq_len: tokens per example or image side, for display (``None``: none).
        gpt: the GPT configuration of a memfit GPT preset (deep ones are remat-scheduled on a slice).
    """

    name: str
    build: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    make_batch: Callable[[int], Any]
    batch_size: int
    seq_len: int | None = None
    gpt: GPTConfig | None = None


def from_spec(spec: ModelSpec, batch_size: int, seq_len: int | None) -> Workload:
    """The workload of a :class:`memfit.models.ModelSpec` (a preset or an import-path classifier)."""
    seq = seq_len if seq_len is not None else spec.seq_len

    def build() -> nn.Module:
        try:
            with torch.device("meta"):
                return spec.build()
        except Exception as exc:
            raise PlanInputError(
                f"model factory {spec.name!r} raised {type(exc).__name__}: {_line(exc)}"
            ) from exc

    spec.example_batch(batch_size, seq, device="meta")  # checks the sizes now, with the preset's message
    return Workload(
        name=spec.name,
        build=build,
        loss_fn=spec.loss_fn,
        make_batch=lambda b: spec.example_batch(b, seq, device="meta"),
        batch_size=batch_size,
        seq_len=seq if spec.kind != "custom" else None,
        gpt=spec.gpt,
    )


def from_module(
    model: nn.Module | Callable[[], nn.Module],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    *,
    name: str | None = None,
    batch_size: int | None = None,
) -> Workload:
    """The workload of a user's module (any device) or zero-argument factory, loss and example batch.

    Args:
        model: an ``nn.Module`` (copied onto ``meta``: nothing of it is allocated) or a factory, called under
            ``torch.device("meta")``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: a tensor or a (nested) tuple / list / dict of tensors (real, meta or fake); dim 0 of each tensor of
            rank >= 1 is the batch axis.
        name: the model's name in the table (default: its class name).
        batch_size: plan this batch size (the example is scaled along dim 0); default: the example's.

    Raises:
        PlanInputError: the factory raised or returned no module, the batch holds something other than tensors,
            or ``loss_fn`` is not callable.
    """
    if not callable(loss_fn):
        raise PlanInputError(
            f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}"
        )
    leaves = _check_batch(batch, "batch")
    example = leaves[0].shape[0] if leaves and leaves[0].dim() >= 1 else 1
    size = batch_size if batch_size is not None else int(example)
    if size < 1:
        raise PlanInputError(f"batch size must be >= 1, got {size}")
    if isinstance(model, nn.Module):
        label = name or type(model).__name__

        def build() -> nn.Module:
            return meta_copy(model)

    elif callable(model):
        label = name or str(getattr(model, "__qualname__", type(model).__name__))

        def build() -> nn.Module:
            try:
                with torch.device("meta"):
                    made = model()
            except Exception as exc:
                raise PlanInputError(
                    f"model factory {label!r} raised {type(exc).__name__}: {_line(exc)}"
                ) from exc
            if not isinstance(made, nn.Module):
                raise PlanInputError(
                    f"model factory {label!r} returned a {type(made).__name__}, not a torch.nn.Module"
                )
            return made

    else:
        raise PlanInputError(
            f"model must be an nn.Module or a zero-argument factory, got {type(model).__name__}"
        )
    return Workload(
        name=label,
        build=build,
        loss_fn=loss_fn,
        make_batch=lambda b: scale_batch(batch, b),
        batch_size=size,
        seq_len=int(leaves[0].shape[1])
        if leaves and leaves[0].dim() >= 2 and not leaves[0].is_floating_point()
        else None,
    )


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``meta`` twins (their data is never copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _check_batch(batch: Any, what: str) -> list[torch.Tensor]:
    leaves, _ = pytree.tree_flatten(batch)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise PlanInputError(
                f"{what} must be a tensor or a (nested) tuple / list / dict of tensors; leaf {i} is a "
                f"{type(leaf).__name__}"
            )
    if not leaves:
        raise PlanInputError(f"{what} holds no tensor")
    return cast(list[torch.Tensor], leaves)


def scale_batch(batch: Any, size: int) -> Any:
    """``batch`` as ``meta`` tensors with ``size`` along dim 0 of every tensor of rank >= 1."""

    def scale(t: torch.Tensor) -> torch.Tensor:
        shape = (size, *t.shape[1:]) if t.dim() >= 1 else ()
        return torch.empty(shape, dtype=t.dtype, device="meta")

    return pytree.tree_map_only(torch.Tensor, scale, batch)


def import_object(path: str, what: str) -> Any:
    """``"package.module:attr"`` -> the object.

    Raises:
        PlanInputError: a malformed path, a module that does not import, or a missing attribute.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise PlanInputError(f"{what} {path!r} is not an import path: expected 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise PlanInputError(
            f"{what} {path!r}: cannot import {module_name!r} ({type(exc).__name__}: {_line(exc)})"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PlanInputError(f"{what} {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A Hugging Face model's own loss: ``model(**batch).loss`` (the batch holds ``labels``)."""
    loss: torch.Tensor = model(**batch).loss
    return loss


def from_hf(source: str, batch_size: int, seq_len: int | None) -> Workload:
    """A Hugging Face transformers model built from a config (random weights on ``meta``, no download).

    Args:
        source: a ``model_type`` (``"bert"``, ``"llama"``: the config class's defaults) or a path to a
            ``config.json``.
        batch_size: sequences per batch.
        seq_len: tokens per sequence (default: 128, capped by the config's ``max_position_embeddings``).

    The head is the first of causal LM, masked LM, sequence-to-sequence LM that the config supports; the batch is
    ``input_ids`` and ``labels`` (the same ids), so the loss is the model's own.

    Raises:
        PlanInputError: transformers is missing, the model type is unknown, the file unreadable, or no LM head.
    """
    try:
        import transformers
    except ImportError as exc:
        raise PlanInputError("hf: models need the transformers package (pip install transformers)") from exc
    path = Path(source)
    try:
        if source.endswith(".json") or path.is_file():
            data = json.loads(path.read_text())
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise PlanInputError(f"hf:{source}: the config has no 'model_type'")
            config = transformers.AutoConfig.for_model(model_type, **data)
        else:
            config = transformers.AutoConfig.for_model(source)
    except PlanInputError:
        raise
    except Exception as exc:
        raise PlanInputError(
            f"hf:{source}: cannot make a config ({type(exc).__name__}: {_line(exc)})"
        ) from exc
    auto = None
    for cls in (
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForMaskedLM,
        transformers.AutoModelForSeq2SeqLM,
    ):
        if type(config) in cls._model_mapping:
            auto = cls
            break
    if auto is None:
        raise PlanInputError(f"hf:{source}: {type(config).__name__} has no causal, masked or seq2seq LM head")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 128
    seq = seq_len if seq_len is not None else min(128, int(limit))

    def build() -> nn.Module:
        with torch.device("meta"):
            return cast(nn.Module, auto.from_config(config))

    def make_batch(b: int) -> dict[str, torch.Tensor]:
        ids = torch.empty(b, seq, dtype=torch.long, device="meta")
        return {"input_ids": ids, "labels": torch.empty(b, seq, dtype=torch.long, device="meta")}

    return Workload(
        name=f"hf:{source}",
        build=build,
        loss_fn=hf_loss,
        make_batch=make_batch,
        batch_size=batch_size,
        seq_len=seq,
    )


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
