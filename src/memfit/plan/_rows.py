"""What a plan says: one :class:`PlanRow` per (optimizer, remat setting), gathered in an :class:`Estimate`."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from memfit.memory import format_bytes

__all__ = ["Estimate", "PlanRow", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20}
_UNITS.update({"g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40})


def parse_bytes(text: str | int) -> int:
    """``"24GiB"`` -> bytes. Binary (KiB, MiB, GiB, TiB; also K, M, G, T) and decimal (KB, MB, GB, TB) units.

    Raises:
        ValueError: a malformed or non-positive size, or a bare number under 1 KiB (a forgotten unit).
    """
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a size: use e.g. 24GiB, 512MiB, 80GB or a byte count")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit in ("", "b") and 0 < number < 1024:
            # "0.5" or "2" is a fraction or a GiB count the user forgot to label, not a size in bytes.
            raise ValueError(
                f"cannot read {text!r} as a memory size: it has no unit and is under 1 KiB; use e.g. "
                f"24GiB, 512MiB, 80GB (a fraction of the step's memory is a remat budget: --remat {text.strip()})"
            )
        value = int(number * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """The prediction for one (optimizer, remat setting).

    Attributes:
        optimizer: a key of :data:`memfit.plan.OPTIMIZERS`.
        remat: the remat budget as a fraction of the no-remat step's memory beyond inputs; ``None``: no remat.
        peak_bytes: predicted peak of one training step (forward, backward and optimizer step).
        breakdown: bytes by category at that peak: ``parameters`` (incl. buffers), ``gradients``,
            ``optimizer_state``, ``activations`` (incl. temporaries), ``inputs`` (the batch).
        step_overhead: predicted compute of forward + backward relative to no remat (1.0 without remat).
        fits: ``peak_bytes <= memory`` (``None`` without a limit).
        max_batch: largest batch size predicted to fit (``None`` without a limit; 0 when none does).
        note: how a figure was obtained when it is not traced (e.g. a modelled kernel), else ``""``.
        settings: what the optimizer row is, in words: the class, its momentum, state dtype, and the update
            implementation that runs (e.g. ``"memfit.optim.SM3, momentum 0, fused CPU kernel"``).
        step_seconds: predicted wall time of one training step at calibrated rates (forward + backward x
            ``step_overhead`` + optimizer update); ``None`` when not predicted.
        update_seconds: the optimizer update's part of ``step_seconds``.
        grads_resident: whether all gradients are resident when the optimizer steps (``True`` for
            ``loss.backward(); opt.step()``; ``False`` for a row with the step inside the backward,
            :func:`memfit.optim.step_in_backward`, planned with ``estimate(..., step_in_backward=True)``).
    """

    optimizer: str
    remat: float | None
    peak_bytes: int
    breakdown: dict[str, int]
    step_overhead: float
    fits: bool | None
    max_batch: int | None
    note: str = ""
    settings: str = ""
    step_seconds: float | None = None
    update_seconds: float | None = None
    grads_resident: bool = True


@dataclass(kw_only=True)
class Estimate:
    """What :func:`memfit.plan.estimate` predicted.

    Attributes:
        model: the model's name.
        n_params: its parameter count.
        batch_size: examples per batch.
        seq_len: tokens per example (language models) or image side; ``None`` when the batch has no such axis.
        memory: the limit in bytes, or ``None``.
        precision: ``"fp32"``, ``"bf16"``, ``"bf16-autocast"`` or ``"fp16-autocast"``.
        device: the device the step was planned for (``"cpu"``, ``"cuda"``).
        rows: one :class:`PlanRow` per optimizer and feasible remat setting.
        notes: remat settings left out (infeasible budgets) and why; how figures were obtained.
        seconds: wall time of the estimate.
    """

    model: str
    n_params: int
    batch_size: int
    seq_len: int | None
    memory: int | None
    precision: str = "fp32"
    device: str = "cpu"
    rows: list[PlanRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def best(self) -> PlanRow | None:
        """The fastest setting that fits (least predicted step time, else least overhead; then least memory)."""
        fitting = [r for r in self.rows if r.fits]
        if not fitting:
            return None
        return min(
            fitting,
            key=lambda r: (r.step_seconds if r.step_seconds is not None else r.step_overhead, r.peak_bytes),
        )

    def row(self, optimizer: str, remat: float | None = None, *, grads_resident: bool = True) -> PlanRow:
        """The row of ``optimizer`` at ``remat`` (``grads_resident=False``: the step inside the backward).

        Raises:
            KeyError: no such row (an optimizer not asked for, or an infeasible remat budget).
        """
        for r in self.rows:
            if r.optimizer == optimizer and r.remat == remat and r.grads_resident == grads_resident:
                return r
        raise KeyError(
            f"no row for ({optimizer!r}, remat={remat}, grads_resident={grads_resident}); rows: "
            f"{[(r.optimizer, r.remat, r.grads_resident) for r in self.rows]}"
        )

    def table(self) -> Any:
        """A ``rich.table.Table`` of the rows."""
        from rich.table import Table

        limit = f", limit {format_bytes(self.memory)}" if self.memory else ""
        in_backward = any(not r.grads_resident for r in self.rows)
        shape = f"{self.batch_size}x{self.seq_len}" if self.seq_len else str(self.batch_size)
        table = Table(
            title=f"memfit plan: {self.model} ({self.n_params:,} parameters), batch {shape}, {self.precision} "
            f"on {self.device}{limit}",
            caption="predicted without allocating (fake tensors); overhead: forward + backward compute vs no remat; "
            "step: predicted time of one step at this machine's calibrated rates"
            + (
                "; update: the optimizer step after the backward, or inside it (step_in_backward)"
                if in_backward
                else ""
            ),
        )
        cols = (
            "optimizer",
            "settings",
            *(("update",) if in_backward else ()),
            "remat",
            "peak",
            "params",
            "grads",
            "opt state",
            "activations",
            "overhead",
        )
        for col in (*cols, "step"):
            table.add_column(col, justify="left" if col in ("optimizer", "settings") else "right")
        if self.memory:
            table.add_column("fits")
            table.add_column("max batch", justify="right")
        for r in self.rows:
            b = r.breakdown
            cells = [
                r.optimizer,
                r.settings,
                *((("after backward" if r.grads_resident else "in backward"),) if in_backward else ()),
                "none" if r.remat is None else f"{r.remat:.0%}",
                format_bytes(r.peak_bytes),
                format_bytes(b["parameters"]),
                format_bytes(b["gradients"]),
                format_bytes(b["optimizer_state"]),
                format_bytes(b["activations"] + b["inputs"]),
                f"{r.step_overhead:.2f}x",
                "-" if r.step_seconds is None else _seconds(r.step_seconds),
            ]
            if self.memory:
                cells += ["[green]yes[/]" if r.fits else "[red]no[/]", str(r.max_batch)]
            table.add_row(*cells)
        return table


def _seconds(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1.0 else f"{s:.2f} s"
