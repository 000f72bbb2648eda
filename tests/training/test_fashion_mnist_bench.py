"""bench/fashion_mnist_bench.py: the IDX reader (against files written here) and the bench's data build and
raw-pixel k-NN on the real Fashion-MNIST files (skipped where the Debian package is not installed)."""
from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.debian import ensure_package

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import fashion_mnist_bench as fm  # noqa: E402


def _write_idx(path: Path, arr: np.ndarray, code: int = 0x08, gz: bool = True) -> Path:
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)
    return path


def test_read_idx_reads_gzip_and_plain_and_names_a_bad_file(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(fm.read_idx(_write_idx(tmp_path / "a.gz", imgs)), imgs)
    labels = np.array([7, 1, 9], dtype=np.uint8)
    assert np.array_equal(fm.read_idx(_write_idx(tmp_path / "b", labels, gz=False)), labels)
    big = np.array([1, -2, 70000], dtype=">i4")
    assert fm.read_idx(_write_idx(tmp_path / "c.gz", big, code=0x0C)).tolist() == [1, -2, 70000]
    raw = gzip.open(tmp_path / "a.gz").read()
    gzip.open(tmp_path / "short.gz", "wb").write(raw[:-1])
    with pytest.raises(ValueError, match="short.gz: IDX header says"):
        fm.read_idx(tmp_path / "short.gz")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        fm.read_idx(tmp_path / "junk")


@pytest.mark.skipif(not ensure_package("dataset-fashion-mnist", fm.DEFAULT_IDX_DIR / "t10k-images-idx3-ubyte.gz"),
                    reason="Fashion-MNIST IDX files absent and not installable here (Debian: apt-get install "
                    "dataset-fashion-mnist, as root)")
def test_bench_builds_the_real_data_and_reports_raw_pixel_knn(tmp_path, capsys):
    assert fm.main(["--raw-only", "--out", str(tmp_path), "--ssl", "20", "--knn-train", "300", "--knn-val", "200",
                    "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == {"ssl": 20, "knn_train": 300, "knn_val": 200}
    assert len(list((tmp_path / "data" / "knn_val").iterdir())) == 10  # every class among the first 200 tests
    assert 0.3 < out["raw_pixels_knn_top1"] <= 1.0  # chance is 0.1; raw pixels are known to do far better
