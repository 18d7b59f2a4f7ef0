"""The configuration reference (docs/config.md), generated from the config dataclasses themselves:
every key, its type, its default and its meaning, so it cannot drift.

    .venv/bin/python -m aigd.config_reference > docs/config.md
    .venv/bin/python -m aigd.config_reference --missing   # keys without a meaning (exit 1 if any)

A key's meaning is the `#` comment of its field in aigd/config.py: the comment lines right above the
field (no blank line between) followed by the comment at the end of the field's line(s). A comment
above a group of fields belongs to the first of them only: every field says what it is itself. A
section's meaning is the first paragraph of its class docstring followed by its field's comment.
The test of docs/config.md fails while any key or section has none.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from typing import NamedTuple

from aigd import config as C

TOP = (("Training job (`jobs/train_method*.py --config`)", C.TrainJobConfig),
       ("Serve app (`serve run` / `serve deploy`, the `args` of `serve.app:build_app`)", C.ServeConfig),
       ("Evaluation job (`jobs/evaluate.py --config`)", C.EvalConfig),
       ("Demo data (`aigd demo-data --config`)", C.DemoDataConfig),
       ("Promotion (`aigd promote / rollback / shadow / adapters list --config`)", C.PromoteConfig),
       ("The Detector's `user_config` (set by `aigd promote`; Serve calls `reconfigure` with it)", C.ServingVersions))

SECTION = "section"


class Row(NamedTuple):
    key: str  # dotted, from the top of the file
    type: str  # SECTION for a nested dataclass
    default: str  # as the table shows it (empty for a section)
    meaning: str


def _comments(cls) -> dict[str, str]:
    """field name -> the comment lines right above its definition and the comment ending its line(s)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip())
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names):
            continue
        above, n = [], node.lineno - 1
        while n in comments and comments[n][1]:
            above.insert(0, comments[n][0])
            n -= 1
        end = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        out[node.target.id] = " ".join(x for x in (*above, *end) if x)
    return out


def _type(t) -> str:
    return re.sub(r"\b(typing|aigd\.config)\.", "", str(t) if not isinstance(t, type) else t.__name__)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _doc(cls) -> str:
    """The first paragraph of a class's own docstring (not the signature dataclass makes up)."""
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc.split("\n\n")[0].replace("\n", " ")


def rows(cls, prefix: str = "", defaults=None) -> list[Row]:
    """Every key of `cls`: its plain fields first, then each section's row and its keys. `defaults`:
    the instance the enclosing field makes by default (a section's default may differ from its class's)."""
    hints, notes, out, nested = typing.get_type_hints(cls), {}, [], []
    for klass in reversed(cls.__mro__):  # a subclass's comments win
        if dataclasses.is_dataclass(klass):
            notes.update(_comments(klass))
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        default = _default(f) if defaults is None else getattr(defaults, f.name)
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        if inner and typing.get_origin(t) is dict:  # a mapping of sections: one per name
            nested.append((f"{prefix}{f.name}.<name>", inner[0], notes.get(f.name, ""), None))
            continue
        if dataclasses.is_dataclass(t) or inner:
            nested.append((prefix + f.name, inner[0] if inner else t, notes.get(f.name, ""), default))
            continue
        out.append(Row(prefix + f.name, _type(t), f"`{default!r}`" if default is not None else "`null`",
                       notes.get(f.name, "")))
    for key, sub, note, default in nested:
        out.append(Row(key, SECTION, "", " ".join(x for x in (_doc(sub), note) if x)))
        out += rows(sub, key + ".", default)
    return out


def missing() -> list[str]:
    """`<top-level class>: <key>` for every key and section without a meaning."""
    return [f"{cls.__name__}: {r.key}" for _, cls in TOP for r in rows(cls) if not r.meaning.strip()]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _line(r: Row) -> str:
    if r.type == SECTION:
        return f"| **`{r.key}`** | section | | {_cell(r.meaning)} |"
    return f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.meaning)} |"


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `platform/aigd/config.py` by `.venv/bin/python -m aigd.config_reference > docs/config.md`",
           "(a test fails when this file is stale). Every YAML under `configs/` maps onto one of these; unknown",
           "keys and wrong types are errors that name the key; any key can be overridden on the command line",
           "as `a.b=c`; `${VAR:-default}` in a value reads the environment.", ""]
    for title, cls in TOP:
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|",
                *map(_line, rows(cls)), ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv == ["--missing"]:
        gaps = missing()
        total = sum(len(rows(cls)) for _, cls in TOP)
        for gap in gaps:
            print(gap)
        print(f"{len(gaps)} of {total} keys and sections have no meaning")
        return 1 if gaps else 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    print(render(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
