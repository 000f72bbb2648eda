"""ARCHITECTURE.md is how a new developer finds where each concern lives, so what it names must exist.

Every backticked module path (``curation/pipeline/layout.py``, ``knn.py``) must be a file of the repository; every
``path.py: Name`` / ``path.py:name`` must define ``Name`` there (dotted names as ``Class.method``); every
``module.name`` whose first part is a product module (``download.precheck``, ``samples.shard_input_keys``) must name
a function, class or constant defined in that module, or a key of the curation or trainer config section of
that name (``dedup.threshold``, ``scale.worker_memory_gb``, ``distill.students``). The test reads the code with
``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"
PRODUCT = ("curation", "training", "pipelines", "schemas", "bench", "tests")

PATH_REF = re.compile(r"`([\w./]+\.py)(?:\s*:\s*([\w.]+))?`")
DOTTED_REF = re.compile(r"`([a-z_]+)\.([A-Za-z_]\w*)(?:\(\))?`")


def backticked(text: str) -> list[str]:
    return re.findall(r"`[^`\n]+`", text)


@lru_cache(maxsize=None)
def files_named(name: str) -> tuple[Path, ...]:
    """The repository files a module reference can mean: the path itself from the root or from a top-level
    package (``models/sscd.py`` is ``curation/models/sscd.py``), else every file of that base name."""
    direct = [ROOT / name] + [ROOT / top / name for top in PRODUCT]
    found = [p for p in direct if p.is_file()]
    if found or "/" in name:
        return tuple(found)
    return tuple(p for top in PRODUCT for p in (ROOT / top).rglob(name) if ".venv" not in p.parts)


@lru_cache(maxsize=None)
def defined_names(path: Path) -> frozenset[str]:
    """Top-level names a module defines (functions, classes, assignments, imports it re-exports) and
    ``Class.member`` for the members of its classes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()

    def targets(node) -> list[str]:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            ts = node.targets if isinstance(node, ast.Assign) else [node.target]
            return [t.id for t in ts if isinstance(t, ast.Name)]
        return []

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        names.add(f"{node.name}.{member.name}")
                    for t in targets(member):
                        names.add(f"{node.name}.{t}")
        names.update(targets(node))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


#: The two configs whose section keys the page may name as ``section.key``: (file, top-level class).
CONFIGS = (("curation/config.py", "CurateConfig"), ("training/config.py", "TrainConfig"))


@lru_cache(maxsize=None)
def config_keys(section: str) -> frozenset[str]:
    """The keys of config section `section` in the curation or the trainer config (its pydantic field names, read
    from the class bodies)."""
    keys: set[str] = set()
    for path, top_name in CONFIGS:
        tree = ast.parse((ROOT / path).read_text())
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        for field in classes[top_name].body:
            if isinstance(field, ast.AnnAssign) and field.target.id == section:
                cls = classes.get(ast.unparse(field.annotation))
                if cls is not None:
                    keys.update(f.target.id for f in cls.body if isinstance(f, ast.AnnAssign))
    return frozenset(keys)


def test_every_module_the_architecture_page_names_exists():
    text = DOC.read_text()
    missing = [m.group(1) for m in PATH_REF.finditer(text) if not files_named(m.group(1))]
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"


def test_every_name_the_architecture_page_places_in_a_module_is_defined_there():
    text = DOC.read_text()
    wrong = []
    for m in PATH_REF.finditer(text):
        module, name = m.groups()
        files = files_named(module)
        if name and files and not any(name in defined_names(f) for f in files):
            wrong.append(f"{module}: {name}")
    for token in backticked(text):
        m = DOTTED_REF.fullmatch(token)
        if not m or m.group(2) == "py":
            continue  # not dotted, or a module path (checked above)
        module, name = m.groups()
        files = files_named(f"{module}.py")
        if not files:
            continue  # not a module reference (a config key of the trainer, a Ray option, an attribute)
        if not any(name in defined_names(f) for f in files) and name not in config_keys(module):
            wrong.append(f"{module}.{name}")
    assert not wrong, f"ARCHITECTURE.md names what its module does not define: {wrong}"


def test_the_check_itself_catches_a_wrong_name(tmp_path):
    """The two checks above must be able to fail: a reference to a name no module defines is found."""
    assert "RunLayout" in defined_names(ROOT / "curation" / "pipeline" / "layout.py")
    assert "no_such_function_anywhere" not in defined_names(ROOT / "curation" / "pipeline" / "layout.py")
    assert not files_named("no_such_module.py")
    assert "threshold" in config_keys("dedup") and "threshold" not in config_keys("scale")
    assert "students" in config_keys("distill") and "students" not in config_keys("gram")


def layout_table() -> dict[str, set[str]]:
    """The "Inside `curation/`" table: folder -> the module file names its row lists."""
    text = DOC.read_text()
    section = text.split("## Inside `curation/`", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`curation/"):
            rows[cells[0].strip("`").rstrip("/")] = set(re.findall(r"`(\w+\.py)`", cells[2]))
    return rows


def test_every_curation_module_has_its_place_in_the_layout_table():
    # The table is the map of curation/'s layers: a module added, moved or removed without updating it would make the
    # map wrong, so each folder's modules must be exactly those its row lists (package __init__ files aside).
    rows = layout_table()
    assert rows, "ARCHITECTURE.md has no `Inside curation/` table"
    folders = {"curation"} | {
        str(p.parent.relative_to(ROOT)) for p in (ROOT / "curation").rglob("__init__.py") if p.parent != ROOT / "curation"
    }
    assert set(rows) == folders, f"folders without a row or rows without a folder: {set(rows) ^ folders}"
    for folder, listed in rows.items():
        actual = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert listed == actual, f"{folder}: only in the table {listed - actual}, only on disk {actual - listed}"
#: the product folders whose every module the page must place
MODULE_FOLDERS = ("curation", "curation/pipeline", "curation/engine", "curation/data", "curation/models",
                  "curation/rules", "curation/cluster", "curation/stages", "curation/stages/retrieval_methods",
                  "training", "training/models", "schemas", "pipelines")


def unplaced_modules(text: str) -> list[str]:
    """Modules of MODULE_FOLDERS the page does not name in backticks: by file name (``knn.py``), or a stage module
    by its stage name (```dedup```, the stages table)."""
    tokens = " ".join(backticked(text))
    out = []
    for folder in MODULE_FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.name)}\b", tokens) \
                    and f"`{path.stem}`" not in tokens:
                out.append(str(path.relative_to(ROOT)))
    return out


def test_every_module_has_a_place_on_the_architecture_page():
    """A new module gets its row: a module the page does not name is one a new developer cannot find."""
    assert unplaced_modules(DOC.read_text()) == []
    assert "curation/engine/knn.py" in unplaced_modules(DOC.read_text().replace("knn.py", "k-NN"))  # the check can fail
