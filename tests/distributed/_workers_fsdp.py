"""SM3 under FSDP2 (``fully_shard``, DTensor parameters) and distributed checkpoints, on 2 gloo processes.

The model has uneven shards on purpose: a 33-row weight and bias (17 + 16 rows), a 5-row weight (3 + 2), a
1-row weight (1 + 0: rank 1's shard is empty) and a rank-3 tensor. Each rank also keeps an unsharded copy
driven by a plain SM3 fed the same full gradients (``full_tensor()``): the single-process run.
``run`` executes on each rank (inside the session's single spawn, see ``conftest.py``) and returns numpy
arrays and flags that ``test_dist_fsdp.py`` asserts on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from memfit.optim import SM3

STEPS = 4
CONFIGS = {
    "II+momentum": {"lr": 0.05, "momentum": 0.9},
    "I": {"lr": 0.05, "momentum": 0.0, "variant": "I"},
    "II+ema+wd": {"lr": 0.05, "momentum": 0.5, "beta2": 0.95, "weight_decay": 0.01},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 33)  # weight (33, 6), bias (33,): 17 + 16 rows
        self.lin2 = nn.Linear(33, 5)  # weight (5, 33): 3 + 2 rows
        self.row = nn.Parameter(torch.randn(1, 5))  # 1 + 0 rows: an empty shard on rank 1
        self.cube = nn.Parameter(torch.randn(3, 5, 2))  # rank 3

    def forward(self, x):
        y = self.lin2(torch.tanh(self.lin1(x))) * self.row
        return y + torch.einsum("bj,ijk->bk", y, self.cube).sum(-1, keepdim=True)


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def _batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 6, generator=gen, dtype=torch.float64)


def _loss(model, x):
    return (model(x) ** 2).mean() + model(x).sum() * 0.1


def _sharded(seed, hyper, mesh):
    from torch.distributed.fsdp import fully_shard

    model = _net(seed)
    ref = copy.deepcopy(model)
    fully_shard(model, mesh=mesh)
    return (
        model,
        SM3(model.parameters(), fused=False, **hyper),
        ref,
        SM3(ref.parameters(), fused=False, **hyper),
    )


def _train(model, opt, ref, ref_opt, rank, steps, first, counter=None):
    """FSDP steps on rank-distinct data; the reference takes the same full (averaged) gradients."""
    for s in range(first, first + steps):
        opt.zero_grad()
        _loss(model, _batch(rank, s)).backward()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.grad = p.grad.full_tensor()
        if counter is not None:
            counter["n"] = 0
        opt.step()
        if counter is not None:
            counter.setdefault("per_step", []).append(counter["n"])
        ref_opt.step()


def run(rank: int, world: int, ckpt_dir: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {"configs": {}}
    real_all_reduce = dist.all_reduce
    counter: dict = {}

    def counting(*args, **kwargs):
        counter["n"] = counter.get("n", 0) + 1
        return real_all_reduce(*args, **kwargs)

    for name, hyper in CONFIGS.items():
        model, opt, ref, ref_opt = _sharded(0, hyper, mesh)
        counter.clear()
        dist.all_reduce = counting
        try:
            _train(model, opt, ref, ref_opt, rank, STEPS, 0, counter)
        finally:
            dist.all_reduce = real_all_reduce
        res: dict = {"params": [], "ref_params": [], "acc_diffs": [], "placements": {}, "not_dtensor": []}
        for (fqn, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            res["params"].append(p.full_tensor().detach().numpy())
            res["ref_params"].append(q.detach().numpy().copy())
            for key, v in opt.state[p].items():
                if key == "step":
                    continue
                if not isinstance(v, DTensor):
                    res["not_dtensor"].append(f"{fqn}.{key}")
                    continue
                res["placements"][f"{fqn}.{key}"] = [repr(pl) for pl in v.placements]
                want = ref_opt.state[q][key]
                res["acc_diffs"].append(float((v.full_tensor() - want).abs().max()))
        res["param_placements"] = {
            fqn: [repr(pl) for pl in p.placements] for fqn, p in model.named_parameters()
        }
        res["all_reduces_per_step"] = counter["per_step"]
        out["configs"][name] = res

    # -- DCP round trip: save on 2 ranks, load into a fresh sharded model + SM3, compare each rank's own state.
    model, opt, ref, ref_opt = _sharded(0, CONFIGS["II+momentum"], mesh)
    _train(model, opt, ref, ref_opt, rank, STEPS, 0)
    saved = {
        f"{fqn}.{k}": v.to_local().clone() for fqn, p in model.named_parameters()
        for k, v in opt.state[p].items() if k != "step"
    }  # fmt: skip
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=f"{ckpt_dir}/sharded",
    )
    model2, opt2, _, _ = _sharded(7, CONFIGS["II+momentum"], mesh)  # other initial weights: load must win
    target = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(target, checkpoint_id=f"{ckpt_dir}/sharded")
    set_model_state_dict(model2, target["model"])
    set_optimizer_state_dict(model2, opt2, target["optim"])
    loaded = {
        f"{fqn}.{k}": v.to_local() for fqn, p in model2.named_parameters()
        for k, v in opt2.state[p].items() if k != "step"
    }  # fmt: skip
    out["dcp_keys_match"] = sorted(saved) == sorted(loaded)
    out["dcp_state_diffs"] = {
        k: float((saved[k] - loaded[k]).abs().max()) if saved[k].numel() else 0.0 for k in saved
    }
    out["dcp_local_acc0"] = saved["lin1.weight.accumulator_0"].numpy()  # rank-distinct rows
    out["dcp_steps"] = [float(opt2.state[p]["step"]) for p in model2.parameters()]
    # Both continue with the same data: identical parameters.
    _train(model, opt, ref, ref_opt, rank, 2, STEPS)
    _train(
        model2, opt2, copy.deepcopy(ref), SM3(copy.deepcopy(ref).parameters(), fused=False), rank, 2, STEPS
    )
    out["dcp_continue_diffs"] = [
        float((p.to_local() - q.to_local()).abs().max().detach()) if p.to_local().numel() else 0.0
        for p, q in zip(model.parameters(), model2.parameters(), strict=True)
    ]

    # -- The trap this design avoids: a rank-local plain tensor saved by DCP comes back as rank 0's value.
    plain = {"x": torch.full((3,), float(rank + 1))}
    dcp.save(plain, checkpoint_id=f"{ckpt_dir}/plain")
    back = {"x": torch.zeros(3)}
    dcp.load(back, checkpoint_id=f"{ckpt_dir}/plain")
    out["plain_trap_value"] = back["x"].numpy()

    # -- A placement whose per-axis maxima are not local (Partial) is refused with the placement named.
    from torch.distributed.tensor import Partial

    bad = nn.Parameter(DTensor.from_local(torch.ones(2, 3, dtype=torch.float64), mesh, [Partial()]))
    bad.grad = DTensor.from_local(torch.ones(2, 3, dtype=torch.float64), mesh, [Partial()])
    try:
        SM3([bad], fused=False).step()
        out["partial_error"] = ""
    except ValueError as e:
        out["partial_error"] = str(e)

    # -- 2 -> 1 export: full state dicts (rank 0), then the data for continuing in a single process.
    model, opt, ref, ref_opt = _sharded(0, CONFIGS["II+momentum"], mesh)
    _train(model, opt, ref, ref_opt, rank, STEPS, 0)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, opt, options=full)
    if rank == 0:
        # Saved now: like any optimizer's state_dict(), it shares the (plain) step tensors with the live state.
        torch.save({"model": msd, "optim": osd}, f"{ckpt_dir}/full.pt")
    grads, params = [], []
    for s in range(STEPS, STEPS + 2):
        opt.zero_grad()
        _loss(model, _batch(rank, s)).backward()
        grads.append({fqn: p.grad.full_tensor().detach().numpy() for fqn, p in model.named_parameters()})
        opt.step()
    params = {fqn: p.full_tensor().detach().numpy() for fqn, p in model.named_parameters()}
    if rank == 0:
        out["export_ref_state"] = {
            fqn: {k: v.numpy().copy() for k, v in ref_opt.state[q].items()}
            for fqn, q in ref.named_parameters()
        }
        out["export_grads"], out["export_params"] = grads, params
    return out
