"""The shape of the code, checked: no import cycles among the proxy's modules (imports
inside functions included), each package says what it owns, no module is over the size a
reader can hold, and the client library stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "proxy"
PACKAGE = "authproxy"
#: Lines a module may have before it is split (a reader holds about this much at once).
MAX_MODULE_LINES = 400
#: Lines a function may have, and the longer ones with the reason they are not split.
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS = {
    "decide/pipeline.py:_evaluate": "the pipeline's steps in order, in one place",
    "keys/verify.py:check_claims": "every claim check of a level, in the order they run",
    "policy/loader.py:policy": "the policy file's top-level sections, in file order",
    "keys/keyset.py:key_from_jwk": "one JWK's fields checked in order, one error each",
    "keys/keygen.py:rotate": "a key rotation's steps, each written atomically, in order",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in SOURCE.rglob("*.py"):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([PACKAGE, *parts])] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: all but `if TYPE_CHECKING:` blocks (type names only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in _TYPE_CHECKING:
                stack.extend(child.orelse)
                continue
            stack.append(child)


_TYPE_CHECKING = ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every proxy module `name` imports when it runs, wherever the import statement is
    (in a function too); imports for type checking only never run, so they are left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_back_through_others():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ imports nothing of ours, so importing a module never runs
    # another module as a side effect; the client library's is its public API.
    for name, path in modules.items():
        if path.name == "__init__.py" and name.count(".") == 1 and name != f"{PACKAGE}.client":
            assert not graph[name], (name, graph[name])
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_package_says_what_it_owns():
    for init in SOURCE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 8, f"{init} has no docstring saying what it owns"


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {
        str(path.relative_to(SOURCE)): n
        for path in _modules().values()
        if not path.name.endswith("_pb2.py")  # generated
        and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_no_function_is_longer_than_a_screen_without_a_reason():
    long = {}
    for path in _modules().values():
        if path.name.endswith("_pb2.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                name = f"{path.relative_to(SOURCE).as_posix()}:{node.name}"
                if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long[name] = lines
    assert not long, long


def test_the_client_library_uses_only_the_policy_model_and_the_names_it_shares():
    """What a service's client installs for token handling must not pull the proxy's
    servers in: the client imports only the policy model and loader (to read levels) and
    the names of the wire contract (reasons, status details, the bearer header)."""
    modules = _modules()
    allowed_prefixes = (f"{PACKAGE}.client", f"{PACKAGE}.policy", f"{PACKAGE}.decide.reasons",
                        f"{PACKAGE}.decide.bearer", f"{PACKAGE}.wire.grpc_status")  # fmt: skip
    for name, path in modules.items():
        if name.startswith(f"{PACKAGE}.client"):
            outside = {
                m for m in _imports(name, path, modules) if not m.startswith(allowed_prefixes)
            }
            assert not outside, (name, outside)


def test_no_proxy_code_waits_with_asyncio_wait_for():
    """On Python 3.11 `asyncio.wait_for` drops a cancellation that arrives just as the
    awaited thing finishes: a loop stopped by `cancel()` then goes on, and the stop that
    awaits it waits forever. `asyncio.timeout` keeps the cancellation; the proxy uses it."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for":
                found.append(f"{name}:{node.lineno}")
    assert not found, f"asyncio.wait_for in {found}; use `async with asyncio.timeout(...)`"
