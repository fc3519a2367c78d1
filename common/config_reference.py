"""The configuration reference, generated from `FedtuneConfig`'s own defaults and help text:
`fedtune config`'s listing, `[tool.flwr.app.config]` in pyproject.toml and the key tables of
docs/configuration.md.

    python -m common.config_reference          say which generated file is stale (exit 1)
    python -m common.config_reference --write  regenerate them after a change in common/config.py
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_type_hints

from common.config import SECTIONS, FedtuneConfig

# The first key of each section, and the section's title, for the generated reference.
GROUPS = {dataclasses.fields(section)[0].name: section.title for section in SECTIONS}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def reference() -> list[tuple[str, str, str, str]]:
    """(group, key, default as TOML, help) for every key, in declaration order; a key with a fixed
    set of values has them appended to its help."""
    hints, rows, group = get_type_hints(FedtuneConfig), [], ""
    for f in dataclasses.fields(FedtuneConfig):
        group = GROUPS.get(f.name, group)
        help_text, choices = f.metadata["help"], get_args(hints[f.name])
        if choices and not all(c in help_text for c in choices):
            help_text += f" One of: {', '.join(choices)}."
        rows.append((group, f.name.replace("_", "-"), toml_value(f.default), help_text))
    return rows


def pyproject_block() -> str:
    """The `[tool.flwr.app.config]` table: every key, its default and its help as a comment."""
    lines, group = ["[tool.flwr.app.config]"], ""
    for g, key, default, help_text in reference():
        if g != group:
            lines.append(f"# --- {g} ---")
            group = g
        lines.append(f"{key} = {default}  # {help_text}")
    return "\n".join(lines) + "\n"


def markdown_block() -> str:
    """The key reference of docs/configuration.md: one table per group."""
    out, group = [], ""
    for g, key, default, help_text in reference():
        if g != group:
            out += [f"\n### {g[0].upper()}{g[1:]}\n", "| key | default | meaning |", "|---|---|---|"]
            group = g
        cell = help_text.replace("|", r"\|")
        out.append(f"| `{key}` | `{default}` | {cell} |")
    return "\n".join(out).lstrip("\n") + "\n"


REFERENCE_MARKERS = ("<!-- generated from common/config.py: begin -->", "<!-- generated from common/config.py: end -->")


def generated_files(repo) -> dict:
    """{path: (current text, text with the generated parts regenerated)} for pyproject.toml and
    docs/configuration.md under `repo`."""
    from pathlib import Path

    repo = Path(repo)
    pyproject = (repo / "pyproject.toml").read_text()
    head, rest = pyproject.split("[tool.flwr.app.config]\n", 1)
    tail = rest[rest.index("\n[") + 1 :] if "\n[" in rest else ""
    new_pyproject = head + pyproject_block() + ("\n\n" + tail if tail else "")
    docs = (repo / "docs" / "configuration.md").read_text()
    begin, end = REFERENCE_MARKERS
    before, after = docs.split(begin, 1)[0], docs.split(end, 1)[1]
    new_docs = before + begin + "\n" + markdown_block() + end + after
    return {repo / "pyproject.toml": (pyproject, new_pyproject), repo / "docs" / "configuration.md": (docs, new_docs)}


if __name__ == "__main__":
    import sys
    from pathlib import Path

    stale = [
        (path, new)
        for path, (old, new) in generated_files(Path(__file__).resolve().parent.parent).items()
        if old != new
    ]
    if "--write" in sys.argv:
        for path, new in stale:
            path.write_text(new)
            print(f"wrote {path}")
    else:
        print("\n".join(f"stale: {path}" for path, _ in stale) or "up to date")
        sys.exit(1 if stale else 0)
