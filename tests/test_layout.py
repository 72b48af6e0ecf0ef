"""The house rules of the layout, read from the source with `ast` (nothing is imported):

- the root holds the commands and the ground floor they share: at most 10 .py files;
- dependencies point down: no module in a folder imports a command (train_triplet, train_clip,
  evaluate, demo), and there is no import cycle among the kit's modules, lazy imports included;
- each name is imported from the module that defines it: `from m import x` and `m.x` name an `x`
  that m defines (a def, class or assignment at its top level), never one m imported from elsewhere;
- no function runs past 80 lines (a reader takes each in on one screen).
Line length (100) is ruff's check, in the same test command (README.md).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"train_triplet", "train_clip", "evaluate", "demo"}
FOLDERS = ("stage1", "stage2", "analysis", "world")
MAX_ROOT_FILES, MAX_FUNCTION_LINES = 10, 80


def kit_modules():
    """{dotted module name: path} of the kit's own code (the root and its folders)."""
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in FOLDERS:
        for p in (ROOT / folder).glob("*.py"):
            modules[folder if p.stem == "__init__" else f"{folder}.{p.stem}"] = p
    return modules


def all_python_files():
    return [*kit_modules().values(), *sorted((ROOT / "tests").rglob("*.py")),
            *sorted((ROOT / "bench").glob("*.py"))]


MODULES = kit_modules()
TREES = {path: ast.parse(path.read_text(), str(path)) for path in all_python_files()}


def defined_names(module):
    """Top-level names a kit module defines itself (not the ones it imports), and the modules it
    imports whole (`m.time` names the module m reads the time from: a test may patch it there)."""
    names = {"__file__", "__name__", "__doc__"}
    for node in TREES[MODULES[module]].body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # `from stage2 import formats`
            names.update(a.asname or a.name for a in node.names
                         if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            names.update(n.name for n in ast.walk(node)
                         if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    if "." not in module and (ROOT / module).is_dir():  # a folder: its modules are its names
        names.update(m.split(".", 1)[1] for m in MODULES if m.startswith(module + "."))
    return names


def imports(path):
    """(line, module, name or None, alias) of each kit-module import in `path`, lazy ones too."""
    found = []
    for node in ast.walk(TREES[path]):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None, a.asname or a.name) for a in node.names
                      if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES and node.level == 0:
            for a in node.names:
                whole = f"{node.module}.{a.name}"
                if whole in MODULES:  # `from stage1 import nights`: a module, used as nights.x
                    found.append((node.lineno, whole, None, a.asname or a.name))
                else:
                    found.append((node.lineno, node.module, a.name, a.asname or a.name))
    return found


def test_the_root_holds_at_most_ten_python_files():
    root_files = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root_files) <= MAX_ROOT_FILES, root_files


def test_no_module_in_a_folder_imports_a_command():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for name, path in MODULES.items() if "." in name or name in FOLDERS
           for line, module, _, _ in imports(path) if module.split(".")[0] in COMMANDS]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_lazy_imports_included():
    graph = {name: {module for _, module, _, _ in imports(path)} - {name}
             for name, path in MODULES.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("path", all_python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_name_is_imported_from_the_module_that_defines_it(path):
    bad = []
    for line, module, name, alias in imports(path):
        if name is not None and name not in defined_names(module):
            bad.append(f"line {line}: {name} is not defined in {module}")
        if name is None:  # module.attribute uses
            for node in ast.walk(TREES[path]):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id == alias and node.attr not in defined_names(module)):
                    bad.append(f"line {node.lineno}: {alias}.{node.attr} "
                               f"is not defined in {module}")
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(sorted(set(bad)))


def test_no_function_runs_past_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(TREES[path]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                f"{length} lines")
    assert not long, "\n".join(long)
