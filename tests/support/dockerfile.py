"""The Dockerfile as the tests read it: its instructions (`instructions`, continuation
lines joined, comments dropped), grouped by stage, and what the image a stage builds
inherits: `in_image` (its instructions of one kind), `image_env`, `final_stage`, and
`exec_form` (an ENTRYPOINT or CMD as its argument list)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    stage: str  # the name (or index) of the stage it belongs to


@cache
def instructions() -> tuple[Instruction, ...]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage, pending = "", ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside continuations too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            as_name = [w for i, w in enumerate(words) if i and words[i - 1].upper() == "AS"]
            stage = as_name[0] if as_name else str(sum(i.keyword == "FROM" for i in out))
        out.append(Instruction(keyword, args, stage))
    return tuple(out)


def stages() -> list[str]:
    return [i.stage for i in instructions() if i.keyword == "FROM"]


def stage_chain(stage: str) -> list[str]:
    """The stage and the stages it is built FROM, base first."""
    chain = []
    while stage:
        chain.insert(0, stage)
        (base,) = [
            i.args.split()[0] for i in instructions() if i.stage == stage and i.keyword == "FROM"
        ]
        stage = base if base in stages() else ""
    return chain


def in_image(stage: str, keyword: str) -> list[Instruction]:
    """`keyword` instructions that apply to the image `stage` builds (inherited ones too)."""
    chain = stage_chain(stage)
    return [i for i in instructions() if i.stage in chain and i.keyword == keyword]


def image_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in in_image(stage, "ENV"):
        words = shlex.split(instruction.args)
        assert all("=" in w for w in words), f"use ENV KEY=VALUE: ENV {instruction.args}"
        env.update(w.split("=", 1) for w in words)
    return env


def final_stage() -> str:
    return stages()[-1]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"{instruction.keyword} must be in exec (JSON) form"
    return value
