"""Looking inside autograd: requires_grad at each stage, and which parameters the graph reaches.

Used by the notebooks to show where the simplified version cuts the gradient, and to measure
(not assume) which arrows of the gradient-flow picture carried a gradient.
"""

import torch


def snapshot(t: torch.Tensor) -> dict:
    """What autograd says about `t` now: shape, requires_grad, is_leaf, grad_fn and whether .grad is set."""
    return {"shape": str(tuple(t.shape)), "requires_grad": str(t.requires_grad), "is_leaf": str(t.is_leaf),
            "grad_fn": type(t.grad_fn).__name__ if t.grad_fn is not None else "None",
            ".grad set": str(_grad(t) is not None)}


def _grad(t: torch.Tensor):
    return t.grad if t.is_leaf or t.retains_grad else None  # reading .grad of any other tensor only warns


def stage_table(stages: dict) -> str:
    """A text table, one row a stage; each value is a tensor (read now) or an earlier snapshot() of one."""
    rows = [("stage", "shape", "requires_grad", "is_leaf", "grad_fn", ".grad set")]
    for name, t in stages.items():
        s = t if isinstance(t, dict) else snapshot(t)
        rows.append((name, s["shape"], s["requires_grad"], s["is_leaf"], s["grad_fn"], s[".grad set"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def reached_parameters(output: torch.Tensor) -> set[int]:
    """ids of the leaf tensors that output.backward() would give a gradient (walks grad_fn)."""
    seen, found, todo = set(), set(), [output.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: the end of a path, at a leaf
            found.add(id(fn.variable))
        todo.extend(f for f, _ in fn.next_functions)
    return found


def graph_reaches(output: torch.Tensor, module) -> bool:
    """Does the autograd graph of `output` reach any trainable parameter of `module`?"""
    reached = reached_parameters(output)
    return any(id(p) in reached for p in module.parameters() if p.requires_grad)
