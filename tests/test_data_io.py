"""Reading data: file formats, built-in sets, and one-line errors that name file and line."""

import gzip
import json

import pytest

from alignlab.data.io import builtin_datasets, read_rows
from alignlab.errors import DataError, UserError


def test_jsonl_and_gz_and_json_list(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as h:
        h.write("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "x.json").write_text(json.dumps(rows))
    for name in ("x.jsonl", "x.jsonl.gz", "x.json"):
        got = read_rows(str(tmp_path / name))
        assert [r for _, r in got] == rows
    assert read_rows(str(tmp_path / "x.jsonl"))[1][0].endswith("x.jsonl:2")


def test_parquet_through_datasets(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"a": 1}, {"a": 2}]).to_parquet(str(tmp_path / "x.parquet"))
    got = read_rows(str(tmp_path / "x.parquet"))
    assert [r["a"] for _, r in got] == [1, 2]
    assert got[1][0].endswith("x.parquet row 2")  # rows are numbered from 1, as lines are


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2,,}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_rows(str(path))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_rows(str(path))


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="no built-in dataset 'nope'"):
        read_rows("builtin:nope")


def test_builtin_concise_set():
    assert "concise" in builtin_datasets()
    rows = read_rows("builtin:concise")
    assert len(rows) >= 200
    loc, row = rows[0]
    assert loc == "builtin:concise:1"
    assert set(row) == {"prompt", "chosen", "rejected"}
    assert all(r["chosen"] != r["rejected"] for _, r in rows)
