"""The package's layers, read statically from its imports (function-level imports
included): no import circle, and no inference module reaching training or gin parsing;
the command line's help without TensorFlow."""

import ast
import json
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pixelcnn"
INFERENCE = "pixelcnn.inference"
# what inference must never reach: the training stack and gin parsing (the CLI's side)
FORBIDDEN = ("pixelcnn.training", "pixelcnn.config", "pixelcnn.cli")


def _module_names() -> dict[str, pathlib.Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imports() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports (anywhere in its body,
    except under ``if TYPE_CHECKING:``), an ``import a.b`` counted as a.b."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for child in node.body
            for n in ast.walk(child)
        }
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                found = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def test_no_import_circle():
    graph = _imports()
    # the top package's __init__ only names modules lazily (no import at all)
    assert not graph["pixelcnn"], f"pixelcnn/__init__.py imports {graph['pixelcnn']}"
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph[v]):
            assert state.get(w) != "open", "import circle: " + " -> ".join(
                path[path.index(w) :] + [w]
            )
            if w not in state:
                visit(w)
        path.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_inference_reaches_no_training_and_no_gin_parsing():
    graph = _imports()
    for start in (m for m in graph if m.startswith(INFERENCE)):
        seen, todo, came = {start}, [start], {start: None}
        while todo:
            v = todo.pop()
            for w in graph[v]:
                if w not in seen:
                    seen.add(w), came.update({w: v}), todo.append(w)
        bad = sorted(m for m in seen if m.startswith(FORBIDDEN))
        if bad:
            chain, v = [], bad[0]
            while v is not None:
                chain.append(v)
                v = came[v]
            raise AssertionError(f"{start} reaches {bad[0]}: {' -> '.join(reversed(chain))}")


HELP = """
import json, sys
from pixelcnn.cli import main
out = {}
for args in [["--help"]] + [[name, "--help"] for name in sorted(main.commands)]:
    try:
        main(args, standalone_mode=False, prog_name="pixelcnn")
    except SystemExit:
        pass
out["tensorflow"] = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
out["commands"] = sorted(main.commands)
print(json.dumps(out))
"""


def test_help_of_every_command_prints_without_tensorflow():
    done = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["tensorflow"], "the command line's help imported TensorFlow"
    assert result["commands"] == sorted(
        ["single", "multigpu", "multiworker", "sample", "evaluate", "complete", "export",
         "compress", "decompress", "ood"]
    )  # fmt: skip
    for command in result["commands"]:
        assert f"Usage: pixelcnn {command}" in done.stdout
    assert done.stdout.count("Example") >= len(result["commands"])
