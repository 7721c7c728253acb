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
    """The code without comments, string literals' contents and `#[cfg(test)]` modules."""
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


def used_paths(code):
    """Every path the code names from `crate::` or `super::`, as lists of segments."""
    paths = []
    for m in re.finditer(r"\b(crate|super)::", code):
        head = m.group(1)
        rest = code[m.end() :]
        if rest.startswith("{"):
            depth, j, item, items = 0, 0, "", []
            for j, c in enumerate(rest):
                if c == "{":
                    depth += 1
                    if depth == 1:
                        continue
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        items.append(item)
                        break
                if depth == 1 and c == ",":
                    items.append(item)
                    item = ""
                else:
                    item += c
            for item in items:
                segments = re.findall(r"\w+", item.split("{")[0].split(" as ")[0])
                if segments:
                    paths.append([head] + segments)
        else:
            segments = re.match(r"(\w+)(?:::(\w+))?", rest)
            if segments:
                paths.append([head] + [s for s in segments.groups() if s])
    return paths


def modules(src):
    """{node: [files]} for a crate's src folder: top-level modules, and each folder's files."""
    nodes = {}
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src)
        if rel.parts[0] in ("bin", "main.rs", "lib.rs"):
            continue
        top = rel.parts[0].removesuffix(".rs")
        nodes.setdefault(top, []).append(path)
    return nodes


def graph(src):
    """{(node, node): {names}} between a crate's modules, and between the files of each folder."""
    nodes = modules(src)
    edges = {}
    for top, files in nodes.items():
        for path in files:
            rel = path.relative_to(src)
            inner = "/".join(rel.parts[1:]).removesuffix(".rs") if len(rel.parts) > 1 else None
            here = f"{top}/{inner.removesuffix('/mod')}" if inner and inner != "mod" else top
            for segments in used_paths(strip(path.read_text())):
                if segments[0] == "crate":
                    target = segments[1] if len(segments) > 1 else None
                    if target in nodes and target != top:
                        edges.setdefault((top, target), set()).add("::".join(segments[2:3]) or target)
                    elif target == top and len(segments) > 2 and here != top:
                        sub = f"{top}/{segments[2]}"
                        if sub != here and any(f.stem == segments[2] or f.parent.name == segments[2] for f in files):
                            edges.setdefault((here, sub), set()).add(segments[2])
                elif segments[0] == "super" and here != top and len(segments) > 1:
                    parent = here.rsplit("/", 1)[0] if rel.name != "mod.rs" else here.rsplit("/", 1)[0]
                    sub = f"{parent}/{segments[1]}" if parent != top or True else None
                    names = {f.stem for f in files} | {f.parent.name for f in files}
                    if segments[1] in names and sub != here:
                        edges.setdefault((here, sub), set()).add(segments[1])
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
        (src / "a.rs").write_text("use crate::{b::Thing, store};\n// use crate::c;\n")
        (src / "b.rs").write_text('pub struct Thing; const S: &str = "crate::a";\n#[cfg(test)]\nmod tests { use crate::a; }\n')
        (src / "store" / "mod.rs").write_text("pub mod x; pub mod y;")
        (src / "store" / "x.rs").write_text("use super::y::Y;")
        (src / "store" / "y.rs").write_text("pub struct Y; fn f() { crate::store::x::g(); }")
        edges = graph(src)
        assert ("a", "b") in edges and ("a", "store") in edges, edges
        assert ("b", "a") not in edges, "a test module and a string are not dependencies"
        assert cycles(edges) == [["store/x", "store/y"]], cycles(edges)
        (src / "store" / "y.rs").write_text("pub struct Y;")
        (src / "b.rs").write_text("pub struct Thing; use crate::a::*;")
        assert cycles(graph(src)) == [["a", "b"]], cycles(graph(src))
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
