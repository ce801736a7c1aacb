"""The package's layers (docs/design.md, "Layers"): every import, at module level or inside a
function, goes to the same layer or a lower one; no two modules import each other, directly
or around a loop; no module imports another module's private name; the package root holds
the verbs and the errors, and its former names still work for a release with a warning."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

import hhtld

SRC = Path(hhtld.__file__).parent

# lowest first; a module may import from its own layer or a lower one
LAYERS = [
    {"_version", "errors", "format", "names", "stfile", "memory", "outputs", "cosine", "display"},
    {"checkpoint", "measure"},
    {"classify"},
    {"codecs"},
    {"pack", "kernels"},
    {"budget", "inspection"},
    {"calibrate"},
    {"encoding"},
    {"gates", "probe"},
    {"loader"},
    {"cli", "hf"},
    {"__init__", "__main__"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out["hhtld." + ".".join(parts) if parts != ["__init__"] else "hhtld"] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(line, target module, names) of every import of hhtld modules in one file."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("hhtld"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield node.lineno, (sub if sub in MODULES else mod), a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("hhtld"):
                    yield node.lineno, a.name, None


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_is_in_a_layer():
    assert sorted({_part(m) for m in MODULES} - set(RANK)) == []


def test_imports_go_to_the_same_layer_or_a_lower_one():
    wrong = []
    for name, path in MODULES.items():
        me = RANK[_part(name) if name != "hhtld" else "__init__"]
        if path.name == "__main__.py":
            me = RANK["__main__"]
        for line, target, _ in _imports(name, path):
            if target in MODULES and RANK[_part(target)] > me:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert wrong == []


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for _, target, _ in _imports(name, path):
            if target in MODULES and target != name and not name.startswith(target + "."):
                graph[name].add(target)  # a package's own __init__ is imported first anyway
    # Tarjan's strongly connected components
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for name, path in MODULES.items():
        for line, target, imported in _imports(name, path):
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name \
                    and f"{target}.{imported}" not in MODULES:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {target}.{imported}")
    assert wrong == []


def test_the_root_holds_the_verbs_and_the_errors():
    verbs = {"open_checkpoint", "encode", "decode", "open", "inspect", "verify", "probe_attention", "load",
             "load_tokenizer", "load_sentence_transformer", "embed", "generate", "weight_memory", "export_hf"}
    errors = {n for n in hhtld.__all__ if n.endswith("Error")}
    assert set(hhtld.__all__) == verbs | errors | {"__version__"}
    assert all(issubclass(getattr(hhtld, e), hhtld.HhtldError) for e in errors)
    assert hhtld.open is hhtld.pack.open_pack and hhtld.inspect is hhtld.inspection.inspect_path


@pytest.mark.parametrize("name, where", [("encode_checkpoint", "hhtld.pack"), ("LADDER", "hhtld.budget"),
                                         ("heldout_texts", "hhtld.gates"), ("EncodablePolicy", "hhtld.classify")])
def test_former_root_names_work_with_a_deprecation_warning(name, where):
    import importlib

    with pytest.warns(DeprecationWarning, match=rf"^hhtld\.{name} is deprecated .*; use {where}\.{name}"):
        got = getattr(hhtld, name)
    if name != "encode_checkpoint":  # that one keeps its former default codec (hhtl-f32)
        assert got is getattr(importlib.import_module(where), name)
    with pytest.raises(AttributeError, match="module 'hhtld' has no attribute 'no_such_name'"):
        hhtld.no_such_name  # noqa: B018


def test_encode_budget_is_deprecated_and_gives_encode_s_result(small_ckpt, tmp_path):
    from hhtld.classify import EncodablePolicy
    from hhtld.encoding import encode_budget

    with pytest.warns(DeprecationWarning, match="use hhtld.encode"):
        res, al = encode_budget(small_ckpt, tmp_path / "a.hhtld", target="rows", policy=EncodablePolicy(encode_all=True))
    rep = hhtld.encode(small_ckpt, tmp_path / "b.hhtld", target="rows", policy=EncodablePolicy(encode_all=True))
    assert al.to_json()["groups"] == rep.allocation.to_json()["groups"]
    assert (tmp_path / "a.hhtld").read_bytes() == (tmp_path / "b.hhtld").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hhtld.encode(small_ckpt, tmp_path / "c.hhtld", codec="hhtl-f32")  # the new name warns of nothing


def test_the_former_root_encode_checkpoint_keeps_its_default_codec(small_ckpt, tmp_path):
    with pytest.warns(DeprecationWarning):
        old = hhtld.encode_checkpoint
    old(small_ckpt, tmp_path / "a.hhtld")
    assert hhtld.open(tmp_path / "a.hhtld").manifest["codec"] == "hhtl-f32"


@pytest.mark.parametrize("old, new", [("hhtld.gates.texts", "hhtld.measure.texts"),
                                      ("hhtld.gates.targets", "hhtld.measure.targets")])
def test_moved_modules_still_import_with_a_deprecation_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"^{old} is deprecated .*; use {new}$"):
        mod = importlib.import_module(old)
    public = [n for n in dir(importlib.import_module(new)) if not n.startswith("_")]
    assert all(getattr(mod, n) is getattr(importlib.import_module(new), n) for n in public)
