"""filter: download shards -> kept images, faces blurred, NSFW dropped.

Units are the download shards (same ids).  A unit's input is the keys the download ledger kept for that shard
(exactly the samples of ``download/NNNNN.tar``).  For each image, in order:

1. decode with :func:`curation.images.decode_image` (bomb limit ``images.max_image_pixels``): a declared pixel
   count over the limit is ``decompression_bomb``; any other decode failure (corrupt, truncated, unsupported
   mode) is ``undecodable`` with the decoder's reason in ``detail``;
2. shorter side below ``filter.min_side``: ``too_small``;
3. longer/shorter side above ``filter.max_aspect``: ``bad_aspect``;
4. the detector (:mod:`curation.detectors`), in batches of ``filter.batch_size``: an NSFW score above
   ``filter.nsfw_threshold`` is ``nsfw``; face boxes are Gaussian-blurred in the stored image
   (``filter.blur_faces``).

Kept images go to ``filter/NNNNN.tar`` with their original bytes, or re-encoded JPEG (``images.jpeg_quality``)
when a face was blurred (the json gains ``faces_blurred``); then the ledger part.

Detector "nudenet" without the optional extra: ``on_missing_detector: warn`` prints
:data:`~curation.detectors.MISSING_DETECTOR_MESSAGE` once and skips NSFW/face checks; ``fail`` raises
:class:`~curation.detectors.DetectorUnavailable` from :meth:`FilterStage.plan`, before any unit runs.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from curation import accounting
from curation.detectors import (
    MISSING_DETECTOR_MESSAGE,
    Detector,
    DetectorUnavailable,
    NullDetector,
    blur_boxes,
    detector_available,
    make_detector,
)
from curation.images import ImageRejected, decode_image, encode_jpeg
from curation.stages.base import Stage, Unit
from curation.storage import TarShardWriter, iter_tar_samples

_warned = False


def _warn_missing_once() -> None:
    global _warned
    if not _warned:
        print(MISSING_DETECTOR_MESSAGE, flush=True)
        _warned = True


class FilterStage(Stage):
    name = "filter"

    def __init__(self, cfg, root=None, detector: Detector | None = None):
        super().__init__(cfg, root)
        self.fc = cfg.filter
        self._detector = detector

    # -- detector ----------------------------------------------------------------------------------------------
    def check_detector(self) -> None:
        """Fail (on_missing_detector: fail) or warn once, before any work, when the detector is missing."""
        if self._detector is not None or detector_available(self.fc.detector):
            return
        if self.fc.on_missing_detector == "fail":
            raise DetectorUnavailable(
                f"filter.detector is {self.fc.detector!r} but it is not installed: pip install 'lvd[detect]', "
                "or set filter.detector: none, or filter.on_missing_detector: warn"
            )
        _warn_missing_once()

    def detector(self) -> Detector:
        if self._detector is None:
            try:
                self._detector = make_detector(self.fc.detector, self.fc.face_threshold)
            except DetectorUnavailable:
                if self.fc.on_missing_detector == "fail":
                    raise
                # the driver printed the warning in plan(); unit tasks (Ray workers) stay quiet
                self._detector = NullDetector()
        return self._detector

    # -- units -------------------------------------------------------------------------------------------------
    def plan(self) -> list[Unit]:
        self.check_detector()
        units = []
        for ledger in sorted(accounting.ledger_dir(self.root, "download").glob("[0-9]*.parquet")):
            sid = ledger.stem
            if (self.root / "download" / f"{sid}.tar").exists():
                units.append(Unit(sid))
        return units

    def is_done(self, unit: Unit) -> bool:
        return accounting.ledger_path(self.root, self.name, unit.id).exists()

    def run_unit(self, unit: Unit) -> dict:
        fc = self.fc
        prev = pq.read_table(accounting.ledger_path(self.root, "download", unit.id), columns=["key", "url", "kept"])
        urls = {k: u for k, u, kept in zip(*(prev[c].to_pylist() for c in ("key", "url", "kept"))) if kept}
        verdict: dict[str, tuple[str | None, str | None]] = {}
        survivors = []  # (key, members, image)
        for key, members in iter_tar_samples(self.root / "download" / f"{unit.id}.tar"):
            if key not in urls:
                continue  # not an input of this stage (cannot happen for a consistent download)
            data = members.get("jpg") or members.get("jpeg") or members.get("png") or members.get("webp") or b""
            try:
                im, _ = decode_image(data, self.cfg.images.max_image_pixels, drop_animated=False)
            except ImageRejected as err:
                reason = "decompression_bomb" if err.reason == "decompression_bomb" else "undecodable"
                verdict[key] = (reason, f"{err.reason}: {err.detail}" if reason == "undecodable" else err.detail)
                continue
            w, h = im.size
            short, long_ = min(w, h), max(w, h)
            if short < fc.min_side:
                verdict[key] = ("too_small", f"{w}x{h}, shorter side {short} < {fc.min_side}")
            elif long_ / short > fc.max_aspect:
                verdict[key] = ("bad_aspect", f"{w}x{h}, aspect {long_ / short:.2f} > {fc.max_aspect}")
            else:
                survivors.append((key, members, im))
        missing = set(urls) - set(verdict) - {s[0] for s in survivors}
        for key in missing:  # kept by download but absent from its tar: count it as undecodable, never lose it
            verdict[key] = ("undecodable", "no image in the download shard")

        detector = self.detector()
        n_blurred = 0
        out = TarShardWriter(self.dir / f"{unit.id}.tar")
        try:
            for start in range(0, len(survivors), fc.batch_size):
                batch = survivors[start : start + fc.batch_size]
                dets = detector.detect([s[2] for s in batch])
                if len(dets) != len(batch):
                    raise RuntimeError(f"detector {detector.name!r} returned {len(dets)} results for {len(batch)}")
                for (key, members, im), det in zip(batch, dets):
                    if det.nsfw > fc.nsfw_threshold:
                        verdict[key] = ("nsfw", f"score {det.nsfw:.3f} > {fc.nsfw_threshold} ({detector.name})")
                        continue
                    verdict[key] = (None, None)
                    info = json.loads(members["json"]) if "json" in members else {"key": key, "url": urls[key]}
                    if fc.blur_faces and det.faces:
                        image = encode_jpeg(blur_boxes(im, det.faces), self.cfg.images.jpeg_quality)
                        info["faces_blurred"] = len(det.faces)
                        n_blurred += 1
                    else:
                        image = members.get("jpg") or members.get("jpeg") or members.get("png") or members["webp"]
                        ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in members)
                        if ext != "jpg":
                            image = encode_jpeg(im, self.cfg.images.jpeg_quality)  # the pool is JPEG throughout
                    out.write(key, {"jpg": image, "json": info})
        except BaseException:
            out.abort()
            raise
        out.close()
        keys = sorted(verdict)
        ledger = accounting.make_ledger(
            self.name, keys, [urls[k] for k in keys], [verdict[k][0] for k in keys], [verdict[k][1] for k in keys]
        )
        accounting.write_ledger(self.root, self.name, unit.id, ledger)
        kept = sum(v[0] is None for v in verdict.values())
        return {"kept": kept, "dropped": len(keys) - kept, "blurred": n_blurred}
