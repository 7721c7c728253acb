#!/usr/bin/env python3
"""No circles between the modules of a crate.

For each crate of the workspace (a `src/lib.rs`), every top-level module (`src/X.rs`, or the
folder `src/X/`) is a node, and a module that names `crate::Y` (in a `use` or a path, outside
comments and `#[cfg(test)]` modules) depends on Y. Inside a folder module, its files are nodes of
their own too (`X/a.rs` naming `super::b` or `crate::X::b` depends on `X/b`), so a circle between
a folder's files is caught as well. A circle is printed with, for each arrow, the names that make
it, and the exit status is 1.

    python3 scripts/module_cycles.py            # the workspace this script is in
    python3 scripts/module_cycles.py --self-test
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def strip(text):
    """The code without comments, string and char literals' contents and `#[cfg(test)]` modules."""
    text = re.sub(r'\br(#*)".*?"\1', '""', text, flags=re.S)
    text = re.sub(r"'(?:\\.|[^'\\\n])'", "' '", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def use_tree(text):
    """The paths a `use` tree names: `crate::{a::{b, c}, d as e}` gives crate::a::b, crate::a::c, crate::d."""
    text = re.sub(r"\s+as\s+\w+", "", text)
    text = re.sub(r"\s+", "", text)
    paths = []

    def walk(prefix, rest):
        if "{" not in rest:
            paths.append(prefix + [x for x in rest.split("::") if x and x != "*"])
            return
        head, body = rest.split("{", 1)
        body = body[: body.rfind("}")]
        base = prefix + [x for x in head.split("::") if x]
        depth, item = 0, ""
        for c in body + ",":
            if c == "," and depth == 0:
                if item:
                    walk(base, item)
                item = ""
                continue
            depth += {"{": 1, "}": -1}.get(c, 0)
            item += c
        if not body:
            paths.append(base)

    walk([], text)
    return paths


def used_paths(code):
    """Every path the code names from `crate::`, `super::` or `self::`, as lists of segments."""
    paths = []
    uses = list(re.finditer(r"\buse\s+([^;]+);", code))
    for m in uses:
        for path in use_tree(m.group(1)):
            if path and path[0] in ("crate", "super", "self"):
                paths.append(path)
    rest = code
    for m in reversed(uses):
        rest = rest[: m.start()] + rest[m.end() :]
    for m in re.finditer(r"\b((?:super::)+|crate::|self::)((?:\w+::)*\w+)", rest):
        head = m.group(1)
        prefix = ["super"] * head.count("super") if head.startswith("super") else [head[:-2]]
        paths.append(prefix + m.group(2).split("::"))
    return paths


def module_of(rel):
    """A file's module path: `store/dynamodb.rs` is store::dynamodb, `store/mod.rs` is store."""
    parts = list(rel.parts)
    parts[-1] = parts[-1].removesuffix(".rs")
    if parts[-1] == "mod":
        parts = parts[:-1]
    return tuple(parts)


def modules(src):
    """{module path: file} for a crate's src folder (the crate root and `bin/` left out)."""
    found = {}
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src)
        if rel.parts[0] in ("bin", "main.rs", "lib.rs"):
            continue
        found[module_of(rel)] = path
    return found


def graph(src):
    """{(node, node): {names}}: between a crate's top-level modules, and between the files of
    one top-level module's folder (a parent and its own submodule are not a dependency)."""
    known = modules(src)
    edges = {}
    for here, path in known.items():
        for segments in used_paths(strip(path.read_text())):
            if segments[0] == "crate":
                target = list(segments[1:])
            else:
                base = list(here)
                while segments and segments[0] == "super":
                    base = base[:-1]
                    segments = segments[1:]
                if segments and segments[0] == "self":
                    segments = segments[1:]
                target = base + list(segments)
            # The longest known module the path names.
            module = None
            for n in range(len(target), 0, -1):
                if tuple(target[:n]) in known:
                    module = tuple(target[:n])
                    break
            if module is None:
                continue
            name = target[len(module)] if len(target) > len(module) else module[-1]
            if module[0] != here[0]:
                edges.setdefault((here[0], module[0]), set()).add(name)
            elif here[: len(module)] != module and module[: len(here)] != here:
                edges.setdefault(("/".join(here), "/".join(module)), set()).add(name)
    return edges


def cycles(edges):
    """The strongly connected components of more than one node (Tarjan)."""
    succ = {}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(succ):
        if v not in index:
            visit(v)
    return found


def check(root):
    bad = 0
    for lib in sorted(root.glob("**/src/lib.rs")):
        if "target" in lib.parts or ".venv" in lib.parts or "node_modules" in lib.parts:
            continue
        src = lib.parent
        edges = graph(src)
        for component in cycles(edges):
            bad += 1
            crate = src.parent.relative_to(root)
            print(f"{crate}: a circle between {', '.join(component)}")
            for (a, b), names in sorted(edges.items()):
                if a in component and b in component:
                    print(f"  {a} -> {b}: {', '.join(sorted(names))}")
    return bad


def self_test():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "c" / "src"
        (src / "store").mkdir(parents=True)
        (src / "lib.rs").write_text("pub mod a; pub mod b; pub mod store;")
        (src / "a.rs").write_text("use crate::{b::Thing as Class, store};\n// use crate::c;\n")
        (src / "b.rs").write_text(
            'pub struct Thing; const S: &str = "crate::a"; const Q: char = \'"\';\n'
            'const R: &str = r#"use crate::a;"#;\n#[cfg(test)]\nmod tests { use crate::a; }\n'
        )
        (src / "store" / "mod.rs").write_text("pub mod x; pub mod y; use self::x::X;")
        (src / "store" / "x.rs").write_text("use super::y::Y;")
        (src / "store" / "y.rs").write_text("pub struct Y; fn f() { crate::store::x::g(); }")
        edges = graph(src)
        assert ("a", "b") in edges and ("a", "store") in edges, edges
        assert ("b", "a") not in edges, "a test module, a string, a char and a raw string are not dependencies"
        assert cycles(edges) == [["store/x", "store/y"]], cycles(edges)
        # Nested use trees, `super` in a top-level file (the crate), `super::super`.
        (src / "store" / "y.rs").write_text("pub struct Y;")
        (src / "b.rs").write_text("use super::a::*;")
        assert cycles(graph(src)) == [["a", "b"]], cycles(graph(src))
        (src / "b.rs").write_text("pub struct Thing;")
        (src / "store" / "y.rs").write_text("fn f() { super::super::a::go(); }")
        assert ("store", "a") in graph(src), graph(src)
        (src / "a.rs").write_text("use crate::{store::{x::X, y}};")
        assert cycles(graph(src)) == [["a", "store"]], cycles(graph(src))
        (src / "store" / "x.rs").write_text("use crate::store::{y::Y};")
        (src / "store" / "y.rs").write_text("use crate::{store::{x}};")
        assert ["store/x", "store/y"] in cycles(graph(src)), graph(src)
    print("module_cycles: self-test passed")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        sys.exit(0)
    found = check(ROOT)
    if found:
        print(f"{found} circle(s) between modules: move the shared names into the lower module")
        sys.exit(1)
    print("no circles between the modules of any crate")
