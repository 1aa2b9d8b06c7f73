"""The package shows its architecture and keeps it: every file in splitkit/ at most 300 lines, each layer (a
sub-package) imports only the layers below it, and docs/architecture.md names every file there is and no other.
The trunk server stays readable in one sitting: TrunkServer at most 200 lines, the loop and one method per op."""

import ast
import inspect
import re
from pathlib import Path

import pytest

from splitkit.trunk import server

PACKAGE = Path(server.__file__).resolve().parents[1]  # splitkit/
FILE_LINES, CLASS_LINES = 300, 200
# a layer's rank: it may import a layer of lower rank (and its own), never one of the same rank or higher
RANK = {"core": 0, "wire": 1, "training": 2, "trunk": 2, "privacy": 3, "federated": 3, "teaching": 4, None: 5}


def layer_of(module: str) -> str | None:
    """The layer of a module named from the package ("trunk.server"); None for the top ("__main__")."""
    head, _, rest = module.partition(".")
    return head if rest or head in RANK else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every splitkit module `path` imports, as a name under the package ("wire.client")."""
    here = path.relative_to(PACKAGE).with_suffix("").parts  # ("trunk", "server") or ("__main__",)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:len(here) - node.level])  # an __init__'s parts end in "__init__": the same rule
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
            elif node.module and node.module.split(".")[0] == "splitkit":
                names = [node.module.partition(".")[2]] if "." in node.module else [a.name for a in node.names]
            else:
                continue
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.partition(".")[2]) for a in node.names if a.name.startswith("splitkit.")]
    return found


def climbs(path: Path) -> list[str]:
    """The imports of `path` that break the layer rule, said as 'line N: module'."""
    own = layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    bad = []
    for line, module in imports(path):
        theirs = layer_of(module)
        if theirs != own and RANK[theirs] >= RANK[own]:
            bad.append(f"line {line}: {module} ({theirs or 'the top'}) from {own or 'the top'}")
    return bad


def check_layout(files: list[Path]):
    long = {str(f.relative_to(PACKAGE)): n for f in files if (n := len(f.read_text().splitlines())) > FILE_LINES}
    assert not long, f"over {FILE_LINES} lines: {long}"
    bad = {str(f.relative_to(PACKAGE)): c for f in files if (c := climbs(f))}
    assert not bad, f"imports that climb a layer: {bad}"


def test_every_file_is_at_most_300_lines_and_no_import_climbs_a_layer():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30 and {f.parent.name for f in files if f.parent != PACKAGE} == set(RANK) - {None}
    check_layout(files)
    print({str(f.relative_to(PACKAGE)): len(f.read_text().splitlines()) for f in files})


def test_the_layout_rule_fails_on_a_long_file_and_on_an_import_that_climbs(tmp_path, monkeypatch):
    fake = tmp_path / "splitkit"
    for layer, text in {"core": "from ..trunk.server import TrunkServer\n", "wire": "from ..core import lora\n",
                        "trunk": "from ..training.train import Learner\nfrom splitkit.teaching import lab\n",
                        "teaching": "from splitkit.core.lora import LoraSpec\nfrom ..federated import study\n"}.items():
        (fake / layer).mkdir(parents=True)
        (fake / layer / "mod.py").write_text(text)
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert climbs(fake / "core" / "mod.py") == ["line 1: trunk.server (trunk) from core"]
    assert climbs(fake / "wire" / "mod.py") == []
    assert climbs(fake / "trunk" / "mod.py") == ["line 1: training.train (training) from trunk",
                                                 "line 2: teaching (teaching) from trunk"]
    assert climbs(fake / "teaching" / "mod.py") == []
    with pytest.raises(AssertionError, match=r"imports that climb a layer: \{'core/mod.py'"):
        check_layout([fake / "core" / "mod.py", fake / "wire" / "mod.py"])
    (fake / "wire" / "long.py").write_text("x = 1\n" * (FILE_LINES + 1))
    check_layout([fake / "wire" / "mod.py"])
    with pytest.raises(AssertionError, match=r"over 300 lines: \{'wire/long.py': 301\}"):
        check_layout([fake / "wire" / "mod.py", fake / "wire" / "long.py"])


def test_the_architecture_map_names_every_file_and_only_those():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(splitkit/[a-z_]+/[a-z_]+\.py)`", doc))
    there = {str(f.relative_to(PACKAGE.parent)) for f in PACKAGE.glob("*/*.py") if f.name != "__init__.py"}
    assert named == there, f"not in the map: {sorted(there - named)}; in the map, not there: {sorted(named - there)}"
    layers = set(re.findall(r"^\| `([a-z]+)` \|", doc, flags=re.M))
    assert layers == set(RANK) - {None}


def test_the_server_class_stays_within_its_line_bar():
    class_lines = len(inspect.getsourcelines(server.TrunkServer)[0])
    assert class_lines <= CLASS_LINES, f"TrunkServer has {class_lines} lines, over {CLASS_LINES}"


def test_what_other_modules_import_from_server_is_still_there():
    from splitkit.trunk.server import DEFAULT_BIND, Faults, TrunkServer, connect_or_start  # noqa: F401
    for name in ("_forward", "_backward", "_forward_with_graph"):  # privacy/probes.py and notebook 03 use these
        assert list(inspect.signature(getattr(TrunkServer, name)).parameters)[:2] == ["self", "session"]
