"""Reading rows from the places users keep data: local files, built-in sets, Hugging Face datasets.

Every row comes with a *location* string (``file.jsonl:12`` for a line, ``file.parquet row 12`` or
``name[train] row 12`` for a row; lines and rows are both numbered from 1) so that any later error can name
exactly where the bad input is.

JSON and JSON Lines files (optionally gzip-compressed) are parsed here line by line, which is what lets a
malformed line be reported by number; Parquet and CSV files, saved datasets and hub datasets are loaded
with the ``datasets`` library.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from itertools import islice
from importlib import resources
from pathlib import Path

from alignlab.errors import DataError, UserError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``path + ".partial"`` and a rename, so a crash leaves the
    old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

BUILTIN_PREFIX = "builtin:"


def builtin_datasets() -> list[str]:
    """Names of the data sets shipped inside the package (usable as ``builtin:NAME``)."""
    folder = resources.files("alignlab.data") / "builtin"
    return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))


def builtin_path(name: str) -> Path:
    """Path of the built-in data set ``name``.

    Raises:
        UserError: if there is no such built-in set.
    """
    path = Path(str(resources.files("alignlab.data") / "builtin" / f"{name}.jsonl"))
    if not path.is_file():
        raise UserError(f"--dataset_name: no built-in dataset {name!r}; available: {', '.join(builtin_datasets())}")
    return path


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json_file(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a ``.jsonl``/``.json`` file (gzip allowed), each with its ``file:line`` location."""
    name = str(path)
    is_lines = ".jsonl" in path.name
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{name}: cannot read: {exc}") from exc
    if not is_lines:
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}:{exc.lineno}: malformed JSON: {exc.msg}") from exc
            for i, row in enumerate(rows, start=1):
                if not isinstance(row, dict):
                    raise DataError(f"{name} row {i}: expected a JSON object, got {type(row).__name__}")
                yield f"{name} row {i}", row
            return
        # A .json file that is not a list is read as JSON Lines (as `datasets` does).
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{name}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield f"{name}:{lineno}", row


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".arrow")
"""Files read as data: by this module (JSON and JSON Lines) or through ``datasets``."""


def _innermost(exc: BaseException) -> BaseException:
    """The first cause of ``exc`` (``datasets`` wraps the real error in a generic one)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_folder(path: Path, spec: str) -> None:
    """A folder given as data that is neither a saved dataset nor a folder of data files is a one-line error."""
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        return
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        raise UserError(f"--dataset_name: {spec} is a model folder, not a dataset")
    if not any(p.name.endswith(DATA_SUFFIXES) for p in path.rglob("*") if p.is_file()):
        raise UserError(f"--dataset_name: {spec} is a folder with neither a saved dataset (dataset_info.json) nor "
                        f"data files ({', '.join(DATA_SUFFIXES)})")


def _read_with_datasets(spec: str, *, config_name: str | None, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    path = Path(spec)
    if path.is_dir():
        _check_folder(path, spec)
    if path.suffix == ".csv" and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as handle:
            if sum(1 for line in islice(handle, 2) if line.strip()) < 2:  # no line, or the header alone
                return
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.is_file():
            builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix)
            if builder is None:
                raise UserError(f"--dataset_name: unsupported file type {path.suffix!r} ({spec})")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(spec, config_name, split=split)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one line, not a traceback
        what = "the folder" if path.is_dir() else "the file" if path.is_file() else ""
        detail = _first_line(_innermost(exc))
        if path.is_dir() and detail.startswith("Couldn't cast"):
            detail = "its data files do not share one set of columns"
        raise UserError(f"--dataset_name: cannot load {what + ' ' if what else ''}{spec!r}: {detail}") from exc
    label = spec if path.exists() else f"{spec}[{split}]"
    for i, row in enumerate(ds, start=1):
        yield f"{label} row {i}", row


def read_rows(spec: str, *, config_name: str | None = None, split: str = "train") -> list[tuple[str, dict]]:
    """Read every row of a data set with its location.

    Args:
        spec: ``builtin:NAME``; a local ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet`` or
            ``.csv`` file; a directory written by ``Dataset.save_to_disk``; or a Hugging Face dataset id.
        config_name: dataset configuration, for hub datasets.
        split: split to read, for hub datasets and saved ``DatasetDict`` directories.

    Returns:
        ``[(location, row), ...]`` where ``location`` is ``file:line`` or ``source row i`` (both from 1).

    Raises:
        DataError: a file is unreadable, a line is malformed (the message names file and line), or there are no
            rows (an empty file, blank lines only).
        UserError: the data set cannot be found or loaded; ``file:weight`` whose weight is not a number.
    """
    from alignlab.train.inputs import given_rows

    given = given_rows(spec)  # a data set object given to a trainer in Python
    if given is not None:
        return given
    if spec.startswith(BUILTIN_PREFIX):
        path = builtin_path(spec[len(BUILTIN_PREFIX) :])
        return [(f"{spec}:{loc.rsplit(':', 1)[1]}", row) for loc, row in _read_json_file(path)]
    path = Path(os.path.expanduser(spec))
    name = path.name
    head, sep, tail = spec.rpartition(":")
    if sep and head and not path.exists() and (head.endswith(DATA_SUFFIXES) or Path(os.path.expanduser(head)).exists()):
        raise UserError(f"--dataset_name {spec}: {tail!r} after ':' is not a weight (a positive number, as in "
                        f"{head}:0.5)")
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        if not path.is_file():
            raise UserError(f"--dataset_name: file not found: {spec}")
        rows = list(_read_json_file(path))
    else:
        looks_local = spec.startswith((".", "/", "~")) or path.suffix in (".parquet", ".csv", ".arrow")
        if looks_local and not path.exists():
            raise UserError(f"--dataset_name: file not found: {spec}")
        rows = list(_read_with_datasets(str(path) if path.exists() else spec, config_name=config_name, split=split))
    if not rows:
        what = "the file is empty, or holds only blank lines or a header" if path.is_file() else f"split {split!r} is empty"
        raise DataError(f"{spec}: no rows ({what})")
    return rows
