"""A test-only schedule generator, independent of memfit's solvers: evict a chosen set of values right after each
use and recompute them (recursively, with any missing deps) when they are needed again."""

from memfit.remat import Graph, Schedule


def evicting_schedule(g: Graph, evict: set[int]) -> Schedule:
    needed = g.needed()
    order = sorted(needed)  # node ids are a topological order by construction
    uses: dict[int, list[int]] = {v: [] for v in range(len(g))}
    for i, v in enumerate(order):
        for d in g.deps(v):
            uses[d].append(i)
    resident = set(g.inputs)
    events: list[tuple[str, int]] = []
    keep_forever = {v for v in needed if not g.is_recomputable(v)} | set(g.outputs)
    evict = {v for v in evict if g.is_recomputable(v) and v not in keep_forever}

    def ensure(v: int) -> None:
        if v in resident:
            return
        for d in g.deps(v):
            ensure(d)
        events.append(("compute", v))
        resident.add(v)

    for i, v in enumerate(order):
        for d in g.deps(v):
            ensure(d)
        ensure(v)
        for u in list(resident):
            if g.is_input(u) or u in keep_forever:
                continue
            later = any(j > i for j in uses[u])
            if u in evict or not later:
                # an evicted value goes right after use; every other one after its last use in the order
                events.append(("free", u))
                resident.discard(u)
    for v in g.outputs:
        ensure(v)
    s = Schedule(g, events, method="test-evict")
    s.validate()
    return s
