"""GenEval's prompt-metadata format: validation and JSONL reading/writing.

GenEval (Ghosh et al., 2023) describes each prompt as one JSON object per line::

    {"tag": "position",
     "include": [{"class": "teddy bear", "count": 1},
                 {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"}

``include`` items carry a ``class``, a ``count`` (exactly that many for the
counting tag, whose ``exclude`` clause holds ``count + 1``), an optional
``color`` and an optional ``position`` ``[relation, group_index]`` meaning *this*
item is ``relation`` of ``include[group_index]``. Extra keys are kept untouched.

This module only handles records (plain dicts). :func:`xlard.prompts.from_geneval`
turns a record into a :class:`xlard.prompts.PromptSpec`, and
:meth:`xlard.prompts.PromptSpec.to_geneval` goes the other way.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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


def _check_object_item(item: Any, where: str, n_include: int | None, own_index: int | None) -> None:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be an object, got {type(item).__name__}")
    if "class" not in item:
        raise ValueError(f"{where} is missing the key 'class'")
    cls = item["class"]
    if not isinstance(cls, str) or not cls.strip():
        raise ValueError(f"{where}['class'] must be a non-empty string, got {cls!r}")
    if "count" not in item:
        raise ValueError(f"{where} is missing the key 'count'")
    count = item["count"]
    if not _is_int(count) or count < 0:
        raise ValueError(f"{where}['count'] must be an integer >= 0, got {count!r}")
    if "color" in item and item["color"] is not None:
        color = item["color"]
        if not isinstance(color, str) or not color.strip():
            raise ValueError(f"{where}['color'] must be a non-empty string, got {color!r}")
    if n_include is None or "position" not in item or item["position"] is None:
        return
    position = item["position"]
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        raise ValueError(
            f"{where}['position'] must be [relation, group_index], got {position!r}"
        )
    relation, target = position
    if not isinstance(relation, str) or relation.strip().lower().replace("_", " ") not in GENEVAL_RELATIONS:
        raise ValueError(
            f"{where}['position'][0] must be one of {list(GENEVAL_RELATIONS)}, got {relation!r}"
        )
    if not _is_int(target) or not 0 <= target < n_include:
        raise ValueError(
            f"{where}['position'][1] must be an index into 'include' (0..{n_include - 1}), "
            f"got {target!r}"
        )
    if target == own_index:
        raise ValueError(f"{where}['position'] relates the object to itself (index {target})")


def validate_record(record: Any) -> None:
    """Check that ``record`` is a well-formed GenEval metadata record.

    Required: ``tag`` (one of :data:`GENEVAL_TAGS`), ``prompt`` (non-empty
    string), ``include`` (non-empty list of object items). Optional:
    ``exclude`` (list of object items, ``position`` not allowed there). Object
    items need ``class`` (non-empty string) and ``count`` (integer >= 0); they
    may have ``color`` (string) and, in ``include``, ``position``
    ``[relation, group_index]`` with relation in :data:`GENEVAL_RELATIONS`
    and group_index a valid index other than the item's own. Other keys are
    allowed and ignored.

    Args:
        record: the parsed JSON object of one line.

    Returns:
        None.

    Raises:
        ValueError: naming the first key that is missing or malformed.

    Example:
        >>> validate_record({"tag": "single_object", "prompt": "a photo of a cat",
        ...                  "include": [{"class": "cat", "count": 1}]})
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"a GenEval record must be a JSON object, got {type(record).__name__}")
    for key in ("tag", "include", "prompt"):
        if key not in record:
            raise ValueError(f"GenEval record is missing the key {key!r}")
    tag = record["tag"]
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"'tag' must be one of {list(GENEVAL_TAGS)}, got {tag!r}")
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r}")
    include = record["include"]
    if not isinstance(include, list) or not include:
        raise ValueError(f"'include' must be a non-empty list, got {include!r}")
    for i, item in enumerate(include):
        _check_object_item(item, f"include[{i}]", len(include), i)
    exclude = record.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"'exclude' must be a list, got {exclude!r}")
    for i, item in enumerate(exclude):
        _check_object_item(item, f"exclude[{i}]", None, None)
        if isinstance(item, Mapping) and item.get("position") is not None:
            raise ValueError(f"exclude[{i}] may not have a 'position'")


def read_jsonl(path: str | os.PathLike[str], *, validate: bool = True) -> list[dict[str, Any]]:
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
    path = Path(path)
    records: list[dict[str, Any]] = []
    with path.open("r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if validate:
                try:
                    validate_record(record)
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno}: {exc}") from None
            records.append(record)
    return records


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

    Example:
        >>> write_jsonl("prompts.jsonl", [{"tag": "single_object",  # doctest: +SKIP
        ...     "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}])
    """
    path = Path(path)
    lines: list[str] = []
    for i, record in enumerate(records):
        if validate:
            try:
                validate_record(record)
            except ValueError as exc:
                raise ValueError(f"record {i}: {exc}") from None
        try:
            lines.append(json.dumps(dict(record), ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"record {i}: not JSON-serializable ({exc})") from None
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line)
                handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path
