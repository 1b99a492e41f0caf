"""SM3 under data parallelism on 2 gloo processes: DDP, ZeroRedundancyOptimizer, and remat steps.

``run`` executes on each rank (inside the session's single spawn, see ``conftest.py``) and returns numpy
arrays; ``test_dist_data_parallel.py`` compares them against single-process runs made in the pytest process.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from memfit.optim import SM3, CountSketchAdam

STEPS = 4
HYPER = {"lr": 0.05, "momentum": 0.9, "fused": False}
CS_HYPER = {"lr": 0.01, "sketch_ratio": 0.5}


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def _deep(seed: int) -> nn.Module:
    # Deep enough for the remat solver to find a schedule below the no-remat peak.
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 3)).double()


def _batch(rank: int, step: int, rows: int = 8) -> torch.Tensor:
    # Rank-distinct data: the average of the ranks' gradients differs from either one.
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, 5, generator=gen, dtype=torch.float64)


def _loss(model, x):
    return ((model(x) - x[:, :3].sin()) ** 2).mean()


def _arrays(tensors):
    return [t.detach().clone().numpy() for t in tensors]


def _grads(model):
    return [p.grad.detach().clone().numpy() for p in model.parameters()]


def run(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import memfit.remat
    from memfit.distributed import all_reduce_grads

    out: dict = {}
    # -- DDP + SM3 (and CountSketchAdam): each step's reduced gradient and this rank's own one (a plain copy).
    for prefix, make_opt in (
        ("", lambda ps: SM3(ps, **HYPER)),
        ("cs_", lambda ps: CountSketchAdam(ps, **CS_HYPER)),
    ):
        model = _mlp(0)
        plain = copy.deepcopy(model)
        ddp = DDP(model)
        opt = make_opt(ddp.parameters())
        out[prefix + "ddp_grads"], out[prefix + "local_grads"] = [], []
        for s in range(STEPS):
            x = _batch(rank, s)
            plain.load_state_dict(model.state_dict())
            plain.zero_grad()
            _loss(plain, x).backward()
            out[prefix + "local_grads"].append(_grads(plain))
            opt.zero_grad()
            _loss(ddp, x).backward()
            out[prefix + "ddp_grads"].append(_grads(model))
            opt.step()
        out[prefix + "ddp_params"] = _arrays(model.parameters())

    # -- ZeRO: SM3 sharded by parameter; consolidate on rank 0, load into a plain SM3, continue both.
    model = _mlp(1)
    ddp = DDP(model)
    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=SM3, **HYPER)
    for s in range(STEPS):
        zero.zero_grad()
        _loss(ddp, _batch(rank, 10 + s)).backward()
        zero.step()
    zero.consolidate_state_dict(to=0)
    single = single_opt = None
    if rank == 0:
        sd = zero.state_dict()
        out["zero_state_steps"] = sorted(float(st["step"]) for st in sd["state"].values())
        out["zero_state_keys"] = [sorted(st) for st in sd["state"].values()]
        single = copy.deepcopy(model)
        single_opt = SM3(single.parameters(), **HYPER)
        single_opt.load_state_dict(sd)
        out["zero_loaded_acc"] = _arrays(single_opt.state[single[0].weight][k] for k in ("accumulator_0",))
    out["zero_owned"] = [len(zero.optim.state)]  # parameters whose state lives on this rank
    diffs = []
    for s in range(2):
        zero.zero_grad()
        _loss(ddp, _batch(rank, 20 + s)).backward()
        if rank == 0:
            for p, q in zip(single.parameters(), model.parameters(), strict=True):
                p.grad = q.grad.clone()  # the all-reduced gradient, as a single process would be fed
            single_opt.step()
        zero.step()
        if rank == 0:
            diffs.append(
                max(
                    (p - q).abs().max().item()
                    for p, q in zip(single.parameters(), model.parameters(), strict=True)
                )
            )
    out["zero_continue_diffs"] = diffs

    # -- remat.compile on the plain module, gradients averaged with all_reduce_grads; DDP + autograd as the truth.
    model = _deep(2)
    ref = DDP(copy.deepcopy(model))
    x = _batch(rank, 30, rows=32)
    step = memfit.remat.compile(model, _loss, x, budget=0.8)
    step(x)
    out["remat_local_grads"] = _grads(model)
    per_tensor = copy.deepcopy(model)  # same local gradients, reduced one tensor per bucket
    for p, q in zip(per_tensor.parameters(), model.parameters(), strict=True):
        p.grad = q.grad.clone()
    out["per_tensor_calls"] = all_reduce_grads(per_tensor, bucket_bytes=1)
    out["per_tensor_grads"] = _grads(per_tensor)
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    try:
        out["remat_calls_returned"] = all_reduce_grads(model)
    finally:
        dist.all_reduce = real_all_reduce
    out["remat_calls_counted"] = calls["n"]
    out["remat_grads"] = _grads(model)
    _loss(ref, x).backward()
    out["ddp_ref_grads"] = _grads(ref.module)
    return out
