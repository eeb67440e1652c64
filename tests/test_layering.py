"""The house's one-way imports, read from the source (every import, lazy
ones inside functions included):

- the embeddable core (``engine/``, but for its command-line front door
  ``engine/cli.py`` and the test tooling ``engine/testing/``) imports no
  ``api``, ``benchmarks``, ``loadtest``, ``tests`` and no ``engine.testing``;
- ``api/`` imports no ``benchmarks``, ``loadtest``, ``tests`` or
  ``engine.testing``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_CORE = ("api", "benchmarks", "loadtest", "tests", "engine.testing")
OUTSIDE_API = ("benchmarks", "loadtest", "tests", "engine.testing")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def offending(path: Path, banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports(path)
                  if any(m == b or m.startswith(b + ".") for b in banned))


def core_modules() -> list[Path]:
    return [p for p in sorted((ROOT / "engine").rglob("*.py"))
            if p.name != "cli.py" or p.parent.name != "engine"
            if "testing" not in p.relative_to(ROOT / "engine").parts[:1]]


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_nothing_above_it(path: Path) -> None:
    assert not offending(path, OUTSIDE_CORE)


@pytest.mark.parametrize("path", sorted((ROOT / "api").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_api_imports_no_tooling(path: Path) -> None:
    assert not offending(path, OUTSIDE_API)


def test_the_rule_sees_lazy_imports(tmp_path: Path) -> None:
    """The checker finds an import inside a function (the way the CLI used to
    reach into api/ and benchmarks/)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from benchmarks.peers import run_peers\n    import api.bench\n")
    assert offending(bad, OUTSIDE_CORE) == ["api.bench", "benchmarks.peers",
                                            "benchmarks.peers.run_peers"]
    assert len(core_modules()) > 30
    assert (ROOT / "engine" / "cli.py") not in core_modules()
