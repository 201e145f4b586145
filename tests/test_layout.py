"""The package's layout holds: no import cycle between its modules (imports inside functions
included), and each part imports only the parts below it, as docs/architecture.md draws them."""

import ast
import os

from helpers import REPO

PACKAGE = os.path.join(REPO, "gpam_fairseq")

# part -> the parts it may import (the root package, whose import registers the models, may be
# imported from anywhere); docs/architecture.md's "What each part may import"
ALLOWED = {
    "attention": {"attention"},
    "options": {"attention"},
    "modules": {"attention", "options"},
    "models": {"attention", "options", "modules", "checkpointing", "fairseq_glue"},
    "fairseq_glue": {"options"},
    "checkpointing": {"attention", "options"},
    "recipes": {"attention", "options", "modules", "models", "checkpointing", "fairseq_glue", "recipes"},
    "measurement": {"attention", "options", "modules", "models", "checkpointing", "fairseq_glue", "measurement"},
}
# single modules a part reaches beyond its rule, each named in docs/architecture.md
EXCEPTIONS = {
    ("gpam_fairseq.attention.stats", "gpam_fairseq.options"),
    ("gpam_fairseq.fairseq_glue.cli_errors", "gpam_fairseq.checkpointing.checkpoints"),
    ("gpam_fairseq.checkpointing.checkpoints", "gpam_fairseq.fairseq_glue.compat"),
    ("gpam_fairseq.recipes.stages", "gpam_fairseq.measurement"),
    ("gpam_fairseq.recipes.stages", "gpam_fairseq.measurement.peak_memory"),
    ("gpam_fairseq.measurement.gpu_checks", "gpam_fairseq.recipes.synthetic_corpus"),
}


def modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path[:-3], REPO).replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def import_edges(found):
    """{module: set of package modules it imports}, relative imports resolved."""
    edges = {}
    for name, path in found.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in candidates:
                while target and target not in found:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    targets.add(target)
        edges[name] = targets
    return edges


def part(module):
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None  # None: the root package


def test_the_scan_sees_the_package():
    edges = import_edges(modules())
    assert "gpam_fairseq.attention.mechanisms" in edges["gpam_fairseq.options"]
    assert "gpam_fairseq.attention.config" in edges["gpam_fairseq.attention.mechanisms"]
    assert len(edges) > 40


def test_no_import_cycle():
    edges = import_edges(modules())
    state, cycles = {}, []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_part_imports_only_what_it_may():
    edges = import_edges(modules())
    wrong = []
    for module, targets in edges.items():
        source = part(module)
        if source is None:
            continue
        for target in targets:
            into = part(target)
            if into is None or into == source or into in ALLOWED[source] or (module, target) in EXCEPTIONS:
                continue
            wrong.append(f"{module} -> {target}")
    assert not wrong, "imports across the layout's rules (docs/architecture.md): " + ", ".join(sorted(wrong))
    assert set(ALLOWED) == {part(m) for m in edges if part(m) is not None}
