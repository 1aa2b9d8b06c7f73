"""Every factual claim a notebook makes is tagged and checked, so the promise can be audited.

In a Markdown cell a claim carries a visible tag, `✔ claim N.M` (N: the notebook's number, M: the
claim's). The one code cell that checks it comes after it and starts with `# check N.M`; its asserts
read measured values. This test fails when a claim has no check cell, when a check cell has no
assert or names a claim that does not exist, and when a check cell comes before its claim.
"""

import ast
import json
from pathlib import Path

import pytest

from splitkit.teaching.course import CHECK, CLAIM  # the tag and the check cell's first line

# the lessons (NN_*.ipynb) and their appendices (NNa_*.ipynb), whose claims carry the lesson's number N
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]*_*.ipynb"))


def claims_and_checks(cells: list) -> tuple[dict, dict]:
    """({(N, M): index of the Markdown cell}, {(N, M): [indices of code cells that check it]})."""
    claims, checks = {}, {}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            for n, m in CLAIM.findall(source):
                key = (int(n), int(m))
                assert key not in claims, f"claim {n}.{m} is tagged twice (cells {claims[key]} and {i})"
                claims[key] = i
        elif cell["cell_type"] == "code" and (found := CHECK.match(source)):
            checks.setdefault((int(found[1]), int(found[2])), []).append(i)
    return claims, checks


def has_assert(source: str) -> bool:
    """Does the code contain an assert statement (not just the word in a comment or a string)?"""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]  # IPython magics
    return any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse("\n".join(lines))))


def problems(notebook: dict, number: int) -> list[str]:
    """What is wrong with the claims and checks of one notebook; empty when all is well."""
    cells = notebook["cells"]
    claims, checks = claims_and_checks(cells)
    found = []
    for claim, cell in claims.items():
        if claim[0] != number:
            found.append(f"claim {claim[0]}.{claim[1]} (cell {cell}) is numbered for notebook {claim[0]:02d}")
        if claim not in checks:
            found.append(f"claim {claim[0]}.{claim[1]} (cell {cell}) has no '# check {claim[0]}.{claim[1]}' cell")
    for check, where in checks.items():
        if check not in claims:
            found.append(f"check {check[0]}.{check[1]} (cell {where[0]}) refers to no claim in this notebook")
            continue
        if len(where) > 1:
            found.append(f"claim {check[0]}.{check[1]} has {len(where)} check cells ({where}); it needs one")
        for i in where:
            if i < claims[check]:
                found.append(f"check {check[0]}.{check[1]} (cell {i}) comes before its claim (cell {claims[check]})")
            if not has_assert("".join(cells[i]["source"])):
                found.append(f"check {check[0]}.{check[1]} (cell {i}) has no assert")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_claim_has_one_check_cell_with_asserts(path):
    notebook = json.loads(path.read_text())
    assert not problems(notebook, int(path.name[:2])), "\n".join(problems(notebook, int(path.name[:2])))


def test_the_series_makes_checked_claims():
    counts = {p.name: len(claims_and_checks(json.loads(p.read_text())["cells"])[0]) for p in NOTEBOOKS}
    assert all(n > 0 for name, n in counts.items() if not name.startswith("00")), counts


def _notebook(*cells) -> dict:
    return {"cells": [{"cell_type": kind, "source": text} for kind, text in cells]}


def test_a_claim_without_its_check_cell_is_caught():
    notebook = _notebook(("markdown", "✔ claim 2.1 the Bottom gets no gradient"), ("code", "x = 1"))
    assert problems(notebook, 2) == ["claim 2.1 (cell 0) has no '# check 2.1' cell"]


def test_a_check_cell_without_assert_is_caught():
    notebook = _notebook(("markdown", "✔ claim 2.1 ..."), ("code", "# check 2.1\nprint('assert nothing')"))
    assert problems(notebook, 2) == ["check 2.1 (cell 1) has no assert"]


def test_a_check_cell_for_a_claim_that_does_not_exist_is_caught():
    notebook = _notebook(("markdown", "✔ claim 2.1 ..."), ("code", "# check 2.1\nassert True"),
                         ("code", "# check 2.7\nassert 1 == 1"))
    assert problems(notebook, 2) == ["check 2.7 (cell 2) refers to no claim in this notebook"]


def test_a_well_formed_notebook_passes():
    notebook = _notebook(("markdown", "✔ claim 3.1 one, ✔ claim 3.2 two"), ("code", "# check 3.1\nassert x > 0"),
                         ("code", "# check 3.2: what it checks\nassert y"))
    assert problems(notebook, 3) == []
