"""YAML that remembers where things came from.

PyYAML silently keeps the last of two equal keys and forgets line numbers once a document
is constructed. Policy validation needs both: duplicate keys are errors, and every error
names a line. This loader builds plain dicts and lists that also carry the 1-based line of
the mapping/sequence and of each key or item. A syntax error names its line and column and
adds a hint in plain words (a tab, an indentation, a quote or bracket never closed).
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class SourceError(Exception):
    """A problem at a place in a file. `str()` reads `file:line: problem`."""

    def __init__(
        self, file: str, line: int | None, problem: str, column: int | None = None
    ) -> None:
        self.file = file
        self.line = line
        self.problem = problem
        self.column = column  # 1-based, when known (YAML syntax errors); also in `problem`
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
        raise _syntax_error(e, text, file) from None
    except yaml.YAMLError as e:
        raise SourceError(file, None, f"invalid YAML: {e}") from None
    except RecursionError:
        raise SourceError(file, None, "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _syntax_error(e: yaml.MarkedYAMLError, text: str, file: str) -> SourceError:
    """`invalid YAML at column C: <PyYAML's words> (hint: <plain words>)` on the line where
    the fix most likely goes: where a quote or bracket was opened, else where parsing stopped."""
    mark, hint = _explain(e, text)
    problem = " ".join(p for p in (e.context, e.problem) if p) or "invalid YAML"
    if mark is None:
        return SourceError(file, None, f"invalid YAML: {problem}")
    column = mark.column + 1
    tail = f" (hint: {hint})" if hint else ""
    return SourceError(
        file, mark.line + 1, f"invalid YAML at column {column}: {problem}{tail}", column
    )


_TAB_INDENT = "tabs are not allowed for indentation in YAML: use spaces"
_INDENT = "check the indentation of this line against the line above"
_BRACKETS = {"[": "]", "{": "}"}
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # YAML's line breaks


def _explain(e: yaml.MarkedYAMLError, text: str) -> tuple[Any, str | None]:
    """The mark to report and a hint, from the text around PyYAML's marks (libyaml and the
    pure-Python parser word their errors differently; the text is the same)."""
    at, opened = e.problem_mark, e.context_mark
    lines = _LINE_BREAK.split(text)
    context, problem = e.context or "", e.problem or ""
    if at is None:
        return opened, None
    line = lines[at.line] if at.line < len(lines) else ""
    indent = len(line) - len(line.lstrip(" \t"))
    if "\t" in line[:indent] and at.column <= indent:
        return at, _TAB_INDENT
    if line[at.column : at.column + 1] == "\t":
        return at, "YAML does not allow a tab here: use spaces"
    if opened is not None and "quoted scalar" in context and "end of stream" in problem:
        return opened, "a quote opened here is never closed"
    if opened is not None and "while parsing a flow" in context:
        return _bracket(opened, at, lines)
    quoted = _quoted_before(text, at)
    if quoted is not None:
        return quoted
    if opened is not None and "simple key" in context:
        key_line = lines[opened.line] if opened.line < len(lines) else ""
        if re.search(r":[^\s]", key_line):
            return opened, "put a space after ':', like 'key: value'"
        return opened, "this line needs a ':' after its key, like 'key: value'"
    if "mapping values are not allowed" in problem:
        if ": " in line[: at.column].strip():
            return at, "a value that contains ': ' must be put in quotes"
        return at, _INDENT
    if "expected key" in problem or "block end" in problem or "'-' indicator" in problem:
        return at, _INDENT
    return at, _value_hint(problem, line[at.column : at.column + 1])


def _bracket(opened: Any, at: Any, lines: list[str]) -> tuple[Any, str]:
    row = lines[opened.line] if opened.line < len(lines) else ""
    char = row[opened.column : opened.column + 1]
    if char not in _BRACKETS:
        return at, _INDENT
    if at.line > opened.line:
        return opened, f"a '{char}' opened here is never closed: add the '{_BRACKETS[char]}'"
    return at, (
        f"a ',' is missing between two items here, or the '{char}' at column"
        f" {opened.column + 1} is never closed"
    )


def _quoted_before(text: str, at: Any) -> tuple[Any, str] | None:
    """A quoted value that spans lines right before the error (a quote never closed that a
    later quote ended), or text after a closing quote on the same line."""
    last = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if (token.start_mark.line, token.start_mark.column) >= (at.line, at.column):
                break
            last = token
    except yaml.YAMLError:
        pass
    if not isinstance(last, yaml.ScalarToken) or last.style not in ("'", '"'):
        return None
    start, end = last.start_mark, last.end_mark
    if end.line > start.line:
        return (
            start,
            f"a quote opened here is never closed: the value runs on to line {end.line + 1}",
        )
    if end.line == at.line:
        return at, "there is text after a closing quote: put the whole value inside the quotes"
    return None


def _value_hint(problem: str, char: str) -> str | None:
    if "cannot start any token" in problem and char:
        return f"a value that starts with '{char}' must be put in quotes"
    if "escape character" in problem:
        return "inside double quotes '\\' starts an escape: use single quotes, or write '\\\\'"
    if "undefined alias" in problem:
        return "a value that starts with '*' must be put in quotes"
    if "constructor for the tag" in problem:
        return "a value that starts with '!' must be put in quotes"
    if "another document" in problem:
        return "a policy file holds one document: remove the '---' line"
    return None


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


def _construct_timestamp(loader: _Loader, node: yaml.ScalarNode) -> Any:
    """A date-like value (`2024-13-45`) that is no real date: an error on its line, not an
    exception from `datetime`."""
    try:
        return loader.construct_yaml_timestamp(node)
    except (ValueError, OverflowError) as e:
        raise SourceError(
            loader.file,
            node.start_mark.line + 1,
            f"invalid date {node.value!r}: {e} (hint: put the value in quotes if it is no date)",
        ) from None


_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)
