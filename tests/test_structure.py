"""The package's shape: no import cycle, imports that run one way between concerns, and remote-code
files that need nothing else of the package (an exported folder loads without it)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_mlkv"

# each concern (a flat module or a folder) may import only concerns of a lower rank
RANKS = {
    "errors": 0,
    "layout": 1,
    "integrity": 1,
    "cli": 1,
    "config": 2,
    "model": 3,
    "configuration_mlkv": 3,
    "modeling_mlkv": 4,
    "hf": 5,
    "conversion": 6,
    "data": 6,
    "parallel": 6,
    "loading": 7,
    "evaluation": 7,
    "inference": 8,
    "training": 8,
}
REMOTE_CODE = {"errors", "layout", "config", "model", "configuration_mlkv", "modeling_mlkv"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (functions included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c not in (name, "megatron_mlkv")}
    return graph


def concern(module: str) -> str:
    return module.split(".")[1]


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "megatron_mlkv.conversion" in graph["megatron_mlkv.loading"]  # top level, relative
    assert "megatron_mlkv.loading" in graph["megatron_mlkv.training.distill"]  # inside a function
    assert "megatron_mlkv.evaluation.report" in graph["megatron_mlkv.inference.report"]  # two dots up


def test_no_import_cycle():
    graph = import_graph()
    state = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for other in sorted(graph[module]):
            assert state.get(other) != 1, "import cycle: " + " -> ".join([*path, module, other])
            if other not in state:
                visit(other, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_imports_run_down_the_ranks_of_the_concerns():
    graph = import_graph()
    assert {concern(m) for m in graph if m != "megatron_mlkv"} == set(RANKS), "give each new concern a rank"
    upward = [
        f"{m} -> {o}"
        for m, others in graph.items()
        for o in others
        if m != "megatron_mlkv" and concern(m) != concern(o) and RANKS[concern(o)] >= RANKS[concern(m)]
    ]
    assert not upward, upward


def test_remote_code_imports_only_remote_code():
    graph = import_graph()
    for name in REMOTE_CODE:
        assert {concern(o) for o in graph[f"megatron_mlkv.{name}"]} <= REMOTE_CODE, name
