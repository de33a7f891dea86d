# Copyright (c) monai_condflow contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The package's layers only point down, and its modules import each other without a cycle.

Every ``import`` of the package (module level, in functions, under ``TYPE_CHECKING``) is read with ``ast``. Importing
``a.b.c`` also runs the ``__init__`` of ``a.b``, so that import counts as an import of the package too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_condflow"

# lowest first; a module may import its own layer and the layers below it (see docs/architecture.md)
LAYERS: list[tuple[str, ...]] = [
    ("monai_condflow", "monai_condflow.utils"),
    ("monai_condflow.data", "monai_condflow.transforms", "monai_condflow.networks"),
    ("monai_condflow.metrics",),
    # the DP-SGD mechanism and the audit statistics, which handlers and the flow's trainer use
    ("monai_condflow.privacy", "monai_condflow.privacy.dp", "monai_condflow.privacy.audits"),
    ("monai_condflow.handlers",),
    ("monai_condflow.engines",),
    ("monai_condflow.evaluation", "monai_condflow.privacy.public"),
    # the pipeline orders the bundle runs; the label sweep runs the pipeline once per label level
    ("monai_condflow.pipeline", "monai_condflow.evaluation.sweep"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix that names ``module`` or a package holding it."""
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, with the packages whose ``__init__`` the import runs."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way are imported too
                candidate = ".".join(parts[:i])
                if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                    found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_every_module_is_in_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_points_up():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == [], "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checks_catch_an_upward_import_and_a_cycle():
    assert layer_of("monai_condflow.data.datalists") < layer_of("monai_condflow.engines.classifier")
    assert layer_of("monai_condflow.privacy.public") > layer_of("monai_condflow.engines.flow")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("other_package.x")
