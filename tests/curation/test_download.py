"""download over the served demo corpus: every bad input ends as one drop row with its specific reason."""

import io
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.pipeline import accounting
from curation.data.samples import iter_shard_samples
from schemas import validate
from tests.curation.loopback import Handler, serve


def _drops(root):
    return {r["key"]: r for r in pq.read_table(root / "stats" / "drops.parquet").to_pylist()}


def test_every_url_is_accounted_for(demo_download):
    root, truth = demo_download["root"], demo_download["truth"]
    ledger = accounting.read_ledger(root, "download")
    assert ledger.num_rows == truth.num_rows  # one verdict per input URL row
    assert sorted(ledger["key"].to_pylist()) == [f"{i:010d}" for i in range(truth.num_rows)]
    funnel = pq.read_table(root / "stats" / "funnel.parquet").to_pylist()
    row = [r for r in funnel if r["stage"] == "download"][0]
    n_tar = sum(1 for t in sorted((root / "download").glob("*.tar")) for _ in iter_shard_samples(t))
    assert row["rows_in"] == truth.num_rows == n_tar + row["dropped"]
    assert row["kept"] == n_tar
    accounting.check_invariants(root)


def test_bad_inputs_get_their_specific_reason(demo_download):
    root, truth = demo_download["root"], demo_download["truth"].to_pylist()
    drops = _drops(root)
    expected_download = [t for t in truth if t["expected_stage"] == "download"]
    assert len(expected_download) >= 15
    wrong = []
    for t in expected_download:
        key = f"{t['row_id']:010d}"
        got = drops.get(key)
        if got is None or got["stage"] != "download" or got["reason"] != t["expected_reason"]:
            wrong.append((key, t["url"], t["expected_reason"], got and got["reason"], got and got["detail"]))
    assert not wrong, wrong
    # and nothing else was dropped at download
    expected_keys = {f"{t['row_id']:010d}" for t in expected_download}
    extra = {k: (d["reason"], d["detail"]) for k, d in drops.items() if d["stage"] == "download" and k not in expected_keys}
    assert not extra, extra
    reasons = Counter(drops[f"{t['row_id']:010d}"]["reason"] for t in expected_download)
    for reason in ("http_error", "timeout", "undecodable", "truncated", "empty", "decompression_bomb", "animated",
                   "private_address", "opted_out", "blocked_domain", "bad_url", "duplicate_url"):
        assert reasons[reason] >= 1, f"no planted {reason} input"


def test_redirects_to_private_addresses_are_refused(demo_download):
    root, truth = demo_download["root"], demo_download["truth"].to_pylist()
    drops = _drops(root)
    redirects = [t for t in truth if t["path"] and t["path"].startswith("/redirect/")]
    assert redirects
    for t in redirects:
        d = drops[f"{t['row_id']:010d}"]
        assert d["reason"] == "private_address"
        assert "169.254.169.254" in d["detail"] or "10.0.0.7" in d["detail"], d


def test_kept_images_are_rgb_jpegs_within_max_side(demo_download):
    root, truth = demo_download["root"], demo_download["truth"].to_pylist()
    special = {f"{t['row_id']:010d}" for t in truth if t["role"] == "special_kept"}
    assert len(special) >= 3
    seen = set()
    for tar in sorted((root / "download").glob("*.tar")):
        for s in iter_shard_samples(tar):
            im = Image.open(io.BytesIO(s.data))
            assert im.format == "JPEG" and im.mode == "RGB"
            assert max(im.size) <= 256
            assert s.meta["sha256"] and s.meta["url"]
            seen.add(s.key)
    assert special <= seen  # CMYK, 16-bit and alpha images are converted and kept


def test_status_tables_match_their_schema(demo_download):
    root = demo_download["root"]
    n = 0
    for p in sorted((root / "download").glob("*.parquet")):
        t = pq.read_table(p)
        validate(t, "download_status")
        n += t.num_rows
    validate(pq.read_table(root / "stats" / "drops.parquet"), "drops")
    validate(pq.read_table(root / "stats" / "funnel.parquet"), "funnel")
    precheck = accounting.read_ledger(root, "download").filter(
        accounting.read_ledger(root, "download")["detail"].is_valid())
    assert n > 0 and precheck.num_rows > 0


# -- what the download decoder makes of hostile and rotated images --------------------------
def _jpeg(arr, **save) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype="uint8")).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def test_precheck_verdicts_in_memory():
    """The verdict on each URL row before any fetch: refusals name the policy's reason, a repeat names the first
    row's key, and a repeat of a refused URL keeps its own refusal."""
    from curation.stages.download import precheck
    from curation.rules.urlsafety import UrlPolicy

    rows = [(7, "http://8.8.8.8/a.jpg", None), (8, "http://ads.blocked.example/x.jpg", None),
            (9, "http://10.0.0.1/a.jpg", None), (10, "http://8.8.8.8/a.jpg", None),
            (11, None, "url is not UTF-8 text"), (12, "http://10.0.0.1/a.jpg", None), (13, "ftp://8.8.8.8/b", None),
            (14, "http://8.8.4.4/b.jpg", None)]
    got = precheck(*map(list, zip(*rows)), UrlPolicy(blocklist_domains=["blocked.example"]))
    assert [reason for reason, _ in got] == [None, "blocked_domain", "private_address", "duplicate_url", "bad_url",
                                             "private_address", "bad_url", None]
    assert got[0] == got[-1] == (None, None)
    assert got[3] == ("duplicate_url", "same URL as key 0000000007")
    assert got[4] == ("bad_url", "url is not UTF-8 text")
    assert "10.0.0.1" in got[2][1] and "download.allow_networks" in got[2][1]


def _normalize(data, **dl):
    from curation.config import DownloadConfig, ImagesConfig
    from curation.stages.download import ImageNormalizer, reason_from_error

    jpeg, w, h, ow, oh, err = ImageNormalizer(DownloadConfig(**dl), ImagesConfig(max_side=256))(io.BytesIO(data))
    return (reason_from_error(err)[0], None) if err else (None, (Image.open(io.BytesIO(jpeg)), (w, h), (ow, oh)))


def test_jpeg_claiming_a_huge_size_with_a_tiny_scan_is_truncated():
    import numpy as np

    rng = np.random.default_rng(0)
    data = bytearray(_jpeg(rng.integers(0, 256, (16, 16, 3))))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (9000).to_bytes(2, "big") * 2  # the header now claims 9000x9000; the scan fills 16x16
    assert len(data) < 1000
    reason, _ = _normalize(bytes(data))
    assert reason == "truncated"
    data[sof + 5:sof + 9] = (16).to_bytes(2, "big") + (9000).to_bytes(2, "big")  # 9000 wide, 16 high: one MCU row
    assert _normalize(bytes(data))[0] == "truncated"
    # a genuine photo-like image with a uniform (but not padding-grey) lower half is kept
    arr = rng.integers(0, 256, (300, 200, 3))
    arr[100:] = (40, 90, 200)
    reason, kept = _normalize(_jpeg(arr))
    assert reason is None and kept[2] == (200, 300)
    arr[:, 180:] = 128  # a mid-grey right border, ending at the bottom-right corner like padding, but 10% of it
    assert _normalize(_jpeg(arr))[0] is None


def test_exif_orientation_is_applied_once_at_download():
    import numpy as np

    arr = np.zeros((40, 100, 3), dtype="uint8")  # stored landscape 100x40, left half red, right half blue
    arr[:, :50] = (255, 0, 0)
    arr[:, 50:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the photo is portrait 40x100, red on top
    reason, kept = _normalize(_jpeg(arr, exif=exif.tobytes()))
    assert reason is None
    im, size, original = kept
    assert im.size == size == (40, 100) and original == (40, 100)
    top, bottom = np.asarray(im)[5].mean(0), np.asarray(im)[-5].mean(0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)
    assert im.getexif().get(0x0112) is None  # stored without the tag: no later stage rotates it again


# -- URL lists ------------------------------------------------------------------------------


class _OneImage(Handler):
    def do_GET(self):  # noqa: N802
        import numpy as np

        if self.path.startswith("/big"):  # 3 MiB without a Content-Length
            self.send_response(200)
            self.end_headers()
            self.send_repeated(b"\0" * (1 << 20), 3)
            return
        if self.path.startswith("/dribble"):  # 30 bytes at 0.1 s each: every read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", "30")
            self.end_headers()
            self.send_repeated(b"x", 30, delay=0.1)
            return
        self.reply(200, _jpeg(np.full((64, 80, 3), (200, 30, 30))), {"Content-Type": "image/jpeg"})


@pytest.fixture(scope="module")
def image_server():
    with serve(_OneImage) as (base, _):
        yield base


def _run_download(tmp_path, url_list, **download):
    from curation.config import load_config
    from curation.pipeline.runner import run_pipeline

    cfg = {"run_root": str(tmp_path / "run"), "input": {"url_list": [str(p) for p in url_list]},
           "ray": {"local": True}, "stages": ["download"],
           "images": {"max_side": 64},
           "download": {"shard_size": 4, "threads": 2, "timeout_s": 5.0,
                        "allow_networks": ["127.0.0.1/32"], **download}}
    run_pipeline(load_config(data=cfg), progress=False)
    return tmp_path / "run"


def test_undecodable_urls_drop_only_their_rows(tmp_path, image_server):
    import pyarrow as pa

    csv = tmp_path / "a.csv"
    csv.write_bytes(f"url,caption\n{image_server}/0.jpg,zero\n{image_server}/\xff1.jpg,one\n"
                    f"{image_server}/2.jpg,caf\xe9\n".encode("latin-1"))
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"url": pa.array([f"{image_server}/3.jpg".encode(), b"http://x/\xfe\xff",
                                              f"{image_server}/5.jpg".encode()], pa.binary())}), parquet)
    root = _run_download(tmp_path, [csv, parquet])
    ledger = {r["key"]: r for r in accounting.read_ledger(root, "download").to_pylist()}
    assert sorted(ledger) == [f"{i:010d}" for i in range(6)]
    dropped = {k: (r["reason"], r["detail"]) for k, r in ledger.items() if not r["kept"]}
    assert set(dropped) == {"0000000001", "0000000004"}, dropped
    assert all(reason == "bad_url" and "UTF-8" in detail for reason, detail in dropped.values())
    captions = {s.key: s.meta["caption"] for t in (root / "download").glob("*.tar") for s in iter_shard_samples(t)}
    assert captions["0000000000"] == "zero" and captions["0000000002"].startswith("caf")


def test_empty_url_lists_run(tmp_path, image_server):
    import pyarrow as pa

    (tmp_path / "h.csv").write_text("url,caption\n")
    pq.write_table(pa.table({"url": pa.array([], pa.string())}), tmp_path / "z.parquet")
    root = _run_download(tmp_path, [tmp_path / "h.csv", tmp_path / "z.parquet"])
    row = [r for r in pq.read_table(root / "stats" / "funnel.parquet").to_pylist() if r["stage"] == "download"][0]
    assert row["rows_in"] == row["kept"] == row["dropped"] == 0


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.csv", b"", "empty file"),
        ("ragged.csv", b"url,caption\nhttp://a/1.jpg,x\nhttp://a/2.jpg,y,z\n", "Expected 2 columns"),
        ("empty.parquet", b"", "not a readable Parquet file"),
        ("corrupt.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
        ("nourl.csv", b"link,caption\nhttp://a/1.jpg,x\n", "no column 'url'"),
    ],
)
def test_unreadable_url_lists_fail_with_one_line(tmp_path, capsys, name, content, problem):
    import yaml

    from curation.config import ConfigError
    from pipelines.curate import main

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        _run_download(tmp_path, [path])
    message = str(info.value)
    assert "\n" not in message and str(path) in message and problem in message, message
    # --check finds the same problem without downloading anything
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_root": str(tmp_path / "run2"), "input": {"url_list": str(path)}}))
    assert main(["--config", str(config), "--check"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and str(path) in err[0] and problem in err[0], err
    assert not (tmp_path / "run2").exists()


def test_status_tables_hold_one_row_per_url(demo_download, tmp_path):
    """download/NNNNN.parquet together list every input URL once, those refused before fetch included."""
    root, truth = demo_download["root"], demo_download["truth"]
    status = [r for p in sorted((root / "download").glob("[0-9]*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["key"] for r in status) == [f"{i:010d}" for i in range(truth.num_rows)]
    ledger = {r["key"]: r for r in accounting.read_ledger(root, "download").to_pylist()}
    for r in status:
        assert (r["status"] == "success") == ledger[r["key"]]["kept"] and r["reason"] == ledger[r["key"]]["reason"]
    refused = [r for r in status if r["reason"] in ("bad_url", "blocked_domain", "duplicate_url")]
    assert refused and all(r["error_message"] for r in refused)


def test_status_table_when_every_url_is_refused(tmp_path):
    (tmp_path / "u.csv").write_text("url\nhtp://broken\nhttp://10.0.0.1/a.jpg\n")
    root = _run_download(tmp_path, [tmp_path / "u.csv"])
    status = pq.read_table(root / "download" / "00000.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in status] == [("0000000000", "bad_url"), ("0000000001", "private_address")]


def test_a_changed_url_list_is_refused_on_rerun(tmp_path, image_server):
    """Rewriting the URL list at the same path must not silently resume the old run."""
    from curation.config import ConfigError

    lists = tmp_path / "lists"
    lists.mkdir()
    urls = lists / "u.csv"
    text = "url\n" + "".join(f"{image_server}/{i}.jpg\n" for i in range(3))
    urls.write_text(text)
    root = _run_download(tmp_path, [lists])
    urls.write_text(text)  # same content, new mtime: resumes
    _run_download(tmp_path, [lists])
    urls.write_text("url\n" + "".join(f"{image_server}/{i}.jpg\n" for i in range(2)))
    with pytest.raises(ConfigError) as info:
        _run_download(tmp_path, [lists])
    assert "changed" in str(info.value) and str(urls.resolve()) in str(info.value)
    urls.write_text(text)
    (lists / "more.csv").write_text(text)  # a new file in an input folder
    with pytest.raises(ConfigError, match="added"):
        _run_download(tmp_path, [lists])
    assert accounting.read_ledger(root, "download").num_rows == 3


def test_stage_bounds_body_size_and_time_per_url(tmp_path, image_server):
    """Through the stage: download.max_bytes and download.deadline_s reach the fetch."""
    (tmp_path / "u.csv").write_text(f"url\n{image_server}/big/0\n{image_server}/dribble/1\n{image_server}/2.jpg\n")
    root = _run_download(tmp_path, [tmp_path / "u.csv"], max_bytes=1 << 20, timeout_s=2.0, deadline_s=1.0)
    status = {r["key"]: r for r in pq.read_table(root / "download" / "00000.parquet").to_pylist()}
    assert status["0000000000"]["reason"] == "too_large_file"
    assert status["0000000001"]["reason"] == "timeout" and "deadline" in status["0000000001"]["error_message"]
    assert status["0000000002"]["status"] == "success"
