"""The import layering of kerasdet (docs/ARCHITECTURE.md, "Layers of the code"): a package imports only
packages of a lower level, and the packages of one level do not import each other.

Every import counts, wherever it is written: at module level or inside a function, `from kerasdet import x`,
relative imports, `importlib.import_module("kerasdet.x")` with a literal name, and `kerasdet.x` reached as
an attribute after `import kerasdet` (the package's lazy submodules). The test reads the source (ast);
it imports nothing.
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kerasdet")

# The layer table. Level 0 imports nothing of kerasdet; the command line and the demo are on top.
LEVELS = {
    "kerasdet.ops": 0, "kerasdet.visualize": 0, "kerasdet.weights_files": 0, "kerasdet.numpy_boxes": 0,
    "kerasdet.atomic_files": 0,
    "kerasdet.layers": 1, "kerasdet.losses": 1, "kerasdet.data": 1,
    "kerasdet.backbones": 2, "kerasdet.necks": 2, "kerasdet.heads": 2, "kerasdet.evaluation": 2,
    "kerasdet.models": 3,
    "kerasdet.converters": 4, "kerasdet.export": 4,
    "kerasdet.zoo": 5,
    "kerasdet.engine": 6,
    "kerasdet.cli": 7, "kerasdet.demo": 7,
}


def package_of(dotted):
    """The LEVELS key that ``dotted`` (a module or attribute path) belongs to; "kerasdet" for the
    package root itself (lazy, no imports of its own), None when no entry of the table holds it."""
    if dotted == "kerasdet" or dotted.startswith("kerasdet.__"):
        return "kerasdet"
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        if ".".join(parts[:end]) in LEVELS:
            return ".".join(parts[:end])
    return None


def module_name(path):
    relative = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    if relative[-1] == "__init__":
        relative = relative[:-1]
    return ".".join(relative)


def imported_names(source, module, is_package=False):
    """[(line, dotted name)] of every kerasdet module or attribute ``source`` (the text of ``module``)
    reaches."""
    tree = ast.parse(source)
    found = []
    root_aliases = set()  # names bound to the kerasdet package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name))
                if alias.name.split(".")[0] == "kerasdet" and (alias.asname is None or alias.name == "kerasdet"):
                    root_aliases.add(alias.asname or "kerasdet")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # `from .x import y` in module a.b.c is a.b.x; in package a.b (its __init__) it is a.b.x.
                anchor = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base == "kerasdet":
                found.extend((node.lineno, f"kerasdet.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in root_aliases:
            found.append((node.lineno, f"kerasdet.{node.attr}"))
    return [(line, name) for line, name in found if name == "kerasdet" or name.startswith("kerasdet.")]


def upward_imports(source, module, is_package=False):
    """The imports of ``module`` that break the layering, as readable lines."""
    source_package = package_of(module)
    problems = []
    for line, name in imported_names(source, module, is_package):
        target = package_of(name)
        if target == "kerasdet" or target == source_package:
            continue
        if target is None:
            problems.append(f"{module}:{line} imports {name}, which the layer table does not place")
        elif LEVELS[target] >= LEVELS[source_package]:
            problems.append(f"{module}:{line} (level {LEVELS[source_package]}) imports {name} "
                            f"(level {LEVELS[target]})")
    return problems


def package_files():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_every_module_has_a_level():
    unplaced = [module_name(path) for path in package_files()
                if module_name(path) != "kerasdet" and package_of(module_name(path)) is None]
    assert unplaced == [], "add these to LEVELS and to docs/ARCHITECTURE.md's layer table"


def test_no_import_goes_up_the_layers():
    problems = []
    for path in package_files():
        module = module_name(path)
        if module == "kerasdet":
            continue  # the root only maps attribute names to submodules, on first use
        with open(path, encoding="utf-8") as handle:
            problems += upward_imports(handle.read(), module, path.endswith("__init__.py"))
    assert problems == []


SNEAKY = '''
import importlib
import kerasdet
from kerasdet.ops import boxes
from kerasdet import losses, zoo
from ..engine import runs

def later():
    import kerasdet.cli
    from kerasdet.export import export_saved_model
    importlib.import_module("kerasdet.demo")
    return kerasdet.engine.train_model, kerasdet.__version__
'''


def test_the_checker_sees_every_kind_of_import():
    problems = upward_imports(SNEAKY, "kerasdet.converters.sneaky")
    reached = sorted(re.search(r"imports (\S+)", problem).group(1) for problem in problems)
    # Lower levels (ops, losses), the root and its version are fine; export is the converters' own
    # level (siblings stay independent); the rest is above.
    assert reached == ["kerasdet.cli", "kerasdet.demo", "kerasdet.engine", "kerasdet.engine",
                       "kerasdet.export", "kerasdet.zoo"]
    assert upward_imports("from kerasdet.nowhere import x", "kerasdet.ops.boxes") == [
        "kerasdet.ops.boxes:1 imports kerasdet.nowhere, which the layer table does not place"]


def test_the_architecture_doc_states_the_same_levels():
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8") as handle:
        text = handle.read()
    stated = {}
    for level, packages in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.MULTILINE):
        for path in re.findall(r"`kerasdet/([\w/]+?)(?:/|\.py)`", packages):
            stated["kerasdet." + path.replace("/", ".")] = int(level)
    assert stated == LEVELS

