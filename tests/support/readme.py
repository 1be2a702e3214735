"""The README as the tests read it: its text (`README`), a section under a heading
(`section`) and the shell blocks in a piece of it (`shell_blocks`)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def section(text: str, heading: str) -> str:
    """The text under `heading` (like "## Running it"), up to the next heading of the same
    or a higher level; headings inside code blocks do not count."""
    level = len(heading.split(" ")[0])
    lines, out, inside, fenced = text.splitlines(), [], False, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        is_heading = not fenced and re.match(r"#{1,6} ", line)
        if inside and is_heading and len(line.split(" ")[0]) <= level:
            break
        if inside:
            out.append(line)
        if line.strip() == heading:
            inside = True
    assert inside, f"README.md has no {heading!r} section"
    return "\n".join(out)


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)
