"""The one decode-and-describe pipeline (curation.models.describe): failures with reasons, one set of decode limits,
results independent of the worker count."""

import io
from functools import partial

import numpy as np
from PIL import Image

from curation.config import SSCDConfig
from curation.models.describe import describe
from curation.models.embedder import build_copy_embedder
from curation.models.sscd import pixel_descriptor
from curation.data.samples import Sample


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((160, 120))


def _samples(tmp_path) -> list[Sample]:
    frames = [_image(10), _image(11)]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    return [
        Sample("b-png", _encoded(_image(1), "PNG"), {}),
        Sample("a-gif", gif, {}),
        Sample("c-empty", b"", {}),
        Sample("d-big", _encoded(Image.new("RGB", (200, 200)), "PNG"), {}),  # over the limit below
        Sample("e-missing", tmp_path / "gone.jpg", {}),
    ]


def test_describe_reports_failures_and_decodes_animated_first_frames(tmp_path):
    samples = _samples(tmp_path)
    pixels = build_copy_embedder(SSCDConfig(descriptor="pixels"))
    keys, vecs, failures = describe(pixels, partial(iter, samples), batch_size=2, max_pixels=200 * 200 - 1)
    assert keys == ["a-gif", "b-png"]  # sorted by key
    # an animated image keeps its first frame (download decided whether animated images are kept)
    gif_first = Image.open(io.BytesIO(samples[1].data)).convert("RGB")
    np.testing.assert_array_equal(vecs[0], pixel_descriptor(gif_first))
    assert [(k, r) for k, r, _ in failures] == [
        ("c-empty", "empty"), ("d-big", "decompression_bomb"), ("e-missing", "undecodable")]


def test_describe_is_independent_of_workers_and_batches(tmp_path):
    samples = _samples(tmp_path)
    pixels = build_copy_embedder(SSCDConfig(descriptor="pixels"))
    a = describe(pixels, partial(iter, samples), batch_size=1, num_workers=0)
    b = describe(pixels, partial(iter, samples), batch_size=3, num_workers=2)
    assert a.keys == b.keys and a.failures == b.failures
    np.testing.assert_array_equal(a.vectors, b.vectors)  # a pixel function: per image, no batch arithmetic
