"""The compiled path: memfit's solver decides what ``torch.compile``'s forward saves and its backward recomputes.

``memfit.remat.backend(budget=...)`` is a ``torch.compile`` backend: inductor with memfit's partitioner in
AOTAutograd's partition step, judged against a model of inductor's fusion and buffer plan.
"""
