"""The house rules of the package layout, checked on the source (ast): imports only run downward
(modules <- rollout, learner <- cluster), only cluster/ knows Ray, files and the package stay small."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"modules": set(), "rollout": {"modules"}, "learner": {"modules"},
          "cluster": {"modules", "rollout", "learner"}}


def _files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).glob("*.py"))


def _package_imports(path: Path, layer: str) -> list[tuple[str, int]]:
    """(top-level package layer or external module, line) of every import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                out.append((layer, node.lineno))
            elif node.level == 2:
                out.append((mod.split(".")[0], node.lineno))
            elif mod.startswith("vlgrpo."):
                out.append((mod.split(".")[1], node.lineno))
            else:
                out.append(("ext:" + mod.split(".")[0], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                name = a.name.split(".")
                out.append((name[1] if name[0] == "vlgrpo" and len(name) > 1 else "ext:" + name[0], node.lineno))
    return out


@pytest.mark.parametrize("layer", list(LAYERS))
def test_imports_only_run_downward_and_only_cluster_knows_ray(layer):
    bad = []
    for f in _files(layer):
        for target, line in _package_imports(f, layer):
            if target == "ext:ray" and layer != "cluster":
                bad.append(f"{f.relative_to(ROOT)}:{line} imports ray")
            elif not target.startswith("ext:") and target != layer and target not in LAYERS[layer]:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, bad


def test_sizes():
    files = [f for layer in LAYERS for f in _files(layer)]
    lines = {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in files}
    assert sum(lines.values()) <= 6000, sum(lines.values())
    assert not {f: n for f, n in lines.items() if n > 500}
    # one GRPO step: controller, rollout worker, GRPO loss, learner rank, actor shells
    step = ["cluster/controller.py", "rollout/worker.py", "learner/grpo.py", "learner/rank.py", "cluster/actors.py"]
    assert all(lines[f] <= 400 for f in step), {f: lines[f] for f in step}
