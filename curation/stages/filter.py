"""filter: download shards -> kept images, faces blurred, NSFW dropped.

Units are the pool shards the stage receives (:meth:`Stage.input_shards`: the download shards, same ids).  A unit's
input is the keys its input ledger stage (download) kept for that shard (:meth:`Stage.input_rows`: exactly the
samples of the shard's tar, ``download/NNNNN.tar``).  For each image, in order:

1. decode with :func:`curation.data.images.decode_image` (bomb limit ``images.max_image_pixels``): a declared pixel
   count over the limit is ``decompression_bomb``; any other decode failure (corrupt, truncated, unsupported
   mode) is ``undecodable`` with the decoder's reason in ``detail``;
2. shorter side below ``filter.min_side``: ``too_small``;
3. longer/shorter side above ``filter.max_aspect``: ``bad_aspect``;
4. the detector (:mod:`curation.models.detectors`), in batches of ``filter.batch_size``: an NSFW score above
   ``filter.nsfw_threshold`` is ``nsfw``; face boxes are Gaussian-blurred in the stored image
   (``filter.blur_faces``).

The verdicts are :func:`filter_verdict`, a pure function of what is known of the image (:class:`ImageFacts`).
Kept images go to ``filter/NNNNN.tar`` with their original bytes, or re-encoded JPEG (``images.jpeg_quality``)
when a face was blurred (the json gains ``faces_blurred``) or the download stored another format; then the
ledger part.

Detector "nudenet" without the optional extra: ``on_missing_detector: warn`` prints
:data:`~curation.models.detectors.MISSING_DETECTOR_MESSAGE` once per run (from :meth:`FilterStage.plan`, in the driver)
and skips NSFW/face checks; ``fail`` raises :class:`~curation.models.detectors.DetectorUnavailable` from
:meth:`FilterStage.plan`, before any unit runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from PIL import Image

from curation.pipeline import accounting
from curation.config import FilterConfig
from curation.models.detectors import (
    MISSING_DETECTOR_MESSAGE,
    Detector,
    DetectorUnavailable,
    NullDetector,
    blur_boxes,
    detector_available,
    make_detector,
)
from curation.data.images import ImageRejected, decode_image, encode_jpeg
from curation.data.samples import image_member
from curation.stages.base import Stage, Unit
from curation.pipeline.storage import TarShardWriter, iter_tar_samples

Verdict = tuple[str | None, str | None]  # (drop reason, detail); (None, None) keeps the image


@dataclass(frozen=True)
class ImageFacts:
    """What the filter knows of one input image: why the decoder rejected it (its reason and detail), or its
    size; and, once the detector has run, its NSFW score and the detector's name.  Neither a size nor a
    rejection: the image is missing from the download shard."""

    size: tuple[int, int] | None = None
    rejected: tuple[str, str] | None = None
    nsfw: float | None = None
    detector: str = ""


def filter_verdict(facts: ImageFacts, settings: FilterConfig) -> Verdict:
    """The filter's verdict on one image, checks in the order of the module docstring; the NSFW check applies
    once the image was scored (``facts.nsfw`` not None)."""
    if facts.rejected is not None:
        reason, detail = facts.rejected
        if reason == "decompression_bomb":
            return "decompression_bomb", detail
        return "undecodable", f"{reason}: {detail}"
    if facts.size is None:
        return "undecodable", "no image in the download shard"
    w, h = facts.size
    short, long_ = min(w, h), max(w, h)
    if short < settings.min_side:
        return "too_small", f"{w}x{h}, shorter side {short} < {settings.min_side}"
    if long_ / short > settings.max_aspect:
        return "bad_aspect", f"{w}x{h}, aspect {long_ / short:.2f} > {settings.max_aspect}"
    if facts.nsfw is not None and facts.nsfw > settings.nsfw_threshold:
        return "nsfw", f"score {facts.nsfw:.3f} > {settings.nsfw_threshold} ({facts.detector})"
    return None, None


class FilterStage(Stage):
    name = "filter"
    section = "filter"
    order = 20
    ledger = True
    drop_reasons = ("too_small", "bad_aspect", "undecodable", "decompression_bomb", "nsfw")
    pool_tars = True
    per_shard = True

    # -- detector ----------------------------------------------------------------------------------------------
    def check_detector(self) -> None:
        """Before any work, when the detector is missing: fail (on_missing_detector: fail), or print the warning
        (plan() calls this once per run, in the driver)."""
        if detector_available(self.settings.detector):
            return
        if self.settings.on_missing_detector == "fail":
            raise DetectorUnavailable(
                f"filter.detector is {self.settings.detector!r} but it is not installed: pip install 'lvd[detect]', "
                "or set filter.detector: none, or filter.on_missing_detector: warn"
            )
        print(MISSING_DETECTOR_MESSAGE, flush=True)

    def setup(self) -> None:
        """Load the detector once per worker; a missing one is the NullDetector (the driver warned in plan())."""
        try:
            self.detector: Detector = make_detector(self.settings.detector, self.settings.face_threshold)
        except DetectorUnavailable:
            if self.settings.on_missing_detector == "fail":
                raise
            self.detector = NullDetector()

    # -- units -------------------------------------------------------------------------------------------------
    def plan(self) -> list[Unit]:
        self.check_detector()
        return [Unit(shard) for shard in self.input_shards()]

    def run_unit(self, unit: Unit) -> dict:
        rows = self.input_rows(unit.id)
        urls = dict(zip(rows["key"].to_pylist(), rows["url"].to_pylist()))
        verdicts, survivors = self._decode_and_check(unit.id, urls)
        n_blurred = self._detect_and_write(unit.id, survivors, urls, verdicts)
        keys = sorted(verdicts)
        ledger = accounting.make_ledger(self.name, keys, [urls[k] for k in keys], [verdicts[k][0] for k in keys],
                                        [verdicts[k][1] for k in keys])
        accounting.write_ledger(self.root, self.name, unit.id, ledger)
        kept = sum(v[0] is None for v in verdicts.values())
        return {"kept": kept, "dropped": len(keys) - kept, "blurred": n_blurred}

    def _decode_and_check(self, unit_id: str, urls: dict[str, str]) -> tuple[dict[str, Verdict], list]:
        """Decode each input image of the shard and judge what decoding tells; return every input key's
        verdict so far and the survivors (key, tar members, image) for the detector.  An input key absent from the
        tar is judged too: never lost."""
        verdicts: dict[str, Verdict] = {}
        survivors = []
        for key, members in iter_tar_samples(self.input_tar(unit_id)):
            if key not in urls:
                continue  # not an input of this stage (cannot happen for a consistent earlier stage)
            ext = image_member(members)
            try:
                im, _ = decode_image(members[ext] if ext else b"", self.images.max_image_pixels, drop_animated=False)
            except ImageRejected as err:
                verdicts[key] = filter_verdict(ImageFacts(rejected=(err.reason, err.detail)), self.settings)
                continue
            verdicts[key] = filter_verdict(ImageFacts(size=im.size), self.settings)
            if verdicts[key][0] is None:
                survivors.append((key, members, im))
        for key in set(urls) - set(verdicts):
            verdicts[key] = filter_verdict(ImageFacts(), self.settings)
        return verdicts, survivors

    def _detect_and_write(self, unit_id: str, survivors: list, urls: dict[str, str],
                          verdicts: dict[str, Verdict]) -> int:
        """Run the detector on the survivors in batches, judge their NSFW scores into `verdicts`, and write the
        kept ones to ``filter/<shard>.tar``; return how many had faces blurred."""
        fc, detector = self.settings, self.detector
        n_blurred = 0
        out = TarShardWriter(self.layout.filter_tar(unit_id))
        try:
            for start in range(0, len(survivors), fc.batch_size):
                batch = survivors[start : start + fc.batch_size]
                dets = detector.detect([im for _, _, im in batch])
                if len(dets) != len(batch):
                    raise RuntimeError(f"detector {detector.name!r} returned {len(dets)} results for {len(batch)}")
                for (key, members, im), det in zip(batch, dets):
                    verdicts[key] = filter_verdict(ImageFacts(im.size, nsfw=det.nsfw, detector=detector.name), fc)
                    if verdicts[key][0] is None:
                        blur = fc.blur_faces and bool(det.faces)
                        out.write(key, self._kept_sample(key, urls[key], members, im, det.faces if blur else []))
                        n_blurred += blur
        except BaseException:
            out.abort()
            raise
        out.close()
        return n_blurred

    def _kept_sample(self, key: str, url: str, members: dict, im: Image.Image, faces: list) -> dict:
        """A kept image's tar members: its original bytes when they are a JPEG and no face is blurred, else the
        image (faces blurred) re-encoded as JPEG: the pool is JPEG throughout."""
        info = json.loads(members["json"]) if "json" in members else {"key": key, "url": url}
        ext = image_member(members)
        if faces:
            info["faces_blurred"] = len(faces)
            return {"jpg": encode_jpeg(blur_boxes(im, faces), self.images.jpeg_quality), "json": info}
        if ext != "jpg":
            return {"jpg": encode_jpeg(im, self.images.jpeg_quality), "json": info}
        return {"jpg": members[ext], "json": info}
