"""The rooms hold: what each folder of fine_tune/ (and analysis/) may import, read from the code's own import
statements (function-level imports included), and the README's room table matches the files on disk."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fine_tune"
ROOT_MODULES = ("__main__", "cli", "config", "sections", "errors", "experiment", "names", "space", "archs")
# What a module of each room must never import (a module name, or a prefix ending in ".").
FORBIDDEN = {
    "learn": ("mlflow", "optuna", "fine_tune.track.", "fine_tune.study."),
    "track": ("fine_tune.study.",),
    "study": (),
    "root": ("torch", "torchvision", "mlflow", "optuna", "fine_tune.learn.", "fine_tune.track.", "fine_tune.study."),
}
# The only parts of fine_tune that analysis/ reads: names and stores, the metrics, the confusion-matrix drawing, and
# what its command line shares with fine_tune's.
ANALYSIS_MAY_IMPORT = {"fine_tune.names", "fine_tune.track.stores", "fine_tune.track.figures", "fine_tune.learn.metrics",
                       "fine_tune.cli", "fine_tune.config", "fine_tune.errors", "fine_tune.experiment"}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it: `import a.b` gives a.b, `from a.b import c` gives a.b and a.b.c."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def room_of(path: Path) -> str:
    return path.parent.name if path.parent != PACKAGE else "root"


def violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    def hit(name: str, rule: str) -> bool:
        return name.startswith(rule) if rule.endswith(".") else name == rule or name.startswith(rule + ".")

    if path.name == "__main__.py":  # the entry point imports each verb's room inside the verb, on purpose
        forbidden = tuple(r for r in forbidden if not r.startswith("fine_tune."))
    return sorted(f"{path.parent.name}/{path.name} imports {name}" for name in imports(path)
                  for rule in forbidden if hit(name, rule))


@pytest.mark.parametrize("room", list(FORBIDDEN))
def test_each_room_imports_only_what_it_may(room):
    files = [p for p in PACKAGE.rglob("*.py") if room_of(p) == room]
    assert files
    assert [v for p in files for v in violations(p, FORBIDDEN[room])] == []


def test_mlflow_is_imported_in_the_tracking_room_only():
    outside = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
               if room_of(p) != "track" and any(n == "mlflow" or n.startswith("mlflow.") for n in imports(p))]
    assert outside == []


def test_analysis_reads_only_the_stores_names_and_metrics_of_fine_tune():
    used = {n for p in (ROOT / "analysis").glob("*.py") for n in imports(p) if n.startswith("fine_tune.")}
    modules = {n for n in used if (ROOT / (n.replace(".", "/") + ".py")).is_file()}
    assert modules <= ANALYSIS_MAY_IMPORT, modules - ANALYSIS_MAY_IMPORT


def test_a_violation_is_caught(tmp_path):
    """The check itself works: an `import mlflow` inside a function of the learning room is found."""
    module = tmp_path / "learn" / "sneaky.py"
    module.parent.mkdir()
    module.write_text("def f():\n    import mlflow\n    from fine_tune.track.tracking import RunTracker\n")
    assert violations(module, FORBIDDEN["learn"]) == [
        "learn/sneaky.py imports fine_tune.track.tracking", "learn/sneaky.py imports fine_tune.track.tracking.RunTracker",
        "learn/sneaky.py imports mlflow"]


def test_every_room_says_what_it_holds_and_the_readme_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("<!-- rooms -->"):readme.index("<!-- /rooms -->")]
    for room in ("learn", "track", "study"):
        assert (PACKAGE / room / "__init__.py").read_text().startswith('"""'), room
        listed = set(re.findall(r"`(\w+)\.py`", table.split(f"`fine_tune/{room}/`")[1].split("\n")[0]))
        on_disk = {p.stem for p in (PACKAGE / room).glob("*.py") if p.stem != "__init__"}
        assert listed == on_disk, (room, listed ^ on_disk)
    root_line = table.split("`fine_tune/`")[1].split("\n")[0]
    assert set(re.findall(r"`(\w+)\.py`", root_line)) == set(ROOT_MODULES) == \
        {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
