"""Child process of test_compiled and test_zoo_compiled: compile a step with memfit's backend at several budgets and
measure each step's peak by process RSS (run with MALLOC_MMAP_THRESHOLD_ so that large blocks go back to the OS when
freed).

    python _compiled_rss.py MODEL COMPILER BUDGET [BUDGET ...] [--layout-opt 0|1] [--no-dropout] [--save FILE]
        [--trim 0|1] [--plug 0|1] [--steps N] [--peak max|median]
    python _compiled_rss.py conv-scratch
    python _compiled_rss.py heap-holes

MODEL: ``mlp``, ``gpt``, or a zoo model as ``zoo:NAME`` (``zoo.py``'s ``"small"`` size) or ``zoo:NAME:SIZE``.
COMPILER: ``inductor`` or ``aot_eager`` (memfit's backend with that compiler), ``torch`` (``torch.compile``'s own
default, no memfit: BUDGET must be ``none``) or ``eager`` (no compile: BUDGET must be ``none``). BUDGET: a float,
or ``none``. ``--layout-opt`` sets ``torch._inductor.config.layout_optimization`` (inductor's own default when
absent); ``--no-dropout`` sets every ``nn.Dropout``'s ``p`` and HF's float attention dropout rates to 0; ``--save FILE`` writes, for the last budget, the
loss, the gradients and the buffers after its first step (from the state the model was built in, generator seeded
with 7) to ``FILE`` (``torch.save``), for the caller to compare with eager's.

Prints one JSON line per budget: the plan's figures, the measured peak (VmHWM after a reset, less VmRSS before: the
largest over ``--steps`` steps, or their median with ``--peak median``), each step's peak, the median step time
(process CPU seconds; one thread) and the compile time (wall).
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import memfit.remat
from memfit.models import GPT, GPTConfig, lm_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo

from models import mlp, vector_batch, xent


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    """glibc's ``malloc_trim(0)``: return the free pages of every arena to the OS. Without it, free heap chunks left
    by earlier steps stay resident, and the measured step reuses them for its tensors (glibc serves a request from
    a free chunk before it maps a new one, whatever the mmap threshold): its RSS then rises by less than it
    allocates."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


_LIBC = None


def _libc():
    import ctypes

    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc.restype = ctypes.c_void_p
        _LIBC.malloc.argtypes = [ctypes.c_size_t]
        _LIBC.free.argtypes = [ctypes.c_void_p]
    return _LIBC


def _plug() -> list[int]:
    """Take every free heap chunk of 64 KiB or more out of glibc's reach for the measured step (``malloc`` them,
    pages untouched, so not resident): the step's tensors of the mmap threshold or more are then mapped anew and
    unmapped when freed. Without it, glibc serves a large tensor from a free chunk of the heap (a hole ``malloc_trim``
    left with its pages returned): RSS rises when the tensor is written but does not fall when it is freed, since a
    freed heap chunk stays resident (GPT-NeoX at 0.5: ``del mul_47`` of a 256 KiB saved activation lowered RSS by 0
    while inductor's plan freed it; its pointer was not at the 64-byte offset of a fresh mapping). Returns the
    pointers, for :func:`_unplug` after the step."""
    import ctypes

    libc, plugs = _libc(), []
    size = 1 << 26
    while size >= 1 << 16:
        p = libc.malloc(size)
        if not p:
            break
        if ctypes.c_size_t.from_address(p - 8).value & 2:  # IS_MMAPPED: no free chunk of this size is left
            libc.free(p)
            size //= 2
            continue
        plugs.append(p)
    return plugs


def _unplug(plugs: list[int]) -> None:
    libc = _libc()
    for p in plugs:
        libc.free(p)


def build(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(width=512, depth=6), xent, vector_batch(1024, 512)
    if name == "gpt":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (16, 129), generator=g)
        model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128))
        return model, lm_loss, (ids[:, :-1], ids[:, 1:])
    if name.startswith("zoo:"):
        _, model_name, *size = name.split(":")
        model, loss_fn, batch = zoo.BUILDERS[model_name](size[0] if size else "small")
        model.train()
        return model, loss_fn, batch
    raise ValueError(name)


def conv_scratch() -> None:
    """``python _compiled_rss.py conv-scratch``: the peak RSS of single oneDNN convolution calls (forward and
    backward, batch 16, both layouts) and the bytes of their outputs, one JSON line per shape: what
    ``memfit._compat.inductor_wrapper_plan``'s ``onednn_scratch`` rule restates."""
    torch.set_num_threads(1)

    def peak(f):
        """The highest of three measured calls: a call whose scratch glibc or oneDNN serves from memory already
        resident reads low (a single call read a 256-channel forward at 0.896 of its weight)."""
        f()  # warm: oneDNN's primitive caches
        runs = [peak_once(f) for _ in range(3)]
        return max(r[0] for r in runs), runs[0][1]

    def peak_once(f):
        # heap holes plugged (:func:`_plug`): oneDNN's scratch served from a resident free chunk raised no RSS (a
        # forward at 256 channels read 10.4% under its weight in one fresh-clone run)
        _trim()
        plugs = _plug()
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss("VmRSS")
        out = f()
        outputs = sum(o.numel() * o.element_size() for o in out if o is not None)
        high = _rss("VmHWM") - before
        del out
        _unplug(plugs)
        return high, outputs

    for cl in (False, True):
        for ci, co, hw, k, s in [
            (512, 512, 2, 3, 1),
            (256, 512, 4, 3, 2),
            (256, 256, 4, 3, 1),
            (128, 128, 8, 3, 1),
        ]:
            x, w = torch.randn(16, ci, hw, hw), torch.randn(co, ci, k, k)
            if cl:
                x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
            conv = (None, (s, s), (k // 2, k // 2), (1, 1), False, (0, 0), 1)
            y = torch.ops.aten.convolution.default(x, w, *conv)
            g = torch.randn_like(y)
            fwd = peak(lambda x=x, w=w, conv=conv: (torch.ops.aten.convolution.default(x, w, *conv),))
            bwd = peak(
                lambda g=g, x=x, w=w, conv=conv: torch.ops.aten.convolution_backward.default(
                    g, x, w, [0], *conv[1:], [True, True, False]
                )
            )
            row = {"channels_last": cl, "shape": [16, ci, hw, hw], "weight": list(w.shape), "stride": s,
                   "weight_bytes": w.numel() * 4, "out_bytes": y.numel() * 4,
                   "fwd_peak": fwd[0], "fwd_outputs": fwd[1], "bwd_peak": bwd[0], "bwd_outputs": bwd[1]}  # fmt: skip
            print(json.dumps(row), flush=True)


def heap_holes() -> None:
    """``python _compiled_rss.py heap-holes``: what freeing a 1 MiB tensor returns to the OS when a free heap hole
    could hold it (small tensors freed below a live one, then ``malloc_trim``), without and with :func:`_plug`; one
    JSON line of bytes."""
    torch.set_num_threads(1)
    drops = {}
    for plug in (False, True):
        small = [torch.ones(8192) for _ in range(64)]  # 32 KiB each: heap chunks below the mmap threshold
        pin = torch.ones(8192)  # a live chunk above them: the hole they leave is not the heap's top
        del small
        _trim()
        plugs = _plug() if plug else []
        big = torch.ones(1 << 18)  # 1 MiB, written: resident
        before = _rss("VmRSS")
        del big
        drops["plugged" if plug else "plain"] = before - _rss("VmRSS")
        _unplug(plugs)
        del pin
    print(json.dumps(drops), flush=True)


def main() -> None:
    if sys.argv[1:] == ["conv-scratch"]:
        conv_scratch()
        return
    if sys.argv[1:] == ["heap-holes"]:
        heap_holes()
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("compiler", choices=["inductor", "aot_eager", "torch", "eager"])
    parser.add_argument("budgets", nargs="+")
    parser.add_argument("--layout-opt", type=int, choices=[0, 1], default=None)
    parser.add_argument("--no-dropout", action="store_true")
    parser.add_argument("--save", default=None)
    parser.add_argument(
        "--trim", type=int, choices=[0, 1], default=0, help="malloc_trim(0) before each measured step"
    )
    parser.add_argument(
        "--plug",
        type=int,
        choices=[0, 1],
        default=0,
        help="after the trim, hold glibc's free heap chunks of 64 KiB or more through each measured step",
    )
    parser.add_argument("--steps", type=int, default=1, help="measured steps")
    parser.add_argument(
        "--peak",
        choices=["max", "median"],
        default="max",
        help="the measured peak: the largest of the steps' peaks, or their median",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.layout_opt is not None:
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = bool(args.layout_opt)
    model, loss_fn, batch = build(args.model)
    if args.no_dropout:
        zoo.no_dropout(model)
    # the state the model was built in, for --save's step (buffers updated once from it); not kept otherwise
    initial = copy.deepcopy(model.state_dict()) if args.save else None
    for text in args.budgets:
        budget = None if text == "none" else float(text)
        if args.compiler in ("torch", "eager") and budget is not None:
            raise SystemExit(f"compiler {args.compiler} takes no budget, got {text}")
        torch._dynamo.reset()
        if initial is not None:
            model.load_state_dict(initial)
        backend = None
        if args.compiler == "eager":
            step = lambda b: loss_fn(model, b)  # noqa: E731
        elif args.compiler == "torch":
            step = torch.compile(lambda b: loss_fn(model, b))
        else:
            backend = memfit.remat.backend(budget=budget, compiler=args.compiler)
            step = torch.compile(lambda b: loss_fn(model, b), backend=backend)
        t0 = time.perf_counter()
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(7)
        loss = step(batch)
        loss.backward()
        compile_s = time.perf_counter() - t0
        if args.save:
            torch.save(
                {
                    "loss": loss.detach(),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                    "buffers": {n: b.clone() for n, b in model.named_buffers()},
                },
                args.save,
            )
        del loss
        for p in model.parameters():  # one warm step
            p.grad = None
        step(batch).backward()
        times, steps = [], []
        for _ in range(args.steps):
            for p in model.parameters():
                p.grad = None
            if args.trim:
                _trim()
            plugs = _plug() if args.plug else []
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _rss("VmRSS")
            c0 = time.process_time()
            step(batch).backward()
            times.append(time.process_time() - c0)
            steps.append(_rss("VmHWM") - before)
            _unplug(plugs)
        measured = max(steps) if args.peak == "max" else int(statistics.median(steps))
        plans = [] if backend is None else [p.to_dict() for p in backend.plans]
        row = {
            "model": args.model,
            "compiler": args.compiler,
            "budget": budget,
            "layout_opt": args.layout_opt,
            "no_dropout": args.no_dropout,
            "trim": bool(args.trim),
            "plug": bool(args.plug),
            "measured": measured,
            "measured_steps": steps,
            "step_cpu_s": statistics.median(times),
            "compile_s": compile_s,
            "plans": plans,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
