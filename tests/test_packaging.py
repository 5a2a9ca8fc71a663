"""What the package imports, its installation brings: `pip install -e .` (README's first line) is all
an operator runs before `tracker serve`."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# The package, and the migrations a wheel carries inside it (pyproject: force-include).
SHIPPED = [ROOT / "tracker", ROOT / "alembic"]


def _imported_top_level_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in SHIPPED:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], path)
    return found


def test_every_third_party_module_the_package_imports_is_a_declared_dependency() -> None:
    """httpx was only a test extra: `tracker serve` and `tracker gossip push` stopped on
    ModuleNotFoundError after README's own install line (QA round 16)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}
    distributions = packages_distributions()
    missing = {}
    for module, where in _imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module == "tracker":
            continue
        provided_by = {canonicalize_name(name) for name in distributions.get(module, [])}
        assert provided_by, f"{module} (imported in {where}) is installed by no distribution"
        if not provided_by & declared:
            missing[module] = (sorted(provided_by), str(where.relative_to(ROOT)))
    assert missing == {}


def test_an_application_type_checks_against_the_package(tmp_path: Path) -> None:
    """Without a py.typed marker mypy skipped the package: every call of an embedding application
    was Any, however carefully the library is annotated; and any name of ``tracker`` was Any."""
    app = tmp_path / "app.py"
    app.write_text(
        "from tracker import AvailabilityTracker, PeerInfo, TrackerConfig\n\n\n"
        "async def best(config: TrackerConfig) -> list[PeerInfo]:\n"
        "    async with AvailabilityTracker(config) as tracker:\n"
        "        return await tracker.select_best_peers('cid-1', 3)\n\n\n"
        "async def wrong(tracker: AvailabilityTracker) -> str:\n"
        "    return await tracker.select_best_peers('cid-1', 3)\n\n\n"
        "import tracker\n"
        "version: str = tracker.__version__\n"
        "misspelt = tracker.TrackerConfg\n",
        encoding="utf-8",
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(app)],
        cwd=tmp_path,  # not this repository's mypy settings
        capture_output=True,
        text=True,
        check=False,
    )
    assert "py.typed" not in checked.stdout, checked.stdout
    # The one error is the application's own: the package's types reached it.
    assert 'Incompatible return value type (got "list[PeerInfo]", expected "str")' in checked.stdout
    # A misspelt name is one too: the lazy loader's __getattr__ made any name Any (QA round 70).
    assert 'Module has no attribute "TrackerConfg"' in checked.stdout, checked.stdout
    assert "Found 2 errors in 1 file" in checked.stdout, checked.stdout


def test_every_type_a_public_method_returns_is_importable_from_the_package() -> None:
    """stats() returned a TrackerStats that an application could name only through tracker.models
    (QA round 22)."""
    import typing

    import tracker

    public = tracker.AvailabilityTracker
    returned: set[str] = set()
    for name in dir(public):
        if name.startswith("_"):
            continue
        member = getattr(public, name)
        target = member.fget if isinstance(member, property) else member
        if not callable(target):
            continue
        hints = typing.get_type_hints(target)
        if "return" in hints:
            returned |= {
                t.__name__ for t in _classes_in(hints["return"]) if t.__module__.startswith("tracker")
            }
    # The SQLite lanes are plumbing, for observing SQL: named where they live (tracker.sqlite_lane).
    returned.discard("SqliteLanes")
    assert returned and returned <= set(tracker.__all__), returned - set(tracker.__all__)


def _classes_in(hint: object) -> set[type]:
    import typing

    found = {hint} if isinstance(hint, type) else set()
    for argument in typing.get_args(hint):
        found |= _classes_in(argument)
    return found
