"""Reading URL lists: every line of a CSV ends as a row or the file is refused in one line naming the line; any
valid CSV reads, however long its fields; the download plan holds one input shard at a time, not the list."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from curation.config import ConfigError
from curation.data.urllists import read_url_lists

REPO = Path(__file__).resolve().parents[2]


def _refusal(path, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        read_url_lists([path], **kw)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_an_unterminated_quote_refuses_the_file_naming_its_line(tmp_path):
    # the quote opened on line 3 would swallow line 4 (another URL) into a caption: no URL may vanish that way
    path = tmp_path / "u.csv"
    path.write_text('url,caption\nhttp://h/img1.jpg,a\nhttp://h/img2.jpg,"unterminated\nhttp://h/img3.jpg,x\n')
    message = _refusal(path)
    assert "line 3" in message and "quote" in message, message


def test_text_after_a_closing_quote_refuses_the_file_naming_its_line(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text('url,caption\nhttp://h/1.jpg,"a"b\nhttp://h/2.jpg,x\n')
    assert "line 2" in _refusal(path)


def test_a_quoted_caption_spanning_lines_is_one_row(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text('url,caption\nhttp://h/1.jpg,"two\nlines"\nhttp://h/2.jpg,x\n')
    t = read_url_lists([path])
    assert t["url"].to_pylist() == ["http://h/1.jpg", "http://h/2.jpg"]
    assert t["caption"].to_pylist() == ["two\nlines", "x"]


def test_a_ten_megabyte_caption_reads(tmp_path):
    caption = "x" * (10 << 20)
    path = tmp_path / "u.csv"
    path.write_text(f"url,caption\nhttp://h/1.jpg,{caption}\nhttp://h/2.jpg,\"{caption}\"\nhttp://h/3.jpg,short\n")
    t = read_url_lists([path])
    assert t["url"].to_pylist() == ["http://h/1.jpg", "http://h/2.jpg", "http://h/3.jpg"]
    assert [len(c) for c in t["caption"].to_pylist()] == [len(caption), len(caption), 5]


def test_a_field_beyond_the_limit_is_one_line(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("url,caption\nhttp://h/1.jpg,ok\nhttp://h/2.jpg," + "y" * 5000 + "\n")
    message = _refusal(path, max_field_chars=1000)
    assert "line 3" in message and "1000" in message, message


def test_a_semicolon_separated_csv_gets_a_hint_about_the_delimiter(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("url;caption\nhttp://h/1.jpg;a\n")
    message = _refusal(path)
    assert "no column 'url'" in message and "';'" in message and "delimiter" in message, message


def test_a_tab_separated_file_named_csv_gets_a_hint(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("url\tcaption\nhttp://h/1.jpg\ta\n")
    assert ".tsv" in _refusal(path)


def test_batches_number_rows_across_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.data.urllists import iter_url_batches

    (tmp_path / "a.csv").write_text("url\n" + "".join(f"http://h/{i}.jpg\n" for i in range(7)))
    pq.write_table(pa.table({"url": [f"http://h/p{i}.jpg" for i in range(5)]}), tmp_path / "b.parquet")
    batches = list(iter_url_batches([tmp_path], batch_rows=3))
    assert max(b.num_rows for b in batches) <= 3
    assert [r for b in batches for r in b["row_id"].to_pylist()] == list(range(12))
    assert [u for b in batches for u in b["url"].to_pylist()][6:8] == ["http://h/6.jpg", "http://h/p0.jpg"]


def _plan_peak_mb(tmp_path, rows: int) -> dict:
    return json.loads(subprocess.run(
        [sys.executable, str(REPO / "bench" / "urllist_plan_memory.py"), "--rows", str(rows), "--shard-size", "5000"],
        check=True, capture_output=True, text=True, cwd=tmp_path, timeout=600).stdout.strip().splitlines()[-1])


def test_planning_a_url_list_streams(tmp_path):
    """The plan's peak memory (VmHWM of a fresh process) must not grow with the list.  Holding the list in memory
    costs about 600 bytes per row (the Arrow table, then Python lists of URLs and captions, a dict of every URL:
    663 MB at a million rows); streaming costs 16 bytes per row (an 8-byte hash of each URL for the repeat check,
    and its sorted copy) beside one batch and one shard.  Between 40,000 and 240,000 rows, the first grows by
    about 120 MB, the second by about 3 MB: the bound of 40 MB sits far from both."""
    small, big = _plan_peak_mb(tmp_path, 40_000), _plan_peak_mb(tmp_path, 240_000)
    assert big["units"] == 48 and small["units"] == 8
    assert big["peak_mb"] - small["peak_mb"] < 40, (small, big)
