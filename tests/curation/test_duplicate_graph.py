"""One duplicate graph per run: hash groups and copy-detection neighbours in one component labelling, the verdict
precedence (eval_contamination first), and the survivor rule, on synthetic corpora whose sources are known.

Images are real (three photographs shipped with matplotlib and scikit-learn, and generated images), edited with
real borders, padding, rotation, resizing and re-encoding, and go through the real filter and hash stages.  Where
a test needs copy-detection similarities that a weight-free descriptor cannot produce (a bordered copy is a copy
to SSCD, not to a pixel function), it writes the sscd stage's descriptor parts itself, with similarities set in
closed form (copy . source = C, copy . copy = C**2), and says so.
"""

from __future__ import annotations

import copy
import io
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow.parquet as pq
import pytest
import sklearn
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from curation.pipeline import accounting
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table, load_descriptors
from tests.curation.fakerun import make_run

PHOTOS = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
          Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
          Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"]
C = 0.85  # modelled SSCD similarity of an edit to its source; two edits of one source: C**2 = 0.72 (> 0.6)


def _jpeg(im: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _photo(i: int, side: int = 240) -> Image.Image:
    im = Image.open(PHOTOS[i]).convert("RGB")
    s = side / max(im.size)
    return im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BOX)


def _filler(seed: int, w: int = 160, h: int = 120) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h // 10, w // 10, 3), dtype=np.uint8)).resize((w, h))


def bordered(im):
    return ImageOps.expand(im, border=im.width // 10, fill=(255, 255, 255))


def padded(im):
    side = max(im.size)
    out = Image.new("RGB", (side, side))
    out.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return out


def rotated(im):
    return im.rotate(12, expand=True, fillcolor=(0, 0, 0), resample=Image.Resampling.BICUBIC)


def half(im):
    return im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR)


def texted(im):
    out = im.copy()
    ImageDraw.Draw(out).text((8, 8), "COPY 2026", fill=(255, 255, 0))
    return out


def _orthonormal(n: int, d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, n)))
    return q.T.astype(np.float32)


def _run_until_hash(tmp: Path, images: list[tuple[str, bytes]], **sections) -> tuple[Path, dict]:
    # the paper's thresholds, for the modelled SSCD similarities (tests running the sscd stage give their own)
    sections.setdefault("dedup", {"threshold": 0.6, "eval_threshold": 0.45})
    cfg = make_run(tmp, images, shard_size=64, stages=["filter", "hash"],
                   filter={"detector": "none", "min_side": 32, "max_aspect": 4.0}, **sections)
    run_pipeline(load_config(data=copy.deepcopy(cfg)), progress=False)
    return tmp / "run", cfg


def _judge(root: Path, cfg: dict, vectors: dict[str, np.ndarray] | None = None,
           evals: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, dict]:
    """Run dedup (after sscd, or on the given modelled pool and evaluation descriptors) -> {key: ledger row}."""
    if vectors is not None:
        for out, vecs, source in [(root / "sscd" / "pool", vectors, "pool")] + [
                (root / "sscd" / "eval" / name, v, f"eval/{name}") for name, v in (evals or {}).items()]:
            keys = sorted(vecs)
            write_table(out / "part-00000.parquet", descriptor_table(keys, np.stack([vecs[k] for k in keys]), source),
                        "descriptors")
        stages = ["dedup"]
    else:
        stages = ["sscd", "dedup"]
    run_pipeline(load_config(data={**copy.deepcopy(cfg), "stages": stages}), progress=False)
    accounting.check_invariants(root)
    return {r["key"]: r for r in accounting.read_ledger(root, "dedup").to_pylist()}


# ---------------------------------------------------------------------------------------------------------------
def _smaller_brighter(im):
    """A hash-near copy (the PCA hash ignores brightness and scale) that copy detection may still score low."""
    return ImageEnhance.Brightness(im.resize((im.width * 4 // 5, im.height * 4 // 5), Image.Resampling.BOX)).enhance(1.15)


def test_chain_through_a_hash_copy_is_one_component(tmp_path):
    """original O -> H (a smaller, brightened copy: hash-near, but modelled SSCD 0.5) -> C (a crop of H: SSCD 0.65
    to H, 0.55 to O).  Only the hash link joins C to O; before, the hash stage dropped H and C survived.
    Likewise an evaluation image's copy R1 (SSCD 0.5 to it) and R1's hash-near copy R2 (SSCD 0.2 to the evaluation
    image, 0.36 to R1): R2 is contamination through the hash link; before, it was a near_duplicate."""
    o = _photo(0)
    h = _smaller_brighter(o)
    c = h.crop((10, 10, h.width - 10, h.height - 10))
    r1 = _photo(1)
    evald = tmp_path / "eval"
    evald.mkdir()
    r1.save(evald / "e.jpg")
    images = [(f"{i:010d}", _jpeg(_filler(500 + i))) for i in range(40)]
    images += [("o", _jpeg(o)), ("p_hash_copy", _jpeg(h)), ("q_sscd_copy", _jpeg(c)),
               ("r1", _jpeg(r1)), ("r2_hash_copy", _jpeg(_smaller_brighter(r1)))]
    root, cfg = _run_until_hash(tmp_path, images, dedup={"threshold": 0.6, "eval_threshold": 0.45, "eval_sets": [
        {"name": "ev", "path": str(evald)}]})
    groups = {r["key"]: r["group"] for r in pq.read_table(root / "hash" / "groups.parquet").to_pylist()}
    assert groups["o"] == groups["p_hash_copy"] != groups["q_sscd_copy"]
    assert groups["r1"] == groups["r2_hash_copy"]

    base = _orthonormal(len(images) + 6, 64, seed=0)
    vec = {k: base[i] for i, (k, _) in enumerate(images)}
    e1, e2, e3 = vec["o"], base[-2], base[-1]
    vec["p_hash_copy"] = 0.5 * e1 + np.sqrt(1 - 0.25) * e2
    b = (0.65 - 0.5 * 0.55) / np.sqrt(0.75)  # C . H = 0.65 with C . O = 0.55
    vec["q_sscd_copy"] = 0.55 * e1 + b * e2 + np.sqrt(1 - 0.55**2 - b**2) * e3
    e4, e5, e6 = base[-5], base[-4], base[-3]
    vec["r1"] = 0.5 * e4 + np.sqrt(0.75) * e5
    vec["r2_hash_copy"] = 0.2 * e4 + 0.3 * e5 + np.sqrt(1 - 0.04 - 0.09) * e6
    led = _judge(root, cfg, vec, {"ev": {"e": e4}})
    assert led["o"]["kept"]
    assert led["p_hash_copy"]["reason"] == "near_duplicate" and "duplicate of o (pca hash" in led["p_hash_copy"]["detail"]
    assert led["q_sscd_copy"]["reason"] == "copy_duplicate" and led["q_sscd_copy"]["detail"].startswith("duplicate of o ")
    assert led["r1"]["reason"] == led["r2_hash_copy"]["reason"] == "eval_contamination"
    assert "evaluation image eval/ev/e (cosine 0.500)" in led["r1"]["detail"]
    assert led["r2_hash_copy"]["detail"].endswith("(cosine 0.200, joined through its duplicates)")
    assert sum(not r["kept"] for r in led.values()) == 4
    comp = {r["key"]: r for r in pq.read_table(root / "dedup" / "components.parquet").to_pylist()}
    assert comp["o"]["component"] == comp["q_sscd_copy"]["component"] and comp["o"]["component_size"] == 3


def test_eval_copies_removed_at_hash_level_count_as_contamination(tmp_path):
    """An evaluation image's pool copy, its exact twin and its half-size copy: all three eval_contamination (before,
    the hash stage dropped the twin as exact_duplicate and the small copy as near_duplicate).  A pool-only exact
    pair is still an exact_duplicate.  Real sscd stage (pixels descriptor)."""
    evald = tmp_path / "eval"
    evald.mkdir()
    ev = _photo(1)
    ev.save(evald / "flower.jpg", quality=95)
    _photo(2).save(evald / "china.jpg", quality=95)  # an eval image with no copy in the pool
    copy_bytes = _jpeg(ev, 80)
    images = [(f"{i:010d}", _jpeg(_filler(700 + i))) for i in range(40)]
    images += [("c1", copy_bytes), ("c2_twin", copy_bytes), ("c3_half", _jpeg(half(ev), 85)),
               ("u1", _jpeg(_photo(0))), ("u2_twin", _jpeg(_photo(0)))]
    root, cfg = _run_until_hash(tmp_path, images, dedup={
        "threshold": 0.75, "eval_threshold": 0.6,
        "eval_sets": [{"name": "heldout", "path": str(evald)}]}, sscd={"descriptor": "pixels", "num_workers": 1})
    led = _judge(root, cfg)
    for k in ("c1", "c2_twin", "c3_half"):
        assert led[k]["reason"] == "eval_contamination", (k, led[k])
        assert "evaluation image eval/heldout/flower" in led[k]["detail"]
    assert led["u1"]["kept"] and led["u2_twin"]["reason"] == "exact_duplicate"
    assert led["u2_twin"]["detail"] == "duplicate of u1 (same pixels)"
    assert sum(not r["kept"] for r in led.values()) == 4  # the fillers are untouched
    assert "joined through" not in led["c1"]["detail"]  # its own similarity to the evaluation image is above 0.6
    drops = pq.read_table(root / "stats" / "drops.parquet").to_pylist()
    assert sorted(r["key"] for r in drops if r["reason"] == "eval_contamination") == ["c1", "c2_twin", "c3_half"]


def _families():
    """Three photographs, each with bordered, padded, rotated, half-size and re-encoded copies, and one generated
    image with three same-size edits (JPEG, colour, text).  Keys put every source after its copies, so key order
    never picks it."""
    fams = {}
    for i in range(3):
        src = _photo(i)
        fams[f"f{i}"] = {"src": _jpeg(src), "border": _jpeg(bordered(src)), "pad": _jpeg(padded(src)),
                         "rot": _jpeg(rotated(src)), "half": _jpeg(half(src)), "jpeg": _jpeg(src, 40)}
    g = _filler(42, 240, 180).filter(ImageFilter.GaussianBlur(2))
    fams["g"] = {"src": _jpeg(g), "jpeg": _jpeg(g, 40), "color": _jpeg(ImageEnhance.Color(g).enhance(1.4)),
                 "text": _jpeg(texted(g))}
    images, source_of = [], {}
    for f, members in fams.items():
        for edit, data in members.items():
            key = f"{f}_{'z_src' if edit == 'src' else edit}"
            images.append((key, data))
            source_of[key] = f"{f}_z_src"
    return sorted(images), source_of


def _family_vectors(images, source_of, fillers):
    keys = [k for k, _ in images]
    base = _orthonormal(len(keys) + len(fillers), 128, seed=1)
    vec, nxt = {}, 0
    for k in fillers:
        vec[k], nxt = base[nxt], nxt + 1
    for src in sorted(set(source_of.values())):
        vec[src], nxt = base[nxt], nxt + 1
    for k in keys:
        if k != source_of[k]:
            vec[k], nxt = C * vec[source_of[k]] + np.sqrt(1 - C**2) * base[nxt], nxt + 1
    return vec


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    images, source_of = _families()
    fillers = [(f"{i:010d}", _jpeg(_filler(900 + i))) for i in range(40)]
    tmp = tmp_path_factory.mktemp("families")
    root, cfg = _run_until_hash(tmp, fillers + images)
    vec = _family_vectors(images, source_of, [k for k, _ in fillers])
    return {"root": root, "cfg": cfg, "source_of": source_of, "vec": vec}


def _rerun(family_run, tmp_path, survivor):
    root = tmp_path / "run"
    shutil.copytree(family_run["root"], root)
    (root / "config.yaml").unlink()
    shutil.rmtree(root / "dedup", ignore_errors=True)
    cfg = copy.deepcopy(family_run["cfg"])
    cfg["run_root"] = str(root)
    cfg["dedup"] = {**cfg["dedup"], "survivor": survivor}
    return _judge(root, cfg, family_run["vec"])


def test_the_source_survives_its_bordered_padded_rotated_and_resized_copies(family_run, tmp_path):
    led = _rerun(family_run, tmp_path, "original")
    root, source_of = tmp_path / "run", family_run["source_of"]
    fill = {r["key"]: r["border_fill"] for r in pq.read_table(root / "hash" / "part-00000.parquet").to_pylist()}
    groups = {r["key"]: r["group"] for r in pq.read_table(root / "hash" / "groups.parquet").to_pylist()}
    for key, src in source_of.items():
        if key == src:
            assert led[key]["kept"], key
            continue
        assert not led[key]["kept"] and led[key]["detail"].startswith(f"duplicate of {src} "), (key, led[key])
        want = "near_duplicate" if groups[key] == groups[src] else "copy_duplicate"
        assert led[key]["reason"] == want, (key, led[key])
        if key.endswith(("border", "pad", "rot")):
            assert led[key]["reason"] == "copy_duplicate" and fill[key] >= fill[src] + 0.1, (key, fill[key], fill[src])
    assert all(led[k]["kept"] for k in led if k not in source_of)  # fillers
    assert sum(groups[f"f{i}_jpeg"] == groups[f"f{i}_z_src"] for i in range(3)) >= 2  # re-encodes are hash-near


def test_largest_resolution_rule_keeps_a_larger_canvas_copy(family_run, tmp_path):
    """The plain rule (before this change): the bordered or rotated copy has the largest canvas and wins over its
    source; same-size edits go by smallest key, so a copy wins there too."""
    led = _rerun(family_run, tmp_path, "resolution")
    for i in range(3):
        kept = [k for k in led if k.startswith(f"f{i}_") and led[k]["kept"]]
        assert kept in ([f"f{i}_border"], [f"f{i}_rot"]), kept
    assert led["g_color"]["kept"] and not led["g_z_src"]["kept"]


def test_pairs_keep_their_source_when_the_copy_is_bordered_padded_rotated_or_smaller(tmp_path):
    """Source + one copy: a pair's medoid is a tie, so border fill and resolution decide.  Each source is a tile of a
    photograph; copy keys sort before their sources.  A same-size re-encode at quality 40 loses to its quality-90
    source by the JPEG quantisation tables (before, the smaller key won)."""
    edits = {"border": bordered, "pad": padded, "rot": rotated, "half": half}
    images, pairs = [], []
    for n in range(8):
        im = Image.open(PHOTOS[n // 4]).convert("RGB")
        w, h = im.size
        tx, ty = n % 2, (n // 2) % 2
        tile = im.crop((tx * w // 2, ty * h // 2, (tx + 1) * w // 2, (ty + 1) * h // 2))
        edit = list(edits)[n % 4]
        src, cp = f"p{n}_b_src", f"p{n}_a_{edit}"
        images += [(src, _jpeg(tile)), (cp, _jpeg(edits[edit](tile)))]
        pairs.append((src, cp))
    tile = _photo(2).crop((0, 0, 160, 120))
    images += [("p8_b_src", _jpeg(tile)), ("p8_a_jpeg", _jpeg(tile, 40))]
    fillers = [(f"{i:010d}", _jpeg(_filler(1100 + i))) for i in range(40)]
    root, cfg = _run_until_hash(tmp_path, fillers + sorted(images))
    source_of = {k: k.split("_")[0] + "_b_src" for k, _ in images}
    led = _judge(root, cfg, _family_vectors(sorted(images), source_of, [k for k, _ in fillers]))
    for src, cp in pairs:
        assert led[src]["kept"] and not led[cp]["kept"], (src, cp, led[cp])
        assert led[cp]["detail"].startswith(f"duplicate of {src} ")
    assert led["p8_b_src"]["kept"] and not led["p8_a_jpeg"]["kept"]


# ---------------------------------------------------------------------------------------------------------------
def test_a_shard_of_duplicates_and_an_empty_pool_run_through(tmp_path):
    """A shard whose images are all duplicates of another shard's (before: the hash stage dropped
    them all and sscd failed with ZeroDivisionError on the empty unit).  Every stage accepts an empty unit."""
    anchors = tmp_path / "anchors" / "c0"
    anchors.mkdir(parents=True)
    for i in range(3):
        _filler(300 + i).save(anchors / f"a{i}.jpg")
    originals = [(f"{i:010d}", _jpeg(_filler(100 + i))) for i in range(30)]
    twins = [(f"{i + 30:010d}", data) for i, (_, data) in enumerate(originals)]
    cfg = make_run(tmp_path, originals + twins, shard_size=30,
                   stages=["filter", "hash", "sscd", "dedup", "embed", "retrieve", "shards"],
                   filter={"detector": "none", "min_side": 32},
                   dedup={"threshold": 0.75, "eval_threshold": 0.6}, sscd={"descriptor": "pixels", "num_workers": 1},
                   retrieve={"anchor_sets": [{"name": "a", "path": str(tmp_path / "anchors"), "method": "sample",
                                              "k": 2}]})
    run_pipeline(load_config(data=copy.deepcopy(cfg)), progress=False)
    root = tmp_path / "run"
    led = {r["key"]: r for r in accounting.read_ledger(root, "dedup").to_pylist()}
    assert [led[k]["reason"] for k, _ in twins] == ["exact_duplicate"] * 30
    assert all(led[k]["kept"] for k, _ in originals)
    keys, vecs = load_descriptors([root / "embed" / "pool" / "part-00001.parquet"])
    assert keys == [] and pq.read_table(root / "embed" / "pool" / "part-00001.parquet").num_rows == 0
    accounting.check_invariants(root)

    # everything dropped at download: one empty shard, every later stage runs on nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg2 = make_run(empty, [], dropped=["0000000000", "0000000001"], stages=cfg["stages"],
                    filter=cfg["filter"], dedup=cfg["dedup"], sscd=cfg["sscd"], retrieve=cfg["retrieve"])
    from curation.pipeline.storage import TarShardWriter

    with TarShardWriter(empty / "run" / "download" / "00000.tar"):
        pass
    accounting.write_ledger(empty / "run", "download", "00000", accounting.make_ledger(
        "download", ["0000000000", "0000000001"], ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"],
        ["http_error", "timeout"]))
    run_pipeline(load_config(data=cfg2), progress=False)
    funnel = {r["stage"]: (r["rows_in"], r["kept"]) for r in pq.read_table(empty / "run" / "stats" /
                                                                          "funnel.parquet").to_pylist()}
    assert funnel["download"] == (2, 0) and funnel["dedup"] == (0, 0)
