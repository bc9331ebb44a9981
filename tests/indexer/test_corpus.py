from __future__ import annotations

from pathlib import Path

import pytest

from indexer.corpus import read_jsonl
from models.errors import InvalidInput
from tests.conftest import write_corpus


def test_reads_items_with_metadata_and_int_ids(tmp_path: Path) -> None:
    path = write_corpus(
        tmp_path / "c.jsonl", [{"id": 7, "text": "seven", "metadata": {"n": 7}}, {"id": "b", "text": "bee"}]
    )
    items = read_jsonl(path)
    assert [(i.id, i.text, i.metadata) for i in items] == [("7", "seven", {"n": 7}), ("b", "bee", {})]
    assert items[0].source == "c.jsonl:1"


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n\n   \n{"id": 2, "text": "b"}\n')
    assert [i.id for i in read_jsonl(path)] == ["1", "2"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 1, "text": "a"', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"text": "no id"}', "`id`"),
        ('{"id": true, "text": "bool id"}', "`id`"),
        ('{"id": 1, "text": "   "}', "`text`"),
        ('{"id": 1, "text": 5}', "`text`"),
        ('{"id": 1, "text": "a", "metadata": [1]}', "`metadata`"),
        ('{"id": 1, "text": "a", "txet": "typo"}', "unknown field"),
    ],
)
def test_bad_lines_are_reported_with_their_line_number(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "ok", "text": "fine"}\n' + line + "\n")
    with pytest.raises(InvalidInput, match=message) as err:
        read_jsonl(path)
    assert "c.jsonl:2" in err.value.message


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(InvalidInput, match="duplicate id 'a' \\(first on line 1\\)"):
        read_jsonl(path)


def test_many_errors_are_summarised(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("nope\n" * 12)
    with pytest.raises(InvalidInput, match="12 bad line\\(s\\).*and 7 more"):
        read_jsonl(path)


def test_missing_or_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        read_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidInput, match="no items"):
        read_jsonl(tmp_path / "empty.jsonl")
