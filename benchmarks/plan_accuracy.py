"""How close is ``memfit.plan.estimate`` to a real training step, on models users train?

Grid (a sample of architectures x batch sizes x optimizers x remat x precision, :data:`GRID`): HF BERT and
Llama built from small configs, a torchvision-style ResNet-18 (``tests/remat_torch/zoo.py``: PyPI torchvision
does not load against this CPU torch), memfit's GPT, and a user-style module with a sequence output and its own
masked loss; Adam, SM3 without momentum, SM3 with momentum 0.9, SM3 with bf16 momentum, Adafactor; no remat and
remat at 50%; fp32 and bf16 autocast.

For each configuration a fresh process (so that RSS is its own) plans the step with ``estimate`` (nothing
allocated), then builds the model for real, runs two training steps (forward, backward, ``optimizer.step()``,
``zero_grad``) and measures the second: its peak by :func:`memfit.memory.track` (live tensor bytes, the
baseline of the comparison), the growth of the process's peak RSS over its RSS before the model was built
(``VmHWM``, reset through ``/proc/self/clear_refs``), and the fastest of ``--steps`` further steps (the rates
the plan times ops with are best-of-N figures too; on a shared machine a median mostly measures the other
work), next to the plan's predicted step time. Ratios are predicted / measured.

With ``--device cuda`` the measured peak is ``torch.cuda.max_memory_allocated`` over the step (no GPU was lent to
the session that wrote this script: its CUDA figures are not recorded).

Run: ``.venv/bin/python benchmarks/plan_accuracy.py`` (``--only NAME`` for some rows, ``--quick`` for the sample
the test runs). Writes ``benchmarks/results/plan_accuracy.json``.

``--step-in-backward``: the same grid with the optimizer step inside the backward
(:func:`memfit.optim.step_in_backward`, active before ``memfit.remat.compile`` so that its schedule consumes the
gradients): the plan's row with ``grads_resident=False`` against that real step, and the drop from the ordinary
step (planned and measured, tracker only, in the same process). Writes
``benchmarks/results/plan_accuracy_step_in_backward.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "plan_accuracy.json"
sys.path.insert(0, str(ROOT / "tests" / "remat_torch"))


@dataclass(frozen=True)
class Config:
    """One row of the grid."""

    arch: str
    batch: int
    optimizer: str
    remat: float | None = None
    precision: str = "fp32"

    @property
    def name(self) -> str:
        r = "none" if self.remat is None else f"{self.remat:g}"
        return f"{self.arch}/b{self.batch}/{self.optimizer}/remat-{r}/{self.precision}"


GRID: list[Config] = [
    Config("bert", 4, "adam"),
    Config("bert", 8, "sm3", precision="bf16-autocast"),
    Config("llama", 4, "adafactor"),
    Config("llama", 8, "sm3-m0.9", precision="bf16-autocast"),
    Config("llama", 4, "adam", precision="bf16-autocast"),
    Config("resnet18", 8, "adam"),
    Config("resnet18", 16, "sm3"),
    Config("resnet18", 8, "sm3-m0.9", precision="bf16-autocast"),
    Config("gpt", 4, "adam"),
    Config("gpt", 8, "sm3", remat=0.5),
    Config("gpt", 4, "sm3-bf16", remat=0.5),
    Config("gpt", 8, "adafactor", precision="bf16-autocast"),
    Config("tagger", 4, "adam", remat=0.5),
    Config("tagger", 8, "sm3"),
    Config("tagger", 8, "sm3-m0.9", precision="bf16-autocast"),
    Config("tagger", 4, "adafactor"),
]
# with --step-in-backward, also: benchmarks/step_in_backward.py's GPT 6x512 (vocab 8192) at batch 1x128, where the
# gradients (108 MiB) are most of the ordinary peak, and small batches of the grid's models
IN_BACKWARD_EXTRA: list[Config] = [
    Config("gpt6x512", 1, "adam"),
    Config("gpt6x512", 1, "sm3"),
    Config(
        "gpt6x512", 4, "sm3", remat=0.5
    ),  # the ordinary step cannot reach 50% (its gradients are inside it)
    Config("gpt", 2, "adam", remat=0.5),
    Config("tagger", 1, "sm3-m0.9"),
]
QUICK = [
    "tagger/b4/adam/remat-0.5/fp32",
    "tagger/b8/sm3-m0.9/remat-none/bf16-autocast",
    "gpt/b8/sm3/remat-0.5/fp32",
]


class Tagger(nn.Module):
    """A user's sequence model: token embedding, a causal depthwise convolution, two MLP blocks, per-token logits."""

    def __init__(self, vocab: int = 512, width: int = 128, kernel: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, kernel, groups=width, padding=kernel - 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )
            for _ in range(2)
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        h = self.emb(ids)  # (B, T, C)
        h = h + self.conv(h.transpose(1, 2))[..., :T].transpose(1, 2)
        for block in self.blocks:
            h = h + block(h)
        out: torch.Tensor = self.head(h)  # (B, T, vocab)
        return out


def tagger_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token cross-entropy over the unmasked positions (what a user writes for a sequence output)."""
    logits = model(batch["ids"])
    per_token = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    mask = batch["mask"].flatten()
    return (per_token * mask).sum() / mask.sum()


def build(arch: str, batch: int) -> tuple[nn.Module, Any, Any]:
    """(model, loss_fn, batch) of an architecture at a batch size (random weights, fixed seeds)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if arch in ("bert", "llama"):
        import zoo

        model, loss_fn, example = zoo.BUILDERS[arch]("small")
        seq = example["input_ids"].shape[1]
        ids = torch.randint(0, zoo.VOCAB["small"], (batch, seq), generator=g)
        b: dict[str, torch.Tensor] = {"input_ids": ids, "labels": ids.clone()}
        if arch == "bert":
            b["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        return model, loss_fn, b
    if arch == "resnet18":
        import zoo

        model = zoo.ResNet18(width=32, num_classes=10)
        x = torch.randn(batch, 3, 64, 64, generator=g)
        return model, zoo.xent, (x, torch.randint(0, 10, (batch,), generator=g))
    if arch == "gpt":
        from memfit.models import get_model

        spec = get_model("small")
        x = torch.randint(0, 256, (batch, 128), generator=g)
        return spec.build(), spec.loss_fn, (x, torch.roll(x, -1, dims=1))
    if arch == "gpt6x512":
        from memfit.models._gpt import GPT, GPTConfig, lm_loss

        model = GPT(GPTConfig(n_layer=6, n_head=8, n_embd=512, vocab_size=8192, block_size=256))
        x = torch.randint(0, 8192, (batch, 128), generator=g)
        return model, lm_loss, (x, torch.randint(0, 8192, (batch, 128), generator=g))
    if arch == "tagger":
        ids = torch.randint(0, 512, (batch, 256), generator=g)
        mask = (torch.rand(batch, 256, generator=g) > 0.1).float()
        return Tagger(), tagger_loss, {"ids": ids, "targets": torch.roll(ids, -1, 1), "mask": mask}
    raise ValueError(f"unknown architecture {arch!r}")


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(cfg: Config, *, device: str = "cpu", steps: int = 5, in_backward: bool = False) -> dict[str, Any]:
    """Plan ``cfg`` with ``memfit.plan.estimate``, then run it for real and measure (see the module docstring).

    ``in_backward``: plan and run the step with the optimizer step inside the backward."""
    import gc

    from memfit import remat
    from memfit.memory import track
    from memfit.plan import estimate, make_optimizer

    model, loss_fn, batch = build(cfg.arch, cfg.batch)
    t0 = time.perf_counter()
    est = estimate(
        model,
        loss_fn,
        batch,
        optimizers=(cfg.optimizer,),
        remat=(cfg.remat,),
        precision=cfg.precision,
        device=device,
        step_in_backward=in_backward,
    )
    plan_s = time.perf_counter() - t0
    row = est.row(cfg.optimizer, cfg.remat, grads_resident=not in_backward)
    ordinary = next((r for r in est.rows if r.grads_resident and r.remat == cfg.remat), None)
    del model
    gc.collect()
    rss0, _ = _rss()
    model, loss_fn, batch = build(cfg.arch, cfg.batch)
    model = model.to(device)
    batch = (
        {k: v.to(device) for k, v in batch.items()}
        if isinstance(batch, dict)
        else tuple(t.to(device) for t in batch)
    )
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)
    autocast = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device) if cfg.precision == "fp16-autocast" else None

    def run_loss(m: nn.Module, b: Any) -> torch.Tensor:
        if autocast is None:
            return loss_fn(m, b)
        with torch.autocast(device, dtype=autocast):
            return loss_fn(m, b)

    opt = make_optimizer(cfg.optimizer, model.parameters())
    if in_backward:
        from memfit.optim import step_in_backward

        step_in_backward(opt)  # before compile: the schedule consumes each gradient
    rstep = remat.compile(model, run_loss, batch, budget=cfg.remat) if cfg.remat is not None else None

    def step() -> None:
        if rstep is not None:
            rstep(batch)
        else:
            loss = run_loss(model, batch)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    _reset_hwm()
    with track(model, opt, inputs=batch) as t:
        step()
    _, hwm = _rss()
    times = []
    for _ in range(steps):
        s0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s0)
    rep = t.report
    measured = rep.cuda_max_allocated_bytes if device == "cuda" else rep.total_peak_bytes
    if device == "cuda" and rep.cuda_entry_allocated_bytes is not None and measured is not None:
        measured += rep.cuda_entry_allocated_bytes
    return {
        "config": cfg.name,
        **asdict(cfg),
        "device": device,
        "settings": row.settings,
        "predicted_bytes": row.peak_bytes,
        "measured_bytes": measured,
        "tracker_bytes": rep.total_peak_bytes,
        "rss_growth_bytes": hwm - rss0,
        "error": row.peak_bytes / measured - 1,
        "rss_error": row.peak_bytes / (hwm - rss0) - 1
        if hwm > rss0
        else None,  # None: the peak RSS did not grow
        "predicted_breakdown": row.breakdown,
        "measured_breakdown": dict(rep.peak_breakdown),
        "predicted_step_s": row.step_seconds,
        "measured_step_s": min(times),
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "step_overhead": row.step_overhead,
        "grads_resident": row.grads_resident,
        "ordinary_predicted_bytes": ordinary.peak_bytes if ordinary is not None and in_backward else None,
        "plan_seconds": plan_s,
        "threads": torch.get_num_threads(),
    }


def _worker(name: str, device: str, steps: int, in_backward: bool) -> None:
    cfg = next(c for c in (*GRID, *IN_BACKWARD_EXTRA) if c.name == name)
    row = measure(cfg, device=device, steps=steps, in_backward=in_backward)
    if (
        row["ordinary_predicted_bytes"] is not None
    ):  # the ordinary step of the same configuration, for the drop
        row["ordinary_measured_bytes"] = measure(cfg, device=device, steps=1)["measured_bytes"]
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--only", action="append", default=[], help="a configuration name (repeatable)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument(
        "--steps", type=int, default=5, help="timed steps per configuration (the fastest is compared)"
    )
    ap.add_argument(
        "--step-in-backward",
        action="store_true",
        help="the optimizer step inside the backward (see the docstring)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.device, args.steps, args.step_in_backward)
        return
    if args.out is None:
        args.out = str(
            RESULTS.with_name("plan_accuracy_step_in_backward.json") if args.step_in_backward else RESULTS
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device on this machine")
    grid = [*GRID, *IN_BACKWARD_EXTRA] if args.step_in_backward else GRID
    names = args.only or (QUICK if args.quick else [c.name for c in grid])
    rows = []
    for name in names:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--device", args.device, "--steps", str(args.steps),
             *(["--step-in-backward"] if args.step_in_backward else [])],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )  # fmt: skip
        if out.returncode != 0:
            print(f"{name}: FAILED\n{out.stderr[-2000:]}")
            rows.append({"config": name, "failed": out.stderr[-2000:]})
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(_line(row), flush=True)
    ok = [r for r in rows if "failed" not in r]
    worst = max(ok, key=lambda r: abs(r["error"])) if ok else None
    timed = [r for r in ok if r["predicted_step_s"]]
    summary = {
        "rows": len(rows),
        "failed": len(rows) - len(ok),
        "worst_error": worst["error"] if worst else None,
        "worst_config": worst["config"] if worst else None,
        "within_5_percent": sum(abs(r["error"]) <= 0.05 for r in ok),
        "within_3_percent": sum(abs(r["error"]) <= 0.03 for r in ok),
        "worst_rss_error": max(
            (r["rss_error"] for r in ok if r["rss_error"] is not None), key=abs, default=None
        ),
        "median_time_ratio": statistics.median(r["predicted_step_s"] / r["measured_step_s"] for r in timed)
        if timed
        else None,
        "time_within_20_percent": sum(
            abs(r["predicted_step_s"] / r["measured_step_s"] - 1) <= 0.2 for r in timed
        ),
    }
    drops = [r for r in ok if r.get("ordinary_predicted_bytes") is not None]
    if drops:  # predicted drop - measured drop, as a fraction of the measured ordinary peak
        gaps = [
            (
                (r["ordinary_predicted_bytes"] - r["predicted_bytes"])
                - (r["ordinary_measured_bytes"] - r["measured_bytes"])
            )
            / r["ordinary_measured_bytes"]
            for r in drops
        ]
        summary["worst_drop_error"] = max(gaps, key=abs)
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
                "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, other work "
                "running beside it",
                "device": args.device,
                "summary": summary,
                "rows": rows,
            },
            indent=1,
        )
    )


def _line(r: dict[str, Any]) -> str:
    mib = 2**20
    t = (
        f"time {r['predicted_step_s'] * 1e3:7.0f} / {r['measured_step_s'] * 1e3:7.0f} ms "
        f"({r['predicted_step_s'] / r['measured_step_s']:.2f}x)"
        if r["predicted_step_s"]
        else "time -"
    )
    rss = "-" if r["rss_error"] is None else f"{r['rss_error']:+6.1%}"
    drop = ""
    if r.get("ordinary_predicted_bytes") is not None:
        drop = (
            f"; drop from ordinary {(r['ordinary_predicted_bytes'] - r['predicted_bytes']) / mib:6.2f} / "
            f"{(r['ordinary_measured_bytes'] - r['measured_bytes']) / mib:6.2f} MiB"
        )
    return (
        f"{r['config']:45s} peak {r['predicted_bytes'] / mib:8.1f} / {r['measured_bytes'] / mib:8.1f} MiB "
        f"({r['error']:+6.1%}); RSS growth {r['rss_growth_bytes'] / mib:8.1f} MiB ({rss}); {t}{drop}"
    )


if __name__ == "__main__":
    main()
