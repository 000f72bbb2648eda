"""NSFW and face detection for the filter stage, behind a small pluggable interface.

A :class:`Detector` takes a batch of RGB PIL images and returns, per image, a :class:`Detection`: an NSFW score
in [0, 1] and face boxes in pixel coordinates of that image.  Implementations:

* :class:`NudeNetDetector` - the YOLOv8-style ONNX model ``320n.onnx`` shipped inside the ``nudenet`` package
  (optional extra: ``pip install 'lvd[detect]'``), run with onnxruntime, batched.  We do not import nudenet's
  Python code (it pulls in OpenCV); we only locate its model file and re-implement the pre/post-processing
  (pad to a square at the bottom/right, resize to 320, RGB/255; boxes in centre form, 18 class scores, NMS).
  The NSFW score is the highest score among the *exposed* classes; faces are ``FACE_FEMALE``/``FACE_MALE``.

  **Licence**: nudenet 3.4.2's wheel metadata says "License: MIT", but the LICENSE and LICENSE.md files it ships
  are the GNU Affero GPL v3.0, and the model is a YOLOv8 (Ultralytics, AGPL-3.0) fine-tune.  Treat the package
  and its bundled ``320n.onnx`` as AGPL-3.0: that is why it is an optional extra and not a core dependency of
  this Apache-2.0 project; check the licence before redistributing it or serving it over a network.
* :class:`NullDetector` - no NSFW score (0) and no faces: what the filter uses when detection is switched off
  (``filter.detector: none``) or the extra is absent.

:func:`blur_boxes` blurs face regions in place (Gaussian blur with a radius proportional to the box size).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image, ImageFilter

MISSING_DETECTOR_MESSAGE = (
    "NSFW/face detector unavailable (pip install 'lvd[detect]'): faces are NOT blurred and NSFW images are NOT "
    "dropped in this run"
)

Box = tuple[float, float, float, float, float]  # x0, y0, x1, y1, score


@dataclass
class Detection:
    nsfw: float = 0.0
    faces: list[Box] = field(default_factory=list)


@runtime_checkable
class Detector(Protocol):
    name: str

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        """One Detection per image, in order."""
        ...


class DetectorUnavailable(RuntimeError):
    pass


class NullDetector:
    name = "none"

    def detect(self, images):
        return [Detection() for _ in images]


NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
NSFW_CLASSES = ("BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "ANUS_EXPOSED",
                "MALE_GENITALIA_EXPOSED")
FACE_CLASSES = ("FACE_FEMALE", "FACE_MALE")


def nudenet_model_path() -> Path | None:
    """The 320n.onnx inside the installed nudenet package, or None when the extra is absent."""
    try:
        spec = importlib.util.find_spec("nudenet")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "320n.onnx"
        if p.exists():
            return p
    return None


def detector_available(kind: str) -> bool:
    if kind == "none" or ":" in kind:
        return True
    if kind == "nudenet":
        return nudenet_model_path() is not None and importlib.util.find_spec("onnxruntime") is not None
    raise ValueError(f"unknown detector {kind!r}")


def detection_warning(stages, filter_cfg) -> str | None:
    """One plain line when a pipeline of these stages and this ``filter`` section will not blur faces or drop NSFW
    images (None when it will)."""
    if "filter" not in stages:
        return "the filter stage is not in the run: faces are NOT blurred and NSFW images are NOT dropped"
    if filter_cfg.detector == "none":
        return "filter.detector is 'none': faces are NOT blurred and NSFW images are NOT dropped"
    if not detector_available(filter_cfg.detector):
        if filter_cfg.on_missing_detector == "fail":
            return "NSFW/face detector unavailable (pip install 'lvd[detect]'): the filter stage will stop the run"
        return MISSING_DETECTOR_MESSAGE
    if not filter_cfg.blur_faces:
        return "filter.blur_faces is false: faces are NOT blurred"
    return None


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; boxes as x0, y0, x1, y1."""
    order = np.argsort(-scores)
    keep = []
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        xx0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (xx1 - xx0).clip(0) * (yy1 - yy0).clip(0)
        ov = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[ov <= iou]
    return keep


class NudeNetDetector:
    """NudeNet's bundled ONNX detector, batched through onnxruntime (see the module docstring for its licence)."""

    name = "nudenet"

    def __init__(self, model_path: str | Path | None = None, resolution: int = 320, face_threshold: float = 0.5,
                 min_score: float = 0.2, iou: float = 0.45, providers: list[str] | None = None):
        path = Path(model_path) if model_path else nudenet_model_path()
        if path is None or not path.exists():
            raise DetectorUnavailable(MISSING_DETECTOR_MESSAGE)
        try:
            import onnxruntime as ort
        except ImportError:
            raise DetectorUnavailable(MISSING_DETECTOR_MESSAGE) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # one stage worker per CPU; parallelism comes from workers
        avail = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.res = resolution
        self.face_threshold = face_threshold
        self.min_score = min_score
        self.iou = iou
        self._nsfw_idx = [NUDENET_LABELS.index(c) for c in NSFW_CLASSES]
        self._face_idx = [NUDENET_LABELS.index(c) for c in FACE_CLASSES]

    def _prep(self, im: Image.Image) -> tuple[np.ndarray, float]:
        side = max(im.size)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))  # pad bottom/right, as nudenet does
        canvas.paste(im, (0, 0))
        arr = np.asarray(canvas.resize((self.res, self.res), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        return arr.transpose(2, 0, 1), side / self.res

    def detect(self, images):
        if not images:
            return []
        preps = [self._prep(im) for im in images]
        batch = np.stack([p[0] for p in preps])
        out = self.session.run(None, {self.input_name: batch})[0]  # (B, 4 + classes, anchors)
        results = []
        for j, im in enumerate(images):
            pred = out[j].T  # (anchors, 4 + classes)
            scale = preps[j][1]
            cls_scores = pred[:, 4:]
            best = cls_scores.max(1)
            sel = best >= self.min_score
            pred, cls_scores, best = pred[sel], cls_scores[sel], best[sel]
            if not len(pred):
                results.append(Detection())
                continue
            cls = cls_scores.argmax(1)
            cx, cy, w, h = (pred[:, i] * scale for i in range(4))
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, im.width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, im.height)
            keep = _nms(boxes, best, self.iou)
            nsfw, faces = 0.0, []
            for i in keep:
                if cls[i] in self._nsfw_idx:
                    nsfw = max(nsfw, float(best[i]))
                elif cls[i] in self._face_idx and best[i] >= self.face_threshold:
                    faces.append((*map(float, boxes[i]), float(best[i])))
            results.append(Detection(nsfw=nsfw, faces=faces))
        return results


def make_detector(kind: str, face_threshold: float = 0.5) -> Detector:
    """'none', 'nudenet' (raises DetectorUnavailable without the extra) or 'package.module:Class'."""
    if kind == "none":
        return NullDetector()
    if kind == "nudenet":
        return NudeNetDetector(face_threshold=face_threshold)
    if ":" in kind:
        import importlib

        module, _, attr = kind.partition(":")
        obj = getattr(importlib.import_module(module), attr)()
        if not isinstance(obj, Detector):
            raise TypeError(f"{kind} does not implement curation.models.detectors.Detector (name + detect(images))")
        return obj
    raise ValueError(f"unknown detector {kind!r}")


def blur_boxes(im: Image.Image, boxes: Sequence[Box], strength: float = 0.15) -> Image.Image:
    """A copy of `im` with each box Gaussian-blurred (radius = strength x the box's longer side, at least 2 px)."""
    out = im.copy()
    for x0, y0, x1, y1, *_ in boxes:
        x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        x1, y1 = min(im.width, int(np.ceil(x1))), min(im.height, int(np.ceil(y1)))
        if x1 <= x0 or y1 <= y0:
            continue
        region = out.crop((x0, y0, x1, y1))
        radius = max(2.0, strength * max(x1 - x0, y1 - y0))
        out.paste(region.filter(ImageFilter.GaussianBlur(radius)), (x0, y0))
    return out
