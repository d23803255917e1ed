"""Reading rows from the places users keep data: local files, built-in sets, Hugging Face datasets.

Every row comes with a *location* string (``file.jsonl:12`` for a line, ``file.parquet row 12`` or
``name[train] row 12`` for a row) so that any later error can name exactly where the bad input is.

JSON and JSON Lines files (optionally gzip-compressed) are parsed here line by line, which is what lets a
malformed line be reported by number; Parquet and CSV files, saved datasets and hub datasets are loaded
with the ``datasets`` library.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
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
            for i, row in enumerate(rows):
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


def _read_with_datasets(spec: str, *, config_name: str | None, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    path = Path(spec)
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--dataset_name: cannot load {spec!r}: {first}") from exc
    label = spec if path.exists() else f"{spec}[{split}]"
    for i, row in enumerate(ds):
        yield f"{label} row {i}", row


def read_rows(spec: str, *, config_name: str | None = None, split: str = "train") -> list[tuple[str, dict]]:
    """Read every row of a data set with its location.

    Args:
        spec: ``builtin:NAME``; a local ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet`` or
            ``.csv`` file; a directory written by ``Dataset.save_to_disk``; or a Hugging Face dataset id.
        config_name: dataset configuration, for hub datasets.
        split: split to read, for hub datasets and saved ``DatasetDict`` directories.

    Returns:
        ``[(location, row), ...]`` where ``location`` is ``file:line`` or ``source row i``.

    Raises:
        DataError: a file is unreadable or a line is malformed (the message names file and line).
        UserError: the data set cannot be found or loaded.
    """
    if spec.startswith(BUILTIN_PREFIX):
        path = builtin_path(spec[len(BUILTIN_PREFIX) :])
        return [(f"{spec}:{loc.rsplit(':', 1)[1]}", row) for loc, row in _read_json_file(path)]
    path = Path(os.path.expanduser(spec))
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        if not path.is_file():
            raise UserError(f"--dataset_name: file not found: {spec}")
        return list(_read_json_file(path))
    looks_local = spec.startswith((".", "/", "~")) or path.suffix in (".parquet", ".csv", ".arrow")
    if looks_local and not path.exists():
        raise UserError(f"--dataset_name: file not found: {spec}")
    return list(_read_with_datasets(str(path) if path.exists() else spec, config_name=config_name, split=split))
