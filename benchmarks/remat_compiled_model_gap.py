"""How far is memfit's own model of a compiled step from inductor's buffer plan? For each model of the test zoo
(``tests/remat_torch/zoo.py``: HF BERT, Llama, T5, ViT, GPT-NeoX, Mixtral, Mamba, a torchvision-style ResNet-18)
and HF GPT-2, compiled on CPU inductor with ``memfit.remat.backend`` at several budgets:

- ``none``: torch's own partition (the backend only reports);
- ``0.7``, ``0.5``: fractions of the predicted peak with torch's partition;
- ``least``: a budget of one byte, which takes the lowest frontier point (the plan is marked infeasible).

Each row compares the plan's ``predicted_peak_bytes`` (memfit's model of the partitioned forward and backward graphs
handed to inductor, :func:`memfit.remat.compiled.model._graph_peak`) with ``compiled_peak_bytes`` (inductor's own
buffer plan, read from the wrapper code it generated for those same graphs, ``memfit._compat.inductor_wrapper_peak``):
the ratio is model / inductor. No refining compile (``refine=False``): the graphs compared are the model's choice.
The device rates are fixed (``RATES``) so that every process chooses the same plans.

Shapes are small (the compiles run on a loaded 2-core CPU): the zoo's ``"small"`` configs (hidden 128, 4 layers,
vocab 1024), language-model batches cut to 2 x 64 tokens, ResNet-18 (width 64) on a batch of 8 64x64 images.

    python benchmarks/remat_compiled_model_gap.py                          # every model
    python benchmarks/remat_compiled_model_gap.py --models bert resnet18 --budgets none 0.5
    python benchmarks/remat_compiled_model_gap.py --report                 # the table of the last run's JSON

Each model compiles in a process of its own; each (model, budget) is written to the JSON as soon as it is known, and
a rerun skips the pairs already there (``--fresh`` starts over). Writes
``benchmarks/results/remat_compiled_model_gap.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "remat_torch"))
import zoo

RESULTS = Path(__file__).resolve().parent / "results"
PATH = RESULTS / "remat_compiled_model_gap.json"
MODELS = [
    "memfit_gpt", "gpt2", "bert", "llama", "t5", "resnet18", "vit", "gpt_neox", "mixtral_batched_mm", "mamba",
]  # fmt: skip
BUDGETS = ["none", "0.7", "0.5", "least"]
MIB = 2**20


def rates() -> Any:
    """Fixed device speeds (about this machine's calibrated ones): the same plans in every process."""
    import memfit.remat

    return memfit.remat.Rates(flops_per_s=2e10, bytes_per_s=5e9, op_overhead_s=5e-6)


def gpt2() -> zoo.Built:
    """HF ``GPT2LMHeadModel`` (LM head tied to the token embedding, dropout 0.1), causal LM loss."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=1024, n_positions=256, n_embd=128, n_layer=4, n_head=4)
    torch.manual_seed(0)
    ids = zoo._ids(2, 64, 1024)
    return transformers.GPT2LMHeadModel(cfg), zoo.hf_loss, {"input_ids": ids, "labels": ids}


def memfit_gpt() -> zoo.Built:
    """memfit's own GPT (``memfit.models.GPT``: 2 layers, d=128, weight-tied head), the docs' example, on 4 x 64
    tokens."""
    from memfit.models import GPT, GPTConfig, lm_loss

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 65), generator=g)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128))
    return model, lm_loss, (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


def build(name: str) -> zoo.Built:
    """The benchmark's shapes: the zoo's "small" models, LM batches of 2 x 64 tokens, ResNet-18 on 8 images."""
    if name == "gpt2":
        return gpt2()
    if name == "memfit_gpt":
        return memfit_gpt()
    model, loss_fn, batch = zoo.BUILDERS[name]("small")
    if name == "resnet18":
        x, y = batch
        return model, loss_fn, (x[:8].contiguous(), y[:8].contiguous())
    if isinstance(batch, dict):
        cut = {}
        for k, v in batch.items():
            v = v[:2]
            if k != "pixel_values" and v.dim() == 2:
                v = v[:, :64] if name != "t5" or k != "labels" else v[:, :32]
            cut[k] = v.contiguous()
        batch = cut
    return model, loss_fn, batch


def measure(name: str, budget_text: str) -> dict[str, Any]:
    """Compile ``name``'s step at one budget; the plan's model figure and inductor's plan (one warm-up step)."""
    import memfit.remat

    torch._dynamo.reset()
    model, loss_fn, batch = build(name)
    budget: int | float | None = (
        None if budget_text == "none" else 1 if budget_text == "least" else float(budget_text)
    )
    be = memfit.remat.backend(budget=budget, refine=False, rates=rates())
    step = torch.compile(lambda b: loss_fn(model, b), backend=be)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step(batch).backward()
    plans = [p.to_dict() for p in be.plans]
    for p in plans:
        p.pop("rates", None)
    predicted = (
        sum(p["predicted_peak_bytes"] for p in plans) if len(plans) > 1 else plans[0]["predicted_peak_bytes"]
    )
    compiled = [p["compiled_peak_bytes"] for p in plans]
    inductor = None if None in compiled else (sum(compiled) if len(plans) > 1 else compiled[0])
    return {
        "model": name,
        "budget": budget_text,
        "graphs": len(plans),
        "predicted": predicted,
        "inductor": inductor,
        "ratio": None if not inductor else predicted / inductor,
        "plans": plans,
    }


def _load() -> dict[str, Any]:
    return json.loads(PATH.read_text()) if PATH.exists() else {}


def _save(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    PATH.write_text(json.dumps(results, indent=1) + "\n")


def worker(name: str, budgets: list[str]) -> None:
    """Child process: one model, several budgets; one JSON line per budget on stdout."""
    torch.set_num_threads(1)
    for b in budgets:
        try:
            row = measure(name, b)
        except Exception as exc:  # a model this torch cannot compile: the row says why
            row = {"model": name, "budget": b, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("ROW " + json.dumps(row), flush=True)


def run(models: list[str], budgets: list[str], fresh: bool, redo: bool = False) -> dict[str, Any]:
    results = {} if fresh else _load()
    rows = results.setdefault("rows", {})
    if redo:  # measure these models' rows again
        for key in [k for k in rows if k.split()[0] in models and k.split()[1] in budgets]:
            del rows[key]
    results["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "note": "CPU inductor, 1 thread, other work running beside it; refine=False; fixed rates",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in models:
        todo = [b for b in budgets if f"{name} {b}" not in rows or "error" in rows[f"{name} {b}"]]
        if not todo:
            continue
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, *todo], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ROW "):
                row = json.loads(line[4:])
                rows[f"{name} {row['budget']}"] = row
                _save(results)
                _print_row(row)
        proc.wait()
    return results


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"{row['model']:<20} {row['budget']:>6}  error: {row['error'][:100]}", flush=True)
        return
    ind = row["inductor"]
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
    print(
        f"{row['model']:<20} {row['budget']:>6}  model {row['predicted'] / MIB:8.2f} MiB  inductor "
        f"{'-' if ind is None else f'{ind / MIB:8.2f}'} MiB  model/inductor {ratio}",
        flush=True,
    )


def report(results: dict[str, Any]) -> None:
    rows = results.get("rows", {})
    meta = results.get("meta", {})
    print(f"memfit's model vs inductor's buffer plan ({meta.get('date')}, {meta.get('machine')}, torch "
          f"{meta.get('torch')}; {meta.get('note')})")  # fmt: skip
    print(f"{'model':<20} {'budget':>6}  {'model MiB':>9} {'inductor MiB':>12} {'model/inductor':>14}")
    worst = 0.0
    for key in sorted(rows, key=lambda k: (MODELS.index(k.split()[0]) if k.split()[0] in MODELS else 99,
                                          BUDGETS.index(k.split()[1]))):  # fmt: skip
        row = rows[key]
        if "error" in row or row["ratio"] is None:
            print(f"{row['model']:<20} {row['budget']:>6}  {row.get('error', 'no inductor plan')[:80]}")
            continue
        worst = max(worst, abs(row["ratio"] - 1))
        print(
            f"{row['model']:<20} {row['budget']:>6}  {row['predicted'] / MIB:9.2f} {row['inductor'] / MIB:12.2f}"
            f" {row['ratio']:14.3f}"
        )
    print(f"worst |model/inductor - 1|: {worst:.3f}")
    print()
    print("| model | " + " | ".join(BUDGETS) + " |")
    print("|---|" + "---:|" * len(BUDGETS))
    for name in MODELS:
        cells = []
        for b in BUDGETS:
            row = rows.get(f"{name} {b}")
            cells.append("-" if not row or row.get("ratio") is None else f"{row['ratio']:.3f}")
        if any(c != "-" for c in cells):
            print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--budgets", nargs="+", default=BUDGETS, choices=BUDGETS)
    parser.add_argument("--fresh", action="store_true", help="forget the rows already in the JSON")
    parser.add_argument("--redo", action="store_true", help="measure the given models' rows again")
    parser.add_argument("--report", action="store_true", help="print the last run's table and exit")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1:])
        return
    if args.report:
        report(_load())
        return
    report(run(args.models, args.budgets, args.fresh, args.redo))


if __name__ == "__main__":
    main()
