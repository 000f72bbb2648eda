"""filter stage: every drop reason on hand-made download shards, face blurring, and the missing-detector paths.

NSFW and faces come from :class:`ColourDetector`, a real (tiny) Detector: it calls an image NSFW when it is mostly
red, and reports a face box over any pure-blue square it finds."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.pipeline import accounting
from curation.config import load_config
from curation.models.detectors import Detection, Detector, NudeNetDetector, DetectorUnavailable, blur_boxes
from curation.pipeline.runner import run_pipeline
from curation.config import FilterConfig
from curation.stages.filter import ImageFacts, filter_verdict
from curation.pipeline.storage import TarShardWriter, iter_tar_samples


class ColourDetector:
    name = "colour"

    def detect(self, images):
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.int16)
            red = float(((a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)).mean())
            blue = (a[..., 2] > 200) & (a[..., 0] < 40) & (a[..., 1] < 40)
            faces = []
            if blue.sum() >= 25:
                ys, xs = np.nonzero(blue)
                faces.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1), 0.9))
            out.append(Detection(nsfw=red, faces=faces))
        return out


def _jpeg(im, q=95):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _textured(w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def _face_image():
    im = _textured(160, 120, 7)
    im.paste((0, 0, 255), (40, 30, 80, 70))  # a pure-blue "face" with a fine white check pattern inside
    a = np.array(im)
    a[32:68:4, 42:78] = 255
    a[32:68, 42:78:4] = 255
    return Image.fromarray(a)


SAMPLES = {
    "0000000000": ("ok", _jpeg(_textured(128, 96, 0))),
    "0000000001": ("too_small", _jpeg(_textured(30, 100, 1))),
    "0000000002": ("bad_aspect", _jpeg(_textured(300, 60, 2))),
    "0000000003": ("undecodable", b"\xff\xd8\xff\xe0 this is not really a jpeg"),
    "0000000004": ("decompression_bomb", _jpeg(Image.new("RGB", (1200, 1000), (90, 90, 90)))),
    "0000000005": ("nsfw", _jpeg(Image.new("RGB", (100, 100), (230, 20, 20)))),
    "0000000006": ("face", _jpeg(_face_image())),
    "0000000007": ("ok", _jpeg(_textured(64, 200, 3))),
}


def _make_download_run(tmp_path, filter_cfg):
    root = tmp_path / "run"
    urls = tmp_path / "urls.csv"
    urls.write_text("url\n" + "".join(f"http://x.test/{k}.jpg\n" for k in SAMPLES))
    with TarShardWriter(root / "download" / "00000.tar") as tar:
        for key, (_, data) in SAMPLES.items():
            tar.write(key, {"jpg": data, "json": {"key": key, "url": f"http://x.test/{key}.jpg"}})
    keys = list(SAMPLES)
    ledger = accounting.make_ledger("download", keys, [f"http://x.test/{k}.jpg" for k in keys], [None] * len(keys))
    accounting.write_ledger(root, "download", "00000", ledger)
    data = {"run_root": str(root), "input": {"url_list": str(urls)}, "ray": {"local": True},
            "stages": ["filter"], "images": {"max_image_pixels": 1_000_000},
            "filter": {"min_side": 48, "max_aspect": 4.0, **filter_cfg}}
    return root, load_config(data=data)


def _ledger(root):
    return {r["key"]: r for r in accounting.read_ledger(root, "filter").to_pylist()}


def test_every_reason_and_face_blur(tmp_path):
    assert isinstance(ColourDetector(), Detector)
    root, cfg = _make_download_run(tmp_path, {"detector": "tests.curation.test_filter:ColourDetector",
                                              "nsfw_threshold": 0.5})
    run_pipeline(cfg, progress=False)
    led = _ledger(root)
    for key, (kind, _) in SAMPLES.items():
        want = None if kind in ("ok", "face") else kind
        assert led[key]["reason"] == want, (key, kind, led[key])
    assert "score" in led["0000000005"]["detail"]
    assert "1200x1000" in led["0000000004"]["detail"]
    stored = dict(iter_tar_samples(root / "filter" / "00000.tar"))
    assert sorted(stored) == ["0000000000", "0000000006", "0000000007"]
    # unchanged images keep their exact bytes; the face image is re-encoded with the box blurred
    assert stored["0000000000"]["jpg"] == SAMPLES["0000000000"][1]
    assert stored["0000000006"]["jpg"] != SAMPLES["0000000006"][1]
    assert json.loads(stored["0000000006"]["json"])["faces_blurred"] == 1
    before = np.asarray(Image.open(io.BytesIO(SAMPLES["0000000006"][1])).convert("RGB"), np.float32)
    after = np.asarray(Image.open(io.BytesIO(stored["0000000006"]["jpg"])).convert("RGB"), np.float32)
    box = (slice(32, 68), slice(42, 78))

    def detail(a):  # high-frequency energy
        return np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()

    assert detail(after[box]) < 0.3 * detail(before[box])  # the face's detail is gone
    assert np.abs(after[:, 100:] - before[:, 100:]).mean() < 3  # far from the box nothing changed
    # accounting: rows in = kept + dropped, and rerunning does nothing
    funnel = {r["stage"]: r for r in pq.read_table(root / "stats" / "funnel.parquet").to_pylist()}
    assert funnel["filter"]["rows_in"] == 8 and funnel["filter"]["kept"] == 3
    out = run_pipeline(cfg, progress=False)
    assert out["filter"]["ran"] == 0


def test_detector_none_skips_nsfw(tmp_path):
    root, cfg = _make_download_run(tmp_path, {"detector": "none"})
    run_pipeline(cfg, progress=False)
    assert _ledger(root)["0000000005"]["kept"]


def test_missing_detector_warns_once_and_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("curation.models.detectors.nudenet_model_path", lambda: None)  # the extra is absent
    with pytest.raises(DetectorUnavailable):
        NudeNetDetector()
    root, cfg = _make_download_run(tmp_path, {"detector": "nudenet", "on_missing_detector": "warn"})
    run_pipeline(cfg, progress=False)
    printed = capsys.readouterr().out
    msg = ("NSFW/face detector unavailable (pip install 'lvd[detect]'): faces are NOT blurred and NSFW images are "
           "NOT dropped in this run")
    assert printed.count(msg) == 1
    led = _ledger(root)
    assert led["0000000005"]["kept"]  # NSFW check skipped
    assert led["0000000001"]["reason"] == "too_small"  # the other checks still ran


def test_missing_detector_fail_raises_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("curation.models.detectors.nudenet_model_path", lambda: None)
    root, cfg = _make_download_run(tmp_path, {"detector": "nudenet", "on_missing_detector": "fail"})
    with pytest.raises(DetectorUnavailable, match="lvd\\[detect\\]"):
        run_pipeline(cfg, progress=False)
    assert not (root / "filter" / "00000.tar").exists()
    assert not accounting.ledger_dir(root, "filter").exists()


def test_bad_detector_path_is_a_config_error(tmp_path):
    from curation.config import ConfigError

    with pytest.raises(ConfigError, match="filter.detector"):
        _make_download_run(tmp_path, {"detector": "not a path"})


def test_blur_boxes_only_touches_the_box():
    im = _textured(100, 80, 5)
    out = blur_boxes(im, [(10, 10, 50, 40, 1.0)])
    a, b = np.asarray(im, np.float32), np.asarray(out, np.float32)
    assert np.array_equal(a[45:], b[45:]) and np.array_equal(a[:, 55:], b[:, 55:])
    assert np.abs(a[10:40, 10:50] - b[10:40, 10:50]).mean() > 1


def test_filter_verdict_in_memory():
    """Every reason of the filter from image facts alone, at and around each limit, in the documented order."""
    fc = FilterConfig(min_side=48, max_aspect=4.0, nsfw_threshold=0.5)
    assert filter_verdict(ImageFacts(size=(48, 192)), fc) == (None, None)  # both limits are inclusive
    assert filter_verdict(ImageFacts(size=(47, 100)), fc) == ("too_small", "47x100, shorter side 47 < 48")
    assert filter_verdict(ImageFacts(size=(48, 193)), fc) == ("bad_aspect", "48x193, aspect 4.02 > 4.0")
    assert filter_verdict(ImageFacts(size=(10, 400)), fc)[0] == "too_small"  # size before aspect
    bomb = ImageFacts(rejected=("decompression_bomb", "1200x1000 = 1200000 pixels > 1000000"))
    assert filter_verdict(bomb, fc) == ("decompression_bomb", "1200x1000 = 1200000 pixels > 1000000")
    assert filter_verdict(ImageFacts(rejected=("truncated", "image file is truncated")), fc) == (
        "undecodable", "truncated: image file is truncated")
    assert filter_verdict(ImageFacts(), fc) == ("undecodable", "no image in the download shard")
    assert filter_verdict(ImageFacts(size=(100, 100), nsfw=0.5, detector="colour"), fc) == (None, None)
    assert filter_verdict(ImageFacts(size=(100, 100), nsfw=0.51, detector="colour"), fc) == (
        "nsfw", "score 0.510 > 0.5 (colour)")
    assert filter_verdict(ImageFacts(size=(47, 100), nsfw=0.9), fc)[0] == "too_small"  # NSFW is judged last
