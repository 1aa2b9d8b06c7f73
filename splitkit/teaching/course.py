"""The series as a course: what each notebook asks of a class period, and the student versions of its exercises.

A lesson notebook opens with 2-4 goals ("**You will learn**" and a list), ends with "## Summary", and keeps its
prose to `LESSON_WORDS`. A claim (`✔ claim N.M`) is checked by a code cell that starts with `# check N.M`; an
exercise (`✎ exercise N.K`) is a code cell in nbgrader's format (a solution region between `### BEGIN SOLUTION`
and `### END SOLUTION`, cell metadata `nbgrader.solution`) followed by its check, `# check exercise N.K`, an
nbgrader test cell. Check cells are folded in JupyterLab (`jupyter.source_hidden`): their output shows, one
click shows their code.

`student_version` writes what a student gets, with nbgrader's own preprocessors: each solution region replaced by
`raise NotImplementedError()`, every output cleared. The exercise's check then fails, and only it: an exercise
is a function the check calls, and no later cell uses it.
"""

import json
import re
from pathlib import Path

LESSON_WORDS = 2000  # prose of one lesson: the reading half of a 45-minute period
CLAIM_WORDS = 80  # the paragraph of one tagged claim
GOALS = re.compile(r"\*\*You will learn\*\*[ \t]*\n(.*?)(?:\n[ \t]*\n|\Z)", re.S)  # the list up to a blank line
CLAIM = re.compile(r"✔ claim (\d+)\.(\d+)")
EXERCISE = re.compile(r"✎ exercise (\d+)\.(\d+)")
CHECK = re.compile(r"\A# check (\d+)\.(\d+)\b")
EXERCISE_CHECK = re.compile(r"\A# check exercise (\d+)\.(\d+)\b")
SOLUTION = "### BEGIN SOLUTION"


def source(cell: dict) -> str:
    return "".join(cell["source"])


def is_check(cell: dict) -> bool:
    """A code cell that checks a claim or an exercise."""
    return cell["cell_type"] == "code" and bool(CHECK.match(source(cell)) or EXERCISE_CHECK.match(source(cell)))


def is_folded(cell: dict) -> bool:
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))


def words(notebook: dict) -> int:
    """Words of prose: every whitespace-separated word of the Markdown cells."""
    return sum(len(source(c).split()) for c in notebook["cells"] if c["cell_type"] == "markdown")


def claim_paragraphs(notebook: dict) -> dict[str, int]:
    """{"N.M": words of the paragraph that carries the claim's tag}."""
    found = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            for paragraph in re.split(r"\n\s*\n", source(cell)):
                for n, m in CLAIM.findall(paragraph):
                    found[f"{n}.{m}"] = len(paragraph.split())
    return found


def goals(notebook: dict) -> list[str]:
    """The "You will learn" list of the first Markdown cell."""
    first = next((source(c) for c in notebook["cells"] if c["cell_type"] == "markdown"), "")
    found = GOALS.search(first)
    items = re.split(r"^[-*] ", found[1], flags=re.M)[1:] if found else []
    return [" ".join(item.split()) for item in items]


def exercises(notebook: dict) -> dict[str, dict]:
    """{"N.K": {"solution": index of its solution cell, "check": index of its check cell}}."""
    found = {}
    for i, cell in enumerate(notebook["cells"]):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        text = source(cell)
        if cell["cell_type"] == "code" and meta.get("solution") and SOLUTION in text:
            number = re.match(r"\A# exercise (\d+\.\d+)", text)
            found.setdefault(number[1] if number else f"?{i}", {})["solution"] = i
        elif cell["cell_type"] == "code" and (check := EXERCISE_CHECK.match(text)):
            found.setdefault(f"{check[1]}.{check[2]}", {})["check"] = i
    return found


def stats(path: Path) -> dict:
    """What one notebook asks of a class: words, claims, the longest claim, exercises, goals, checks folded."""
    notebook = json.loads(Path(path).read_text())
    claims = claim_paragraphs(notebook)
    checks = [c for c in notebook["cells"] if is_check(c)]
    return {"notebook": Path(path).name, "words": words(notebook), "claims": len(claims),
            "longest claim": max(claims.values(), default=0), "exercises": len(exercises(notebook)),
            "goals": len(goals(notebook)), "checks": len(checks),
            "folded": sum(is_folded(c) for c in checks),
            "summary": any(source(c).lstrip().startswith("## Summary") for c in notebook["cells"]
                           if c["cell_type"] == "markdown")}


def fold_checks(notebook: dict) -> int:
    """Fold every check cell (JupyterLab shows its output and hides its code); how many changed."""
    changed = 0
    for cell in notebook["cells"]:
        if is_check(cell) and not is_folded(cell):
            cell.setdefault("metadata", {}).setdefault("jupyter", {})["source_hidden"] = True
            changed += 1
    return changed


def student_version(notebook: dict) -> dict:
    """The notebook a student gets: solutions blanked and outputs cleared by nbgrader's preprocessors."""
    import nbformat
    from nbgrader.preprocessors import ClearOutput, ClearSolutions

    nb = nbformat.reads(json.dumps(notebook), as_version=4)
    resources = {}
    for preprocessor in (ClearSolutions(), ClearOutput()):
        nb, resources = preprocessor.preprocess(nb, resources)
    for cell in nb.cells:  # nbgrader's preprocessors leave metadata of their own; keep the format's only
        cell.metadata.pop("editable", None)
        cell.metadata.pop("deletable", None)
    return json.loads(nbformat.writes(nb))


def write_assignments(notebooks: Path, out: Path) -> list[Path]:
    """A student version of every notebook in `notebooks` (NN_*.ipynb), written to `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(notebooks).glob("[0-9][0-9]_*.ipynb")):
        student = student_version(json.loads(path.read_text()))
        target = out / path.name
        target.write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n")
        written.append(target)
    return written
