"""The configuration reference (docs/config.md), generated from the config dataclasses themselves:
every key, its type, its default and the comment beside it in aigd/config.py, so it cannot drift.

    .venv/bin/python -m aigd.config_reference > docs/config.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from aigd import config as C

TOP = (("Training job (`jobs/train_method*.py --config`)", C.TrainJobConfig),
       ("Serve app (`serve run` / `serve deploy`, the `args` of `serve.app:build_app`)", C.ServeConfig),
       ("Evaluation job (`jobs/evaluate.py --config`)", C.EvalConfig),
       ("Demo data (`aigd demo-data --config`)", C.DemoDataConfig))


def _comments(cls) -> dict[str, str]:
    """field name -> the comment on its line, or the comment block just above it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = re.match(r"(\w+): [^=]+?(?:=.*?)?(?:\s+#\s*(.*))?$", stripped)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            out[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        above = []
    return out


def _type(t) -> str:
    return re.sub(r"\b(typing|aigd\.config)\.", "", str(t) if not isinstance(t, type) else t.__name__)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _rows(cls, prefix: str) -> list[str]:
    hints, notes, rows, nested = typing.get_type_hints(cls), {}, [], []
    for klass in reversed(cls.__mro__):  # a subclass's comments win
        if dataclasses.is_dataclass(klass):
            notes.update(_comments(klass))
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(t) or inner:
            nested.append((f"{prefix}{f.name}.", inner[0] if inner else t, notes.get(f.name, "")))
            continue
        default = _default(f)
        shown = "`" + repr(default).replace("|", "\\|") + "`" if default is not None else "`null`"
        rows.append(f"| `{prefix}{f.name}` | {_type(t).replace('|', chr(92) + '|')} | {shown} | "
                    f"{notes.get(f.name, '').replace('|', chr(92) + '|')} |")
    for sub_prefix, sub, note in nested:
        doc = inspect.getdoc(sub) or ""
        doc = "" if doc.startswith(sub.__name__ + "(") else doc.split("\n\n")[0].replace("\n", " ")  # no auto-docs
        rows.append(f"| **`{sub_prefix[:-1]}`** | section | | {' '.join(x for x in (note, doc) if x)} |")
        rows += _rows(sub, sub_prefix)
    return rows


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `platform/aigd/config.py` by `.venv/bin/python -m aigd.config_reference > docs/config.md`",
           "(a test fails when this file is stale). Every YAML under `configs/` maps onto one of these; unknown",
           "keys and wrong types are errors that name the key; any key can be overridden on the command line",
           "as `a.b=c`; `${VAR:-default}` in a value reads the environment.", ""]
    for title, cls in TOP:
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|", *_rows(cls, ""), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
