"""``memfit train``: train a model with any memfit optimizer and remat budget, from options or a TOML file, with
atomic checkpoints and a bitwise-exact ``--resume``.

Resumption is exact on the CPU because everything a step depends on is either in the checkpoint (model,
optimizer, LR schedule, step, RNG states) or a pure function of it: the batch of step ``k`` is
``TextDataset.batch("train", k, ...)`` (:mod:`memfit.data`), so the data position is the step itself.

Checkpoints are written to a temporary file, flushed to disk, then renamed over the final name (a rename is
atomic on POSIX): a crash leaves either the old file or the new one, never half of one. On ``--resume`` a
checkpoint that does not load (truncated, foreign, another format) is reported by name and the previous one is
used; the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from memfit.data import TextDataset
from memfit.models import PRESETS, get_model
from memfit.optim import sm3_warmup_schedule
from memfit.plan import OPTIMIZERS, make_optimizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = [
    "CHECKPOINT_FORMAT",
    "LM_PRESETS",
    "MAY_CHANGE_ON_RESUME",
    "TRAIN_LR",
    "CheckpointError",
    "ConfigError",
    "TrainConfig",
    "default_lr",
    "load_config",
    "train",
]

CHECKPOINT_FORMAT = 1

#: options a resumed run may change; every other one must equal the checkpoint's (the run would not be the one
#: the checkpoint continues, and config.toml would record options that were not used)
MAY_CHANGE_ON_RESUME = ("steps", "out", "checkpoint_every", "keep", "eval_every", "eval_batches")

# the batch generator's seed, (seed * 1_000_003 + 1) * 1_000_000_007 + step (memfit.data), must fit in 64 bits
_MAX_SEED = 9999

#: learning rates taken when ``lr`` is left out, where they differ from :func:`memfit.plan.make_optimizer`'s. SM3
#: without momentum at its usual 0.1 spikes on the default run (tiny GPT, batch 16x64: loss 3.1 -> 8.1 at step 51,
#: above uniform guessing, ln 256 = 5.55; 0.05 spikes to 6.1 at step 61); at 0.02 the loss never exceeds its
#: starting value on seeds 0, 1, 2 and ends lower (1.62 at step 1000, seed 0). SM3's accumulators sum squared
#: gradients for good (beta2 = 1), so a spike's gradients shrink every later step: a spike is not recovered from.
TRAIN_LR = {"sm3": 0.02}

#: the GPT presets, the models ``memfit train`` trains (its data are bytes: language models only)
LM_PRESETS = tuple(name for name, spec in PRESETS.items() if spec.kind == "lm")


class CheckpointError(RuntimeError):
    """No checkpoint could be loaded (the message names each file tried and why it failed)."""


class ConfigError(ValueError):
    """A bad option or config file: the message says which, what was given and what is allowed.

    Attributes:
        key: the :class:`TrainConfig` field at fault, when there is one.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# the TOML / Python type of each TrainConfig field ("?": may be absent, i.e. None)
_KINDS = {
    "model": "str",
    "data": "str?",
    "optimizer": "str",
    "lr": "float?",
    "optimizer_args": "table",
    "warmup_steps": "int",
    "remat_budget": "float?",
    "batch_size": "int",
    "seq_len": "int",
    "steps": "int",
    "seed": "int",
    "out": "str",
    "checkpoint_every": "int",
    "keep": "int",
    "eval_every": "int",
    "eval_batches": "int",
}
_KIND_NAMES = {
    "str": "a string",
    "float": "a number",
    "int": "an integer",
    "table": "a table (TOML) / object (JSON)",
}


def _checked(name: str, value: Any) -> Any:
    """``value`` if it has ``name``'s type (ints made floats for float fields, paths made strings), else raise."""
    kind = _KINDS[name]
    if value is None and kind.endswith("?"):
        return None
    base = kind.rstrip("?")
    if base == "str" and isinstance(value, os.PathLike):
        return os.fspath(value)
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "table": isinstance(value, dict),
    }[base]
    if not ok:
        absent = " (or left out)" if kind.endswith("?") else ""
        raise ConfigError(
            f"{name} must be {_KIND_NAMES[base]}{absent}, got {value!r} ({type(value).__name__})", key=name
        )
    return float(value) if base == "float" else value


@dataclass(kw_only=True)
class TrainConfig:
    """What ``memfit train`` trains; every field is a TOML key and a ``--option`` (``_`` written ``-``).

    The defaults train the ``tiny`` GPT on the default corpus with SM3 in about a minute on two CPU cores; the
    learning rate and warm-up are the ones that keep that run free of loss spikes (see ``docs/train.md``).

    Attributes:
        model: a GPT preset of :mod:`memfit.models` (:data:`LM_PRESETS`; the data are bytes).
        data: text file (``None``: the default corpus, CPython's ``pydoc_data/topics.py``).
        optimizer: one of :data:`memfit.plan.OPTIMIZERS`.
        lr: peak learning rate (``None``: :func:`default_lr`, which is then recorded); 0 is taken as given.
        optimizer_args: further keyword arguments of the optimizer (e.g. ``{momentum = 0.9}``); unknown ones are
            errors.
        warmup_steps: the SM3 authors' quadratic learning-rate warm-up, ``lr * min(1, (step / warmup)^2)``; 0: none.
        remat_budget: ``None`` (no remat) or a fraction in (0, 1] for :func:`memfit.remat.compile`.
        batch_size: sequences per step.
        seq_len: bytes per sequence (at most the model's ``block_size``).
        steps: optimizer steps in all.
        seed: seed of the weights and the batches, in [0, 9999].
        out: output directory (metrics, plot, checkpoints, the resolved config).
        checkpoint_every: steps between checkpoints (one is also written at the end and on SIGTERM / Ctrl-C).
        keep: checkpoints kept.
        eval_every: steps between validation losses (0: only at the end).
        eval_batches: validation batches per evaluation.

    Raises:
        ConfigError: a value of the wrong type or out of range, an unknown optimizer or model, or an unknown
            optimizer argument (with the closest known name).
    """

    model: str = "tiny"
    data: str | None = None
    optimizer: str = "sm3"
    lr: float | None = None
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 100
    remat_budget: float | None = None
    batch_size: int = 16
    seq_len: int = 64
    steps: int = 1000
    seed: int = 0
    out: str = "runs/train"
    checkpoint_every: int = 100
    keep: int = 2
    eval_every: int = 0
    eval_batches: int = 4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name)))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}", key="optimizer"
            )
        if self.lr is None:  # recorded as the value used (config.toml, checkpoints)
            self.lr = default_lr(self.optimizer)
        for name in ("batch_size", "seq_len", "steps", "checkpoint_every", "keep", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", key=name)
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{name} must be >= 0 (0: {_ZERO_MEANS[name]}), got {getattr(self, name)}", key=name
                )
        if not 0 <= self.seed <= _MAX_SEED:
            raise ConfigError(f"seed must be in [0, {_MAX_SEED}], got {self.seed}", key="seed")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0.0):
            raise ConfigError(
                f"lr must be a finite number >= 0 (or left out: the optimizer's default), got {self.lr}",
                key="lr",
            )
        if self.remat_budget is not None and not 0.0 < self.remat_budget <= 1.0:
            raise ConfigError(
                f"remat_budget must be in (0, 1] or left out (no remat), got {self.remat_budget}",
                key="remat_budget",
            )
        _check_model(self.model, self.seq_len)
        _check_optimizer_args(self.optimizer, self.lr, self.optimizer_args)


def default_lr(optimizer: str) -> float:
    """The learning rate ``memfit train`` uses for ``optimizer`` when none is given (see :data:`TRAIN_LR`)."""
    if optimizer in TRAIN_LR:
        return TRAIN_LR[optimizer]
    lr: float = make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)]).param_groups[0]["lr"]
    return lr


_ZERO_MEANS = {"warmup_steps": "no warm-up", "eval_every": "only at the end"}


def _check_model(model: str, seq_len: int) -> None:
    if model not in LM_PRESETS:
        kind = f" ({PRESETS[model].kind} model)" if model in PRESETS else ""
        raise ConfigError(
            f"model must be a GPT preset ({', '.join(LM_PRESETS)}): memfit train trains language models on bytes; "
            f"got {model!r}{kind}",
            key="model",
        )
    gpt = get_model(model).gpt
    assert gpt is not None
    if seq_len > gpt.block_size:
        raise ConfigError(
            f"seq_len must be <= {gpt.block_size} for {model} (its block_size), got {seq_len}", key="seq_len"
        )


def _check_optimizer_args(name: str, lr: float | None, args: dict[str, Any]) -> None:
    """Build the optimizer on a 2x2 probe: unknown keywords and bad values fail here, before anything is written."""
    probe = [torch.zeros(2, 2, requires_grad=True)]
    cls = type(make_optimizer(name, probe))
    params = inspect.signature(cls.__init__).parameters.values()
    known = [p.name for p in params if p.name not in ("self", "params", "lr") and p.kind is not p.VAR_KEYWORD]
    for key in args:
        if key == "lr":
            raise ConfigError(
                "optimizer_args: give the learning rate as lr (--lr), not in optimizer_args",
                key="optimizer_args",
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"optimizer_args: {cls.__name__} ({name}) has no argument {key!r}{hint} (known: {', '.join(known)})",
                key="optimizer_args",
            )
    try:
        make_optimizer(name, probe, lr, **args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"optimizer_args {args} for {name}: {exc}", key="optimizer_args") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, *, resume: bool = False, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file; ``overrides`` (not ``None``) win over the file.

    With ``resume``, options given neither in the file nor in ``overrides`` are taken from ``OUT/config.toml``
    (the config the run being resumed recorded), so ``memfit train --resume --out OUT`` needs nothing else.

    Raises:
        ConfigError: the file is missing or not TOML (the message names it), an unknown key (the message lists the
            allowed ones), or a bad value.
    """
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
        unknown = sorted(set(data) - allowed)
        if unknown:
            hints = [
                f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, allowed, n=1)) else k
                for k in unknown
            ]
            raise ConfigError(
                f"{path}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(sorted(allowed))}"
            )
    from_file = {k for k in data if overrides.get(k) is None}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if resume:
        saved = Path(data.get("out", TrainConfig.out)) / "config.toml"
        if saved.is_file():
            data = {**{k: v for k, v in _read_toml(saved).items() if k in allowed}, **data}
    try:
        return TrainConfig(**data)
    except ConfigError as exc:
        if exc.key in from_file:
            raise ConfigError(f"{path}: {exc}", key=exc.key) from None
        raise


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*.pt"))


def _save(out: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    path = out / f"checkpoint-{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)  # atomic: readers see the old file or the whole new one
    except BaseException:  # an error or a second Ctrl-C mid-write: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise
    for old in _checkpoints(out)[:-keep]:
        old.unlink()
    return path


def _remove_partial_writes(out: Path) -> list[str]:
    """Delete ``checkpoint-*.pt.tmp``: writes a killed run did not finish (never loadable: the rename is last)."""
    names = []
    for tmp in sorted(out.glob("checkpoint-*.pt.tmp")):
        tmp.unlink(missing_ok=True)
        names.append(tmp.name)
    return names


def _load_latest(out: Path, say: Any, partial: list[str]) -> tuple[Path, dict[str, Any]]:
    tried: list[str] = []
    for path in reversed(_checkpoints(out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a memfit checkpoint of format {CHECKPOINT_FORMAT}")
        except Exception as exc:  # a truncated zip, a foreign pickle, another format: all unusable
            tried.append(f"{path.name}: {type(exc).__name__}: {exc}")
            say(
                f"[yellow]checkpoint {path} is unusable ({type(exc).__name__}: {exc}); trying the previous one[/]"
            )
            continue
        return path, state
    none = " (none found" + (
        f"; {', '.join(partial)} was a write the run did not finish (it was killed while saving), now removed)"
        if partial
        else ")"
    )
    raise CheckpointError(f"no usable checkpoint in {out}" + ("".join(f"\n  {t}" for t in tried) or none))


def _check_resume(cfg: TrainConfig, path: Path, state: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint with options it was not trained with (the list says which)."""
    now = asdict(cfg)
    saved = dict(state.get("config", {}))
    if (
        saved.get("lr", 0.0) is None and saved.get("optimizer") in OPTIMIZERS
    ):  # written before lr was recorded
        saved["lr"] = make_optimizer(saved["optimizer"], [torch.zeros(1, requires_grad=True)]).param_groups[
            0
        ]["lr"]
    diffs = [
        f"{k} {v!r} -> {now[k]!r}"
        for k, v in saved.items()
        if k in now and k not in MAY_CHANGE_ON_RESUME and now[k] != v
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume {path} with other options than it was trained with: {'; '.join(diffs)} "
            f"(checkpoint -> now). Leave them out (--resume takes them from {path.parent / 'config.toml'}) or "
            f"train into another --out; options that may change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}"
        )
    if cfg.steps < state["step"]:
        raise ConfigError(
            f"steps must be >= {state['step']} (the step of {path.name}) to resume, got {cfg.steps}"
        )


def _infeasible(cfg: TrainConfig, exc: Any) -> ConfigError:
    """One line for an infeasible remat budget: the smallest fraction this step can reach."""
    from memfit.memory import format_bytes

    assert cfg.remat_budget is not None
    min_bytes = int(exc.min_peak)
    frac = getattr(exc, "min_fraction", None)
    if frac is None:  # the budget in bytes is remat_budget x the no-remat step's memory beyond the inputs
        frac = min_bytes / max(exc.budget / cfg.remat_budget, 1.0)
    suggest = math.ceil(frac * 100) / 100
    return ConfigError(
        f"remat_budget {cfg.remat_budget:g} is below what this step can reach: the smallest reachable budget is "
        f"{frac:.3f} ({format_bytes(min_bytes)} beyond parameters, buffers and batch); use a remat_budget in "
        f"[{suggest:.2f}, 1] or leave it out"
    )


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: Any = None, say: Any = print
) -> dict[str, Any]:
    """Train; returns ``{"losses": [...], "val": [...], "out": ..., "stopped": bool, "signal": int | None}``.

    A SIGTERM or SIGINT (Ctrl-C) stops the run after the current step with a checkpoint (resume it with
    ``resume=True``); ``signal`` is the signal's number. A second SIGINT stops at once, without a checkpoint.
    Everything is checked before anything is written to ``cfg.out``.

    Raises:
        ConfigError: ``cfg.out`` is a file, or holds checkpoints of another run and ``resume`` is false; the data
            file is missing or too short; ``resume`` with options that differ from the checkpoint's; a remat
            budget below what the step can reach.
        FloatingPointError: a non-finite loss (before the update is applied).
        CheckpointError: ``resume`` and no usable checkpoint.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out must be a directory, but {out} is a file")
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise ConfigError(
            f"data must be a text file, but {cfg.data} "
            + ("is a directory" if Path(cfg.data).is_dir() else "does not exist")
        )
    spec = get_model(cfg.model)
    ds = TextDataset.from_file(cfg.data)
    for split in ("train", "val"):
        try:
            ds.batch(split, 0, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        except ValueError as exc:
            raise ConfigError(f"data {ds.path}: {exc}; use a longer file or a shorter seq_len") from None
    out.mkdir(parents=True, exist_ok=True)
    partial = _remove_partial_writes(out)
    if partial:
        say(f"[yellow]removed {', '.join(partial)}: a checkpoint write an earlier run did not finish[/]")
    if not resume and _checkpoints(out):
        raise ConfigError(
            f"{out} holds checkpoints of an earlier run ({_checkpoints(out)[-1].name}): add --resume to continue "
            "it, or train into another --out (or delete them)"
        )
    torch.manual_seed(cfg.seed)
    model = spec.build()
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, **cfg.optimizer_args)
    sched = sm3_warmup_schedule(opt, warmup_steps=cfg.warmup_steps)
    losses: list[float] = []
    val: list[tuple[int, float]] = []
    start = 0
    if resume:
        path, state = _load_latest(out, say, partial)
        _check_resume(cfg, path, state)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        start, losses, val = state["step"], list(state["losses"]), [tuple(v) for v in state["val"]]
        say(f"resumed from step {start}")
    step_fn: Any
    if cfg.remat_budget is not None:
        from memfit import remat

        example = ds.batch("train", 0, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        try:
            step_fn = remat.compile(model, spec.loss_fn, example, budget=cfg.remat_budget)  # type: ignore[operator]
        except remat.InfeasibleBudget as exc:
            raise _infeasible(cfg, exc) from None
    else:
        step_fn = None
    # written once every check passed: it records the options this run uses (a resume's differ only in
    # MAY_CHANGE_ON_RESUME)
    (out / "config.toml").write_text(_to_toml(asdict(cfg)))

    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop["signal"] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint of this step
        stop["signal"] = signum

    old_handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, on_signal)

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "losses": losses,
            "val": val,
            "config": asdict(cfg),
        }

    metrics = out / "metrics.csv"
    rows = _read_rows(metrics, upto=start) if resume else []
    task = progress.add_task("training", total=cfg.steps, completed=start) if progress is not None else None
    try:
        with open(metrics, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss", "lr", "seconds"])
            writer.writerows(rows)
            for k in range(start, cfg.steps):
                batch = ds.batch("train", k, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
                t0 = time.perf_counter()
                if step_fn is None:
                    loss = spec.loss_fn(model, batch)
                    value = float(loss.detach())
                    if math.isfinite(value):
                        loss.backward()
                else:
                    value = float(step_fn(batch))
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the training loss is {value} at step {k} (lr {sched.get_last_lr()[0]:.3g}); the update "
                        f"was not applied. Lower the learning rate (lr={cfg.lr}) or resume from a checkpoint in {out}"
                    )
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                losses.append(value)
                writer.writerow([k + 1, repr(value), sched.get_last_lr()[0], time.perf_counter() - t0])
                f.flush()  # a reader (or a crash) sees every finished step
                if cfg.eval_every and (k + 1) % cfg.eval_every == 0:
                    val.append((k + 1, _evaluate(model, spec, ds, cfg)))
                if task is not None:
                    progress.update(task, advance=1, description=f"step {k + 1} loss {value:.3f}")
                done = k + 1 == cfg.steps
                if (k + 1) % cfg.checkpoint_every == 0 or done or stop["signal"] is not None:
                    f.flush()
                    _save(out, snapshot(k + 1), k + 1, cfg.keep)
                if stop["signal"] is not None and not done:
                    name = signal.Signals(stop["signal"]).name
                    say(f"{name}: stopped after step {k + 1} with a checkpoint; continue with --resume")
                    return {
                        "losses": losses,
                        "val": val,
                        "out": str(out),
                        "stopped": True,
                        "signal": stop["signal"],
                    }
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
    if not val or val[-1][0] != cfg.steps:
        val.append((cfg.steps, _evaluate(model, spec, ds, cfg)))
    _plot(losses, val, out / "loss.png", cfg)
    return {"losses": losses, "val": val, "out": str(out), "stopped": False, "signal": None}


@torch.no_grad()
def _evaluate(model: torch.nn.Module, spec: Any, ds: TextDataset, cfg: TrainConfig) -> float:
    vals = [
        float(spec.loss_fn(model, ds.batch("val", i, cfg.batch_size, cfg.seq_len, seed=cfg.seed)))
        for i in range(cfg.eval_batches)
    ]
    return sum(vals) / len(vals)


def _read_rows(path: Path, *, upto: int) -> list[list[str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r for r in rows if r and int(r[0]) <= upto]


def _to_toml(d: dict[str, Any]) -> str:
    lines = []
    tables = []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append(
                f"[{k}]\n" + "".join(f"{_toml_key(kk)} = {_toml_value(vv)}\n" for kk, vv in v.items())
            )
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n" + "".join(f"\n{t}" for t in tables)


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    """A TOML value (scalars, arrays, inline tables); JSON's string escapes are TOML's basic-string escapes."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf and nan read back as TOML's inf and nan
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v), ensure_ascii=False)


def _plot(losses: list[float], val: list[tuple[int, float]], path: Path, cfg: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o--", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(
        f"memfit train: {cfg.model}, {cfg.optimizer}"
        + (f", remat {cfg.remat_budget:.0%}" if cfg.remat_budget else "")
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
