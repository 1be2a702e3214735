"""YAML that remembers where things came from.

PyYAML silently keeps the last of two equal keys and forgets line numbers once a document
is constructed. Policy validation needs both: duplicate keys are errors, and every error
names a line. This loader builds plain dicts and lists that also carry the 1-based line of
the mapping/sequence and of each key or item.
"""

from __future__ import annotations

from typing import Any

import yaml


class SourceError(Exception):
    """A problem at a place in a file. `str()` reads `file:line: problem`."""

    def __init__(self, file: str, line: int | None, problem: str) -> None:
        self.file = file
        self.line = line
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.problem}"


class LineMap(dict):
    """A mapping with `line` (where it starts) and `lines[key]` (where each key is)."""

    line: int
    lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        return self.lines.get(key, self.line)


class LineList(list):
    """A sequence with `line` (where it starts) and `lines[i]` (where item i is)."""

    line: int
    lines: list[int]

    def line_of(self, index: int) -> int:
        return self.lines[index] if index < len(self.lines) else self.line


def load(text: str, file: str) -> Any:
    """Parse one YAML document into LineMap/LineList/scalars; raise SourceError on problems."""
    loader = _Loader(text)
    loader.file = file
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(p for p in (e.context, e.problem) if p) or "invalid YAML"
        raise SourceError(file, line, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise SourceError(file, None, f"invalid YAML: {e}") from None
    finally:
        loader.dispose()


#: libyaml's parser when PyYAML has it (about twice as fast on a large policy; the same
#: documents, marks and errors), else the pure-Python one.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[misc, valid-type]
    file: str = "<policy>"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)  # resolves `<<` merge keys like SafeLoader does
    result = LineMap()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise SourceError(loader.file, line, "a mapping key must be a scalar") from None
        if key in result:
            raise SourceError(
                loader.file,
                line,
                f"duplicate key {key!r} (first defined on line {result.lines[key]})",
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)
