"""Data-parallel training of memfit's demo GPT with SM3, on CPU with gloo (or GPUs with nccl).

    torchrun --standalone --nproc-per-node 2 examples/ddp_demo.py --steps 60

Each rank reads its own batches of the default corpus (CPython's ``pydoc_data/topics.py``), DDP averages the
gradients, and SM3 steps identically on every rank (``tests/distributed`` checks DDP + SM3 against one process fed
the averaged gradients, bitwise). Rank 0 prints the loss; at the end every rank checks that its parameters equal
rank 0's. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from memfit.data import TextDataset
from memfit.models import get_model, lm_loss
from memfit.optim import SM3, sm3_warmup_schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", help="a memfit.models GPT preset")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8, help="per rank")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", rank % torch.cuda.device_count())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = get_model(args.model).build().to(device)
    ddp = DistributedDataParallel(model)
    opt = SM3(ddp.parameters(), lr=args.lr, momentum=0.0)
    sched = sm3_warmup_schedule(opt, warmup_steps=max(1, args.steps // 10))
    data = TextDataset.from_file(None)

    for step in range(args.steps):
        x, y = data.batch("train", step * world + rank, args.batch_size, args.seq_len, seed=args.seed)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(ddp, (x.to(device), y.to(device)))
        loss.backward()
        opt.step()
        sched.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  (rank 0's batch, {world} ranks)", flush=True)

    # every rank must hold the same model: DDP averaged the gradients, SM3 is deterministic
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(ref, p.detach()):
            raise RuntimeError(f"rank {rank}: parameters diverged from rank 0's")
    if rank == 0:
        print(f"done: {args.steps} steps on {world} ranks; parameters identical on every rank", flush=True)
    # Tear down in order: every rank done with its collectives, then DDP's reducer (it holds the process group and
    # sits in reference cycles) freed now rather than during interpreter shutdown, where gloo's worker threads can
    # abort the process (a rare "terminate called without an active exception", seen once in CI).
    dist.barrier()
    del ddp, opt, sched
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
