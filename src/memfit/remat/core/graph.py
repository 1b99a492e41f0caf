"""The computation graph that every rematerialization solver works on.

A node is a value: its output's size in bytes, the cost (seconds, or any unit) of computing it, and
the values it reads (``deps``). Nodes are added in a topological order -- a dependency must exist
before its user -- so a :class:`Graph` is a DAG by construction and node ids (``0, 1, ...``) are a
topological order. Flags:

- ``input``: resident from the start to the end (parameters, buffers, the batch); never computed.
- ``output``: must be resident at the end (the loss, the gradients).
- ``recomputable=False``: computed at most once (random ops, ops with side effects).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from memfit.remat.core.errors import GraphError

__all__ = ["Graph"]

_FORMAT_VERSION = 1


class Graph:
    """A DAG of values with sizes and costs.

    Example:
        >>> g = Graph()
        >>> x = g.add("x", 400, input=True)
        >>> h = g.add("h", 400, cost=1.0, deps=[x])
        >>> y = g.add("y", 4, cost=0.1, deps=[h], output=True)
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._bytes: list[int] = []
        self._cost: list[float] = []
        self._deps: list[tuple[int, ...]] = []
        self._users: list[list[int]] = []
        self._input: list[bool] = []
        self._output: list[bool] = []
        self._recomputable: list[bool] = []
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ building
    def add(
        self,
        name: str,
        bytes: int,
        cost: float = 1.0,
        deps: Iterable[int | str] = (),
        *,
        input: bool = False,
        output: bool = False,
        recomputable: bool = True,
    ) -> int:
        """Add a node and return its id.

        Args:
            name: unique name.
            bytes: size of the node's value in bytes (an int >= 0; 0 for a view).
            cost: cost of computing it (finite, >= 0).
            deps: ids (or names) of nodes already in the graph that it reads.
            input: resident throughout; must have no deps.
            output: must be resident at the end.
            recomputable: if False the node is computed at most once.

        Returns:
            The new node's id (ids count up from 0 in insertion order).

        Raises:
            GraphError: duplicate name, unknown dependency, negative or non-integer size, a
                negative or non-finite cost, or an input with dependencies.
        """
        if not isinstance(name, str) or not name:
            raise GraphError(f"node name must be a non-empty str, got {name!r}")
        if name in self._index:
            raise GraphError(f"duplicate node name {name!r} (already node {self._index[name]})")
        if isinstance(bytes, bool) or not isinstance(bytes, (int, np.integer)):
            raise GraphError(f"node {name!r}: bytes must be an int, got {bytes!r}")
        if bytes < 0:
            raise GraphError(f"node {name!r}: bytes must be >= 0, got {bytes}")
        cost_f = float(cost)
        if not math.isfinite(cost_f) or cost_f < 0:
            raise GraphError(f"node {name!r}: cost must be finite and >= 0, got {cost!r}")
        dep_ids: list[int] = []
        for d in deps:
            dep_ids.append(self._resolve(d, user=name))
        dep_t = tuple(dict.fromkeys(dep_ids))  # de-duplicate, keep order
        if input and dep_t:
            raise GraphError(f"input node {name!r} cannot have deps, got {list(dep_t)}")
        v = len(self._names)
        self._names.append(name)
        self._index[name] = v
        self._bytes.append(int(bytes))
        self._cost.append(cost_f)
        self._deps.append(dep_t)
        self._users.append([])
        for d in dep_t:
            self._users[d].append(v)
        self._input.append(bool(input))
        self._output.append(bool(output))
        self._recomputable.append(bool(recomputable))
        self._cache.clear()
        return v

    def _resolve(self, d: int | str, *, user: str) -> int:
        if isinstance(d, str):
            if d not in self._index:
                raise GraphError(f"node {user!r}: unknown dependency {d!r}")
            return self._index[d]
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d < len(self._names):
            raise GraphError(
                f"node {user!r}: unknown dependency {d!r} (ids 0..{len(self._names) - 1} exist; "
                "a dependency must be added before its user)"
            )
        return int(d)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return (
            f"Graph({len(self)} nodes, {len(self.inputs)} inputs, {len(self.outputs)} outputs, "
            f"{sum(self._bytes):,} bytes)"
        )

    def id(self, name: str) -> int:
        """The id of the node called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise GraphError(f"no node named {name!r}") from None

    def name(self, v: int) -> str:
        """The name of node ``v``."""
        return self._names[v]

    def nbytes(self, v: int) -> int:
        """Size of node ``v``'s value in bytes."""
        return self._bytes[v]

    def cost(self, v: int) -> float:
        """Cost of computing node ``v``."""
        return self._cost[v]

    def deps(self, v: int) -> tuple[int, ...]:
        """Ids of the nodes that ``v`` reads."""
        return self._deps[v]

    def users(self, v: int) -> tuple[int, ...]:
        """Ids of the nodes that read ``v`` (ascending)."""
        return tuple(self._users[v])

    def is_input(self, v: int) -> bool:
        """Whether ``v`` is resident from start to end."""
        return self._input[v]

    def is_output(self, v: int) -> bool:
        """Whether ``v`` must be resident at the end."""
        return self._output[v]

    def is_recomputable(self, v: int) -> bool:
        """Whether ``v`` may be computed more than once."""
        return self._recomputable[v]

    @property
    def names(self) -> tuple[str, ...]:
        """Node names by id."""
        return tuple(self._names)

    @property
    def inputs(self) -> tuple[int, ...]:
        """Ids of the input nodes."""
        return tuple(v for v, f in enumerate(self._input) if f)

    @property
    def outputs(self) -> tuple[int, ...]:
        """Ids of the output nodes."""
        return tuple(v for v, f in enumerate(self._output) if f)

    @property
    def input_bytes(self) -> int:
        """Bytes of all inputs: the floor under every schedule's peak."""
        return sum(b for b, f in zip(self._bytes, self._input, strict=True) if f)

    def needed(self) -> list[int]:
        """Non-input nodes that some output depends on (or is), ascending: what a schedule computes.

        Raises:
            GraphError: the graph has no outputs.
        """
        if "needed" not in self._cache:
            if not any(self._output):
                raise GraphError(
                    "graph has no outputs: nothing to schedule (mark the loss/grads output=True)"
                )
            seen = [False] * len(self)
            stack = [v for v in range(len(self)) if self._output[v]]
            for v in stack:
                seen[v] = True
            while stack:
                v = stack.pop()
                for d in self._deps[v]:
                    if not seen[d]:
                        seen[d] = True
                        stack.append(d)
            self._cache["needed"] = [v for v in range(len(self)) if seen[v] and not self._input[v]]
        return list(self._cache["needed"])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(bytes int64[n], cost float64[n])`` as numpy arrays (cached)."""
        if "arrays" not in self._cache:
            self._cache["arrays"] = (
                np.asarray(self._bytes, dtype=np.int64),
                np.asarray(self._cost, dtype=np.float64),
            )
        out: tuple[np.ndarray, np.ndarray] = self._cache["arrays"]
        return out

    # ------------------------------------------------------------------ conversions
    def nx(self) -> Any:
        """A ``networkx.DiGraph`` view: nodes are ids with ``name``, ``bytes``, ``cost``, flags."""
        import networkx as nx

        dg = nx.DiGraph()
        for v in range(len(self)):
            dg.add_node(
                v,
                name=self._names[v],
                bytes=self._bytes[v],
                cost=self._cost[v],
                input=self._input[v],
                output=self._output[v],
                recomputable=self._recomputable[v],
            )
        for v in range(len(self)):
            for d in self._deps[v]:
                dg.add_edge(d, v)
        return dg

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        nodes = []
        for v in range(len(self)):
            node: dict[str, Any] = {
                "name": self._names[v],
                "bytes": self._bytes[v],
                "cost": self._cost[v],
                "deps": [self._names[d] for d in self._deps[v]],
            }
            if self._input[v]:
                node["input"] = True
            if self._output[v]:
                node["output"] = True
            if not self._recomputable[v]:
                node["recomputable"] = False
            nodes.append(node)
        return {"format": "memfit.remat.Graph", "version": _FORMAT_VERSION, "nodes": nodes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Graph:
        """Build a graph from :meth:`to_dict`'s format; nodes may be listed in any order.

        Raises:
            GraphError: unknown format version, unknown dependency, a cycle, or a bad node.
        """
        version = data.get("version")
        if version != _FORMAT_VERSION:
            raise GraphError(
                f"unsupported graph format version {version!r}; this memfit reads {_FORMAT_VERSION}"
            )
        raw: Sequence[Mapping[str, Any]] = data.get("nodes", [])
        by_name: dict[str, Mapping[str, Any]] = {}
        for node in raw:
            name = node.get("name")
            if not isinstance(name, str):
                raise GraphError(f"node without a str name: {dict(node)!r}")
            if name in by_name:
                raise GraphError(f"duplicate node name {name!r}")
            by_name[name] = node
        for name, node in by_name.items():
            for d in node.get("deps", []):
                if d not in by_name:
                    raise GraphError(f"node {name!r}: unknown dependency {d!r}")
        # Kahn's algorithm keeps the listed order where it is already topological.
        order = list(by_name)
        indeg = {n: len(set(by_name[n].get("deps", []))) for n in order}
        users: dict[str, list[str]] = {n: [] for n in order}
        for n in order:
            for d in dict.fromkeys(by_name[n].get("deps", [])):
                users[d].append(n)
        ready = [n for n in order if indeg[n] == 0]
        ready.reverse()
        topo: list[str] = []
        while ready:
            n = ready.pop()
            topo.append(n)
            for u in reversed(users[n]):
                indeg[u] -= 1
                if indeg[u] == 0:
                    ready.append(u)
        if len(topo) != len(order):
            stuck = sorted(n for n in order if indeg[n] > 0)
            raise GraphError(f"graph has a cycle through {stuck[:8]}{' ...' if len(stuck) > 8 else ''}")
        g = cls()
        for n in topo:
            node = by_name[n]
            g.add(
                n,
                node.get("bytes", 0),
                node.get("cost", 1.0),
                node.get("deps", []),
                input=bool(node.get("input", False)),
                output=bool(node.get("output", False)),
                recomputable=bool(node.get("recomputable", True)),
            )
        return g
