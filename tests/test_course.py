"""The series as a course (splitkit.teaching.course): each lesson fits a class period, and its exercises grade.

- Every lesson opens with 2-4 goals, ends with a summary, keeps its prose within a period's reading and each claim's
  paragraph short; every check cell is folded.
- Lessons 01-06 and 09 each have an exercise in nbgrader's format: a solution region in a solution cell, then an
  nbgrader test cell that checks it.
- The student versions (`python -m splitkit assign`) blank each solution and nothing else; run, each fails exactly
  at its exercises' checks and nowhere else (each is run up to its last exercise check: the cells after it are the
  source notebook's, which nbval runs, and none of them uses an exercise's function). With the solutions put back it
  is the source notebook, which nbval runs and passes.
"""

import ast
import json
import re

import nbformat
import pytest
from nbclient import NotebookClient

from splitkit.teaching import course
from splitkit.training.testing import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LESSONS = [p for p in NOTEBOOKS if not p.name.startswith("00")]
WITH_EXERCISES = [p for p in LESSONS if p.name[:2] in {"01", "02", "03", "04", "05", "06", "09"}]
# Over a period's reading: they may shrink, never grow (words, and claims over CLAIM_WORDS)
OVER_A_PERIOD: dict = {}
STUB = "raise NotImplementedError()"


def load(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_a_lesson_fits_a_class_period(path):
    notebook, found = load(path), course.stats(path)
    long_claims = {k: n for k, n in course.claim_paragraphs(notebook).items() if n > course.CLAIM_WORDS}
    words, claims = OVER_A_PERIOD.get(path.name, (course.LESSON_WORDS, 0))
    assert 2 <= found["goals"] <= 4, course.goals(notebook)
    assert found["summary"], "no '## Summary' cell"
    assert found["words"] <= words, f"{found['words']} words of prose, at most {words}"
    assert len(long_claims) <= claims, f"claims over {course.CLAIM_WORDS} words: {long_claims}"
    assert found["folded"] == found["checks"] > 0, f"{found['checks'] - found['folded']} check cells not folded"


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=[p.stem for p in WITH_EXERCISES])
def test_each_exercise_is_a_solution_cell_then_its_check(path):
    notebook = load(path)
    cells, found = notebook["cells"], course.exercises(notebook)
    text = "".join(course.source(c) for c in cells if c["cell_type"] == "markdown")
    assert found, "no exercise"
    for number, where in found.items():
        assert set(where) == {"solution", "check"}, (number, where)
        solution, check = cells[where["solution"]], cells[where["check"]]
        assert where["check"] > where["solution"], number
        assert f"✎ exercise {number}" in text, f"exercise {number} is not set in the text"
        assert solution["metadata"]["nbgrader"]["solution"] and not solution["metadata"]["nbgrader"]["grade"]
        assert check["metadata"]["nbgrader"]["grade"] and check["metadata"]["nbgrader"]["locked"]
        assert "### END SOLUTION" in course.source(solution)
        assert any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(course.source(check))))
        tree = ast.parse(course.source(solution))
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert len(defined) == 1, f"exercise {number} defines {defined}: it is one function"
        name = defined.pop()
        later = [course.source(c) for c in cells[where["check"] + 1:] if c["cell_type"] == "code"]
        users = [s.splitlines()[0] for s in later if re.search(rf"\b{name}\b", s)]
        assert not users, f"cells after exercise {number}'s check use its function: {users}"


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=[p.stem for p in WITH_EXERCISES])
def test_the_student_version_blanks_the_solutions_and_nothing_else(path):
    source = load(path)
    student = course.student_version(source)
    solutions = {w["solution"] for w in course.exercises(source).values()}
    assert len(student["cells"]) == len(source["cells"])
    for i, (mine, theirs) in enumerate(zip(source["cells"], student["cells"], strict=True)):
        assert not theirs.get("outputs"), f"cell {i} keeps its outputs"
        if i not in solutions:
            assert course.source(theirs) == course.source(mine), f"cell {i} changed"
            continue
        before, _, rest = course.source(mine).partition("### BEGIN SOLUTION")
        indent = before.rsplit("\n", 1)[-1]
        _, _, after = rest.partition("### END SOLUTION")
        assert STUB in course.source(theirs) and "SOLUTION" not in course.source(theirs)
        blank = before + "# YOUR CODE HERE\n" + indent + STUB + after
        assert course.source(theirs) == blank, f"cell {i}: not just the region blanked"


def test_the_assign_command_writes_every_notebook(tmp_path):
    from splitkit.__main__ import main

    assert main(["assign", "--notebooks", str(ROOT / "notebooks"), "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.ipynb"))
    assert written == [p.name for p in NOTEBOOKS]
    for path in WITH_EXERCISES:
        nbformat.validate(nbformat.read(tmp_path / path.name, as_version=4))
        assert STUB in (tmp_path / path.name).read_text()


def errors(notebook) -> dict[int, str]:
    """{cell index: 'ErrorName: message'} of every cell that raised."""
    return {i: f"{o['ename']}: {o['evalue']}"[:300] for i, c in enumerate(notebook.cells)
            for o in c.get("outputs", []) if o.get("output_type") == "error"}


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=[p.stem for p in WITH_EXERCISES])
def test_the_student_version_fails_exactly_at_its_exercises_checks(path, monkeypatch):
    monkeypatch.delenv("SPLITKIT_TRUNK", raising=False)
    source = load(path)
    found = course.exercises(source)
    last = max(w["check"] for w in found.values())
    student = nbformat.reads(json.dumps(course.student_version(source)), as_version=4)
    student.cells = student.cells[:last + 1]
    NotebookClient(student, timeout=900, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    failed = errors(student)
    assert set(failed) == {w["check"] for w in found.values()}, failed
    assert all(message.startswith("NotImplementedError") for message in failed.values()), failed


def test_the_teachers_guide_counts_what_the_notebooks_hold():
    guide = (ROOT / "docs" / "teaching.md").read_text()
    bench = (ROOT / "bench" / "results" / "notebooks.md").read_text()
    rows = {r[0].strip(): [c.strip() for c in r]
            for r in (line.strip().strip("|").split("|") for line in guide.splitlines()
                      if re.match(r"\| \d\d_", line))}
    timed = {r[0].strip(): r[1].strip() for r in (line.strip("|").split("|") for line in bench.splitlines()
                                                  if line.startswith("| 0"))}
    assert sorted(rows) == [p.stem for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        found = course.stats(path)
        name, words, claims, exercises, seconds, _ = rows[path.stem]
        assert (int(words), int(claims), int(exercises)) == (found["words"], found["claims"], found["exercises"]), name
        assert seconds == timed[path.name], f"{name}: {seconds} s here, {timed[path.name]} s in notebooks.md"
