"""GenEval's prompt-metadata format: validation and JSONL reading/writing.

GenEval (Ghosh et al., 2023) describes each prompt as one JSON object per line::

    {"tag": "position",
     "include": [{"class": "teddy bear", "count": 1},
                 {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"}

``include`` items carry a ``class``, a ``count`` (exactly that many for the
counting tag, whose ``exclude`` clause holds ``count + 1``), an optional
``color`` and an optional ``position`` ``[relation, group_index]`` meaning *this*
item is ``relation`` of the earlier item ``include[group_index]``. Extra
top-level keys are kept untouched; :func:`validate_record` holds the rules,
the only validator in xlard (the shapes world calls it with its own classes
and colors). Tags, colors and relation spellings come from :mod:`xlard.vocab`.

This module only handles records (plain dicts). :func:`xlard.prompts.from_geneval`
turns a record into a :class:`xlard.prompts.PromptSpec`, and
:meth:`xlard.prompts.PromptSpec.to_geneval` goes the other way.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from xlard import _io
from xlard.vocab import GENEVAL_COLORS, GENEVAL_RELATIONS, GENEVAL_TAGS

__all__ = [
    "GENEVAL_TAGS",
    "GENEVAL_COLORS",
    "GENEVAL_RELATIONS",
    "validate_record",
    "read_jsonl",
    "write_jsonl",
]

def _is_int(value: Any) -> bool:
    # bool is a subclass of int; a JSON `true` is never a valid count or index.
    return isinstance(value, int) and not isinstance(value, bool)


_ITEM_KEYS = frozenset({"class", "count", "color", "position"})


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error line, cut to ``limit`` characters (a 10,000-character value filled a screen)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = (f" ({len(value)} characters)" if isinstance(value, str) else
            f" ({len(value)} items)" if isinstance(value, (list, tuple, dict)) else "")
    return text[:limit] + "..." + size


def not_unicode(value: str) -> str | None:
    """Why ``value`` is not Unicode text (a lone surrogate: JSON ``"\\ud800"``, a non-UTF-8 byte of a command line),
    or None; such text reached the tokenizer as a traceback, or failed when a record was written, after the work."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds {value[exc.start]!r} at character {exc.start + 1}, which is not a Unicode character (a lone "
                f"surrogate: a broken \\u escape, or bytes that are not UTF-8)")
    return None


def _check_text(value: str, where: str, field: str) -> None:
    why = not_unicode(value)
    if why is not None:
        raise ValueError(f"{where}{field} {why}; got {_shown(value)}")


def _check_object_item(
    item: Any,
    where: str,
    field: str,
    include_index: int | None,
    class_set: frozenset[str] | None,
    color_set: frozenset[str] | None,
    max_count: int | None,
) -> None:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}{field} must be an object, got {type(item).__name__}")
    if include_index is None and "position" in item:
        raise ValueError(f"{where}{field} may not have a 'position' (only include items do)")
    extra = set(item) - _ITEM_KEYS
    if extra:
        # A misspelled key ("colour") would otherwise be ignored and the record judged without it.
        raise ValueError(f"{where}{field} has unknown keys {_shown(sorted(map(str, extra)), 200)}; allowed "
                         f"{sorted(_ITEM_KEYS)}")
    for key in ("class", "count"):
        if key not in item:
            raise ValueError(f"{where}{field} is missing the key {key!r}")
    cls = item["class"]
    if not isinstance(cls, str) or not cls.strip():
        raise ValueError(f"{where}{field}['class'] must be a non-empty string, got {_shown(cls)}")
    _check_text(cls, where, f"{field}['class']")
    if class_set is not None and cls not in class_set:
        raise ValueError(f"{where}{field}['class'] {_shown(cls)} is not a class of this world "
                         f"(known: {', '.join(sorted(class_set))})")
    count = item["count"]
    if not _is_int(count) or count < 1:
        raise ValueError(f"{where}{field}['count'] must be an integer >= 1, got {_shown(count)}")
    if max_count is not None and count > max_count:
        raise ValueError(f"{where}{field}['count'] {_shown(count)} exceeds the limit of {max_count} objects")
    if "color" in item:
        color = item["color"]
        if not isinstance(color, str) or not color.strip():
            raise ValueError(f"{where}{field}['color'] must be a non-empty string, got {_shown(color)}")
        _check_text(color, where, f"{field}['color']")
        if color_set is not None and color not in color_set:
            raise ValueError(f"{where}{field}['color'] {_shown(color)} is not a color of this world "
                             f"(known: {', '.join(sorted(color_set))})")
    if "position" not in item:
        return
    position = item["position"]
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        raise ValueError(f"{where}{field}['position'] must be [relation, group_index], got {_shown(position)}")
    relation, target = position
    if relation not in GENEVAL_RELATIONS:
        raise ValueError(
            f"{where}{field}['position'][0] must be one of {list(GENEVAL_RELATIONS)}, got {_shown(relation)}"
        )
    if not _is_int(target) or not 0 <= target < include_index:
        allowed = f"0..{include_index - 1}" if include_index else "none: include[0] has no earlier item"
        raise ValueError(
            f"{where}{field}['position'][1] must index an earlier include item ({allowed}), got {_shown(target)}"
        )


def validate_record(
    record: Any,
    *,
    classes: Iterable[str] | None = None,
    colors: Iterable[str] | None = None,
    max_count: int | None = None,
    index: int | None = None,
) -> Mapping[str, Any]:
    """Check that ``record`` is a well-formed GenEval metadata record.

    The one set of rules for every record xlard reads or writes (the shapes
    world passes its own ``classes`` and ``colors``):

    - Required keys: ``tag`` (one of :data:`GENEVAL_TAGS`), ``prompt``
      (non-empty string), ``include`` (non-empty list of object items).
      Optional: ``exclude`` (list of object items). Other top-level keys are
      allowed and kept untouched.
    - Object items have ``class`` (non-empty string) and ``count`` (integer
      >= 1: "exactly/at least count", and for ``exclude`` "fail at count or
      more"; GenEval has no count 0), optionally ``color`` (non-empty
      string); include items may have ``position`` ``[relation, group_index]``
      with relation one of :data:`GENEVAL_RELATIONS` as GenEval spells it and
      group_index an *earlier* include item (GenEval's evaluator judges
      groups in order, so the target must already be matched). No other
      item keys: a misspelled one would be silently ignored.

    Args:
        record: the parsed JSON object of one line.
        classes: when given, the only class names allowed (the shapes world's).
        colors: when given, the only color names allowed (the world's palette).
        max_count: when given, the largest ``count`` allowed.
        index: the record's position in its file; errors then start with
            ``"record <index>: "``.

    Returns:
        The same record (for chaining).

    Raises:
        ValueError: naming the record, the first key that is missing or
            malformed, what was expected and what came.

    Example:
        >>> validate_record({"tag": "single_object", "prompt": "a photo of a cat",
        ...                  "include": [{"class": "cat", "count": 1}]})["tag"]
        'single_object'
    """
    where = "" if index is None else f"record {index}: "
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}a GenEval record must be a JSON object, got {type(record).__name__}")
    for key in ("tag", "include", "prompt"):
        if key not in record:
            raise ValueError(f"{where}GenEval record is missing the key {key!r} (has "
                             f"{_shown(sorted(map(str, record)), 200)})")
    tag = record["tag"]
    if not isinstance(tag, str) or tag not in GENEVAL_TAGS:
        raise ValueError(f"{where}'tag' must be one of {list(GENEVAL_TAGS)}, got {_shown(tag)}")
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}'prompt' must be a non-empty string, got {_shown(prompt)}")
    _check_text(prompt, where, "'prompt'")
    if max_count is not None and (not _is_int(max_count) or max_count < 1):
        raise ValueError(f"max_count must be None or an integer >= 1, got {max_count!r}")
    for label, names in (("classes", classes), ("colors", colors)):  # a string was split into its letters
        if names is not None and (isinstance(names, (str, bytes)) or not isinstance(names, Iterable)):
            raise ValueError(f"validate_record: {label} must be None or a collection of names, got {names!r}")
    class_set = None if classes is None else frozenset(classes)
    color_set = None if colors is None else frozenset(colors)
    include = record["include"]
    if not isinstance(include, (list, tuple)) or not include:
        raise ValueError(f"{where}'include' must be a non-empty list, got {_shown(include)}")
    for i, item in enumerate(include):
        _check_object_item(item, where, f"include[{i}]", i, class_set, color_set, max_count)
    exclude = record.get("exclude", [])
    if not isinstance(exclude, (list, tuple)):
        raise ValueError(f"{where}'exclude' must be a list, got {_shown(exclude)}")
    for i, item in enumerate(exclude):  # "exactly n" is "fewer than n + 1": an exclude may name max_count + 1
        _check_object_item(item, where, f"exclude[{i}]", None, class_set, color_set,
                           None if max_count is None else max_count + 1)
    return record


def read_jsonl(path: str | os.PathLike[str], *, validate: bool = True, line_numbers: list[int] | None = None
               ) -> list[dict[str, Any]]:
    """Read a GenEval metadata file: one JSON object per line.

    Blank lines are skipped. Line numbers in errors are 1-based.

    Args:
        path: the ``.jsonl`` file.
        validate: check each record with :func:`validate_record`.

    Returns:
        The records, in file order, as dicts.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``"<path>:<line>: ..."`` for a line that is not JSON or a
            record that fails validation.

    Example:
        >>> records = read_jsonl("evaluation_metadata.jsonl")  # doctest: +SKIP
        >>> records[0]["prompt"]                                # doctest: +SKIP
        'a photo of a bench'
    """
    if not isinstance(validate, bool):  # 'no' is truthy
        raise ValueError(f"read_jsonl: validate must be a bool, got {validate!r}")
    path = Path(path)
    if path.is_dir():  # was a bare "[Errno 21] Is a directory"
        raise IsADirectoryError(f"read_jsonl: {path} is a folder; give the .jsonl file (e.g. "
                                f"evaluation_metadata.jsonl)")
    records: list[dict[str, Any]] = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM (Windows editors) is fine
            except UnicodeDecodeError as exc:  # a binary or wrongly encoded file: name the file and the line
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}); a GenEval metadata file is UTF-8 JSON, one record per "
                                 "line") from None
            if not line.strip():
                continue
            try:  # without its line break (an error at the end was "column 1" of the next line); NaN and
                # Infinity are not JSON: every file xlard wrote with such a record was invalid JSON
                record = json.loads(line.rstrip("\r\n"), parse_constant=_refuse_constant,
                                    object_pairs_hook=_no_repeated_keys)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            except (ValueError, RecursionError) as exc:  # a number of 5000 digits, arrays nested 100000 deep
                raise ValueError(f"{path}:{lineno}: invalid JSON ({' '.join(str(exc).split())[:200]})") from None
            if validate:
                try:
                    validate_record(record)
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno}: {exc}") from None
            records.append(record)
            if line_numbers is not None:  # the file's line of each record, as the reader counts them
                line_numbers.append(lineno)
    return records


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (a number must be finite; write null)")


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Reading: ``{"count": 1, "count": 3}`` was read as 3 without a word (the writer and the training config
    refuse such objects too)."""
    return _io.pairs_once(pairs, "the key {key} is given twice in one object; keep one")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Writing: ``{1: "a", "1": "b"}`` is dumped as two ``"1"`` keys, and reading it back kept only the last."""
    return _io.pairs_once(pairs, "two keys are written as {key} (JSON keys are strings: 1 and '1' are one key)")


def write_jsonl(
    path: str | os.PathLike[str],
    records: Iterable[Mapping[str, Any]],
    *,
    validate: bool = True,
) -> Path:
    """Write records as JSONL, atomically.

    The records go to a temporary file in the destination folder, which then
    replaces ``path`` with :func:`os.replace`: readers see the old file or the
    complete new one, never a partial write. Nothing is written when a record
    is invalid.

    Args:
        path: the destination ``.jsonl`` file (its folder must exist).
        records: GenEval records (dicts); any JSON-serializable extra keys kept.
        validate: check each record with :func:`validate_record` first.

    Returns:
        The destination path.

    Raises:
        ValueError: ``"record <i>: ..."`` for an invalid or non-serializable record.
        FileNotFoundError: the destination folder does not exist.
        IsADirectoryError, ValueError: ``path`` is a folder, a FIFO or a device
            (only a regular file or a new path is replaced; see :mod:`xlard._io`).

    Example:
        >>> write_jsonl("prompts.jsonl", [{"tag": "single_object",  # doctest: +SKIP
        ...     "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}])
    """
    if not isinstance(validate, bool):
        raise ValueError(f"write_jsonl: validate must be a bool, got {validate!r}")
    path = Path(path)
    lines: list[str] = []
    for i, record in enumerate(records):
        if validate:
            try:
                validate_record(record)
            except ValueError as exc:
                raise ValueError(f"record {i}: {exc}") from None
        try:
            line = json.dumps(dict(record), ensure_ascii=False, allow_nan=False)  # NaN: invalid JSON
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (a file name of non-UTF-8 bytes): escaped as \\udcff
                line = json.dumps(dict(record), allow_nan=False)
            json.loads(line, object_pairs_hook=_unique_keys)  # keys JSON writes as one string: one would be lost
            lines.append(line)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"record {i}: not JSON-serializable ({exc})") from None
        except RecursionError:
            raise ValueError(f"record {i}: not JSON-serializable (nested too deeply)") from None
    _io.atomic_write_text(path, "".join(line + "\n" for line in lines), owner="xlard.geneval.write_jsonl")
    return path
