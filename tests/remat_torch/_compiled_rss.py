"""Child process of test_compiled: compile a step with memfit's backend at several budgets and measure each step's
peak by process RSS (run with MALLOC_MMAP_THRESHOLD_ so that large blocks go back to the OS when freed).

    python _compiled_rss.py MODEL COMPILER BUDGET [BUDGET ...]    (BUDGET: a float, or "none")

Prints one JSON line per budget: the plan's figures and the measured peak (VmHWM after a reset, less VmRSS before).
"""

import json
import sys
from pathlib import Path

import torch

import memfit.remat
from memfit.models import GPT, GPTConfig, lm_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import mlp, vector_batch, xent


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(width=512, depth=6), xent, vector_batch(1024, 512)
    if name == "gpt":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (16, 129), generator=g)
        model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128))
        return model, lm_loss, (ids[:, :-1], ids[:, 1:])
    raise ValueError(name)


def main() -> None:
    name, compiler, budgets = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    model, loss_fn, batch = build(name)
    for text in budgets:
        budget = None if text == "none" else float(text)
        torch._dynamo.reset()
        backend = memfit.remat.backend(budget=budget, compiler=compiler)
        step = torch.compile(lambda b: loss_fn(model, b), backend=backend)
        for _ in range(2):  # compile, then one warm step
            for p in model.parameters():
                p.grad = None
            step(batch).backward()
        for p in model.parameters():
            p.grad = None
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _rss("VmRSS")
        step(batch).backward()
        measured = _rss("VmHWM") - before
        plans = [p.to_dict() for p in backend.plans]
        print(json.dumps({"budget": budget, "measured": measured, "plans": plans}), flush=True)


if __name__ == "__main__":
    main()
