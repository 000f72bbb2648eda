"""`lvd report RUN`: a static HTML page of a run's statistics, ``RUN/stats/report.html``, with PNG plots beside it.

Everything comes from the run's tables (paths from :class:`curation.pipeline.layout.RunLayout`), so the page can be rebuilt
at any time (:func:`build_report` for ``lvd report``; the report stage calls :func:`write_report` directly):

* the funnel (``stats/funnel.parquet``) and drops by stage and reason (``stats/drops.parquet``);
* dedup component sizes (``stats/component_sizes.parquet``, when the dedup stage wrote it);
* per anchor set: retrieval statistics (``stats/retrieval_stats.parquet``; a set whose similarities are all ~1.0 is
  flagged as degenerate retrieval: a collapsed or random embedder), a histogram of similarities (neighbours
  of sample-based sets, best-anchor similarity of cluster-based ones), cluster sizes (``stats/cluster_stats.parquet``);
* what curation did (:func:`curation_section_html`): per anchor set the share of its selection from each source
  and cluster, and the embedder's leave-one-out k-NN on each labelled evaluation set;
* a curation ablation (:func:`ablation_section_html`, when ``stats/ablation.parquet`` is there): the same training
  recipe on the curated shards and on a random pool subset of the same size, k-NN on a labelled evaluation set;
* image grids: ``report.grid_anchors`` random anchors of each searched set beside their ``report.grid_neighbors``
  best retrieved pool images, with similarities (pool images read by offset through :mod:`curation.data.tarindex`).

* why images were dropped: the descriptors and weights used (a banner at the top, demo-only ones flagged), and per
  drop reason its rule and example images (``stats/example_<key>.jpg``), a duplicate beside its survivor, each
  linked to its source URL and titled with its key.

The page loads only relative links (``report.html``, ``*.png`` and ``*.jpg`` in the same folder), no scripts, no
network; the only absolute links are the example images' source URLs, followed only when clicked.
"""

from __future__ import annotations

import argparse
import html
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curation.pipeline.layout import RunLayout
from schemas.tables import SCHEMAS

PLOTS = ("funnel", "drops", "components", "similarity", "clusters")


def _read(path: Path):
    return pq.read_table(path).to_pandas() if path.exists() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    from curation.pipeline.storage import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    write_bytes(path, buf.getvalue())
    return path.name


def plot_funnel(funnel, out: Path) -> str | None:
    if funnel is None or not len(funnel):
        return None
    plt = _plt()
    f = funnel.sort_values("order")
    labels = ["input"] + list(f["stage"])
    values = [int(f["rows_in"].iloc[0])] + [int(v) for v in f["kept"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1))
    bars = ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    for b, v in zip(bars, values[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:,}", va="center")
    ax.set_xlabel("images kept after each stage")
    ax.set_title("Funnel")
    return _save(fig, out / "funnel.png")


def plot_drops(drops, out: Path) -> str | None:
    if drops is None or not len(drops):
        return None
    plt = _plt()
    c = drops.groupby(["stage", "reason"]).size().sort_values()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(c) + 1))
    ax.barh([f"{s}: {r}" for s, r in c.index], c.values, color="#dd8452")
    for i, v in enumerate(c.values):
        ax.text(v, i, f" {v:,}", va="center")
    ax.set_xlabel("dropped images")
    ax.set_title("Drops by stage and reason")
    return _save(fig, out / "drops.png")


def plot_components(comp, out: Path) -> str | None:
    if comp is None or not len(comp):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(comp))  # one bar per size, evenly spaced; numeric positions (string categories make
    ax.bar(x, comp["components"], color="#55a868")  # matplotlib log "Using categorical units" on every report)
    ax.set_xticks(x, [str(v) for v in comp["component_size"]])
    ax.set_yscale("log")
    ax.set_xlabel("duplicate-component size (images)")
    ax.set_ylabel("components")
    ax.set_title("Dedup component sizes")
    return _save(fig, out / "components.png")


def set_similarities(layout: RunLayout) -> dict[str, np.ndarray]:
    """Similarities per anchor set: every neighbour of a sample-based set, the best-anchor similarity of each
    image a cluster-based set selected."""
    out: dict[str, np.ndarray] = {}
    nb = _read(layout.retrieve_neighbors)
    if nb is not None:
        for name, g in nb.groupby("anchor_set"):
            out[name] = g["similarity"].to_numpy(np.float32)
    for d in layout.retrieve_set_dirs():
        selection = layout.retrieve_set_selection(d.name)
        if d.name in out or not selection.exists():
            continue
        s = pq.read_table(selection, columns=["similarity"]).column("similarity").to_numpy(
            zero_copy_only=False)
        s = np.asarray([x for x in s if x is not None and np.isfinite(x)], np.float32)
        if len(s):
            out[d.name] = s
    return out


def plot_similarity(sims: dict[str, np.ndarray], out: Path) -> str | None:
    if not sims:
        return None
    plt = _plt()
    n = len(sims)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3), squeeze=False)
    for ax, (name, s) in zip(axes[0], sims.items()):
        ax.hist(s, bins=30, color="#8172b3")
        ax.set_title(f"{name} (n={len(s):,})")
        ax.set_xlabel("cosine similarity")
    axes[0][0].set_ylabel("pairs")
    return _save(fig, out / "similarity.png")


def plot_clusters(cs, out: Path) -> str | None:
    if cs is None or not len(cs):
        return None
    plt = _plt()
    names = list(dict.fromkeys(cs["anchor_set"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        g = cs[cs["anchor_set"] == name]
        sizes = g["size"].to_numpy()
        bins = np.unique(np.geomspace(1, max(2, sizes.max() + 1), 20).astype(int))
        ax.hist(sizes, bins=bins, color="#937860", label="all clusters")
        ax.hist(sizes[g["selected"].to_numpy() > 0], bins=bins, color="#c44e52", alpha=0.8, label="with selections")
        ax.set_xscale("log")
        ax.set_title(f"{name}: {len(g)} clusters")
        ax.set_xlabel("pool images per cluster")
        ax.legend(fontsize=7)
    return _save(fig, out / "clusters.png")


def _anchor_images(acfg, keys: set[str]) -> dict[str, bytes]:
    from curation.data.samples import iter_image_set

    found = {}
    for s in iter_image_set(acfg.path, acfg.format):
        if s.key in keys:
            found[s.key] = s.data
            if len(found) == len(keys):
                break
    return found


def _thumb(data: bytes | None, size: int):
    from PIL import Image

    from curation.data.images import decode_image
    from curation.models.embedder import resize_center_crop

    if data is None:
        return np.full((size, size, 3), 200, np.uint8)
    try:
        im, _ = decode_image(data)
    except Exception:  # noqa: BLE001 - a grid shows a grey square for an unreadable image
        return np.full((size, size, 3), 200, np.uint8)
    return np.asarray(resize_center_crop(im, size).convert("RGB"), dtype=np.uint8) if isinstance(im, Image.Image) else im


def plot_grids(layout: RunLayout, anchor_sets, rep, seed: int = 0) -> list[tuple[str, str]]:
    """One PNG per searched anchor set of `anchor_sets`: sampled anchors (left column) and their best retrieved
    pool images, sized by `rep` (the report section)."""
    from curation.stages.retrieval_methods import method
    from curation.data.tarindex import MemberReader, image_locations

    nb = _read(layout.retrieve_neighbors)
    grids = []
    for acfg in anchor_sets:
        m = method(acfg.method)
        if not m.reads_pool:  # the set itself, nothing searched
            continue
        if m.neighbors and nb is not None:
            pairs = nb[nb["anchor_set"] == acfg.name].rename(columns={"pool_key": "key"})
        else:
            p = layout.retrieve_set_selection(acfg.name)
            if not p.exists():
                continue
            pairs = pq.read_table(p).to_pandas()
            pairs = pairs[pairs["anchor_key"].notna()]
        if not len(pairs):
            continue
        anchors = sorted(set(pairs["anchor_key"]))
        rng = np.random.default_rng(seed)
        picked = sorted(rng.choice(anchors, min(rep.grid_anchors, len(anchors)), replace=False).tolist())
        rows = []
        for a in picked:
            g = pairs[pairs["anchor_key"] == a].sort_values("similarity", ascending=False).head(rep.grid_neighbors)
            rows.append((a, list(zip(g["key"], g["similarity"]))))
        want = {k for _, r in rows for k, _ in r}
        loc = image_locations(layout.root, layout.pool_tars(), want)
        aimg = _anchor_images(acfg, set(picked))
        plt = _plt()
        ncol = 1 + rep.grid_neighbors
        fig, axes = plt.subplots(len(rows), ncol, figsize=(1.5 * ncol, 1.65 * len(rows)), squeeze=False)
        with MemberReader() as reader:
            for i, (a, nbrs) in enumerate(rows):
                axes[i][0].imshow(_thumb(aimg.get(a), rep.thumb_size))
                axes[i][0].set_title(a if len(a) <= 20 else "..." + a[-18:], fontsize=6, color="#1f4e9c")
                for j in range(rep.grid_neighbors):
                    ax = axes[i][j + 1]
                    if j < len(nbrs):
                        key, sim = nbrs[j]
                        data = reader.read(*loc[key]) if key in loc else None
                        ax.imshow(_thumb(data, rep.thumb_size))
                        ax.set_title(f"{sim:.3f}", fontsize=7)
                for ax in axes[i]:
                    ax.axis("off")
        fig.suptitle(f"{acfg.name}: anchors and retrieved pool images (cosine similarity)", fontsize=8)
        grids.append((acfg.name, _save(fig, layout.stats_dir / f"grid_{acfg.name}.png")))
    return grids


# ------------------------------------------------------------------------------------- what curation did
def selection_shares(layout: RunLayout, top_clusters: int = 10):
    """Per anchor set, the share of its selection from each source (the URL's host; ``anchors/<set>`` for images
    of an as-is set) and, for cluster-based sets, from each cluster (the `top_clusters` largest, the rest as one
    row): columns anchor_set, by, value, images, share.  None without ``retrieve/selection.parquet``."""
    import pandas as pd
    from urllib.parse import urlsplit

    sel = _read(layout.retrieve_selection)
    if sel is None or not len(sel):
        return None
    rows = []
    for name, g in sel.groupby("anchor_set", sort=True):
        n = len(g)
        src = [s if s != "pool" else (urlsplit(u).netloc or "(no host)") if isinstance(u, str) else "(no url)"
               for s, u in zip(g["source"], g["url"])]
        for value, count in pd.Series(src).value_counts().items():
            rows.append({"anchor_set": name, "by": "source", "value": str(value), "images": int(count),
                         "share": count / n})
        clusters = g["cluster"].dropna()
        if len(clusters):
            counts = clusters.astype("int64").value_counts()
            for value, count in counts.iloc[:top_clusters].items():
                rows.append({"anchor_set": name, "by": "cluster", "value": str(value), "images": int(count),
                             "share": count / n})
            rest = int(counts.iloc[top_clusters:].sum())
            if rest:
                rows.append({"anchor_set": name, "by": "cluster",
                             "value": f"{len(counts) - top_clusters} other clusters", "images": rest,
                             "share": rest / n})
    return pd.DataFrame(rows)


def loo_knn_top1(X: np.ndarray, labels: list, k: int = 20, T: float = 0.07) -> float:
    """Leave-one-out weighted k-NN top-1 (cosine similarity, weights exp(s / T), DINO's evaluation) of the rows of
    `X` with their `labels`: each image classified by its k nearest other images."""
    X = np.asarray(X, np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    _, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    n, c = len(y), int(y.max()) + 1 if len(y) else 0
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    correct = 0
    for start in range(0, n, 1024):
        s = X[start:start + 1024] @ X.T
        s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf  # not itself
        idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
        w = np.exp(np.take_along_axis(s, idx, 1) / T - 1 / T)
        votes = np.zeros((len(s), c))
        np.add.at(votes, (np.repeat(np.arange(len(s)), k), y[idx].ravel()), w.ravel())
        correct += int((votes.argmax(1) == y[start:start + len(s)]).sum())
    return correct / n


def eval_set_knn(layout: RunLayout, eval_sets=(), k: int = 20, T: float = 0.07):
    """Per evaluation set with labels (class folders), the embedder's leave-one-out k-NN top-1 on its embeddings
    (``embed/eval/<set>``) and its binomial standard deviation: columns eval_set, images, classes, knn_top1,
    binomial_sd.  None when no set has both embeddings and at least two classes."""
    import pandas as pd

    from curation.data.samples import iter_image_set
    from curation.data.vectors import load_descriptors

    rows = []
    for es in eval_sets:
        parts = layout.vectors_parts("embed", "eval", es.name)
        if not parts:
            continue
        cls = {s.key: s.meta.get("class") for s in iter_image_set(es.path, getattr(es, "format", "auto"))}
        keys, X = load_descriptors(parts)
        have = [i for i, key in enumerate(keys) if cls.get(key) is not None]
        labels = [cls[keys[i]] for i in have]
        if len(set(labels)) < 2:
            continue
        acc = loo_knn_top1(X.reshape(len(keys), -1)[have], labels, k, T)
        rows.append({"eval_set": es.name, "images": len(have), "classes": len(set(labels)), "knn_top1": acc,
                     "binomial_sd": float(np.sqrt(acc * (1 - acc) / len(have)))})
    return pd.DataFrame(rows) if rows else None


def curation_section_html(shares, knn) -> str:
    """The report's "What curation did" section: selection shares per anchor set, and the embedder's k-NN."""
    parts = ["<h2 id='what-curation-did'>What curation did</h2>",
             "<p>Share of each anchor set's selection by source (URL host) and by cluster.</p>",
             _table_html(shares)]
    if knn is not None:
        parts += ["<p id='embedder-knn'>The embedder's leave-one-out weighted k-NN (k=20, T=0.07) top-1 on each "
                  "labelled evaluation set, with its binomial standard deviation.</p>", _table_html(knn)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------- a curation ablation's table
#: ``stats/ablation.parquet`` (schema ``ablation`` in schemas/tables.py), written by a curation ablation
#: (bench/curation_ablation.py :func:`write_ablation`) into the run whose shards it trained on
ABLATION = "ablation"
ABLATION_SCHEMA = SCHEMAS[ABLATION]


def binomial_sd(p, n: int):
    """The binomial standard deviation sqrt(p (1 - p) / n) of an accuracy p measured on n images."""
    p = np.asarray(p, dtype=np.float64)
    return np.sqrt(p * (1 - p) / n)


def ablation_summary(runs):
    """The ablation table: one row per seed, then the mean over seeds.  Each accuracy with its binomial standard
    deviation on the evaluation set's images; ``difference`` = curated - random with the standard deviation of a
    difference of two such accuracies (``difference_sd``, their binomial deviations in quadrature) and the
    difference in those units (``z``).  The mean row's ``seed_se`` is the standard error of the mean difference
    over seeds (their spread / sqrt(seeds), training noise the binomial deviation does not hold), and its ``z``
    divides by both in quadrature.  ``runs``: the rows of :data:`ABLATION_SCHEMA` (a DataFrame)."""
    import pandas as pd

    runs = runs.sort_values("seed")
    n = int(runs["eval_images"].iloc[0])
    c, r, raw = (runs[f"{a}_knn_top1"].to_numpy(np.float64) for a in ("curated", "random", "raw_pixels"))
    d = c - r
    k = len(runs)
    seed_se = float(np.std(d, ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
    rows = [(str(s), int(t), ci, ri, ri_raw, sc, sr, float("nan"))
            for s, t, ci, ri, ri_raw, sc, sr in zip(runs["seed"], runs["train_images"], c, r, raw,
                                                    runs["curated_target_share"], runs["random_target_share"])]
    rows.append((f"mean of {k}", int(runs["train_images"].mean().round()), float(c.mean()), float(r.mean()),
                 float(raw.mean()), float(runs["curated_target_share"].mean()),
                 float(runs["random_target_share"].mean()), seed_se))
    out = pd.DataFrame(rows, columns=["seed", "train_images", "curated", "random", "raw_pixels",
                                      "curated_target_share", "random_target_share", "seed_se"])
    for arm in ("curated", "random", "raw_pixels"):
        out[f"{arm}_sd"] = binomial_sd(out[arm].to_numpy(), n)
    out["difference"] = out["curated"] - out["random"]
    out["difference_sd"] = np.hypot(out["curated_sd"], out["random_sd"])
    spread = np.where(np.isnan(out["seed_se"]), 0.0, out["seed_se"])
    out["z"] = out["difference"] / np.hypot(out["difference_sd"], spread)
    return out[["seed", "train_images", "curated_target_share", "random_target_share", "curated", "curated_sd",
                "random", "random_sd", "difference", "difference_sd", "seed_se", "z", "raw_pixels",
                "raw_pixels_sd"]]


def ablation_section_html(layout: RunLayout) -> str:
    """The report's "Curation ablation" section, from the run's ``stats/ablation.parquet`` ("" when absent)."""
    path = layout.stats(ABLATION)
    if not path.exists():
        return ""
    from curation.pipeline.storage import read_table

    runs = read_table(path, ABLATION_SCHEMA).to_pandas()
    if not len(runs):
        return ""
    summary = ablation_summary(runs)
    mean = summary.iloc[-1]
    eval_set, n = html.escape(str(runs["eval_set"].iloc[0])), int(runs["eval_images"].iloc[0])
    verdict = ("curated beat" if mean["difference"] > 0 else "curated did not beat") + \
        f" the random subset by {mean['difference']:+.3f} k-NN top-1, {mean['z']:.1f} standard deviations"
    return "\n".join([
        "<h2 id='curation-ablation'>Curation ablation</h2>",
        f"<p>The same training recipe on this run's curated shards and on a random pool subset of the same size, "
        f"one row per training seed: the trained teacher's weighted k-NN top-1 on the {n:,} labelled held-out "
        f"images of evaluation set <code>{eval_set}</code>, each +- its binomial standard deviation "
        "sqrt(p (1 - p) / n); raw pixels for reference; target share: the share of each training set from the "
        f"target domain. Mean of the seeds: <b>{html.escape(verdict)}</b> (the mean row's z also counts the "
        "seeds' spread).</p>", _table_html(summary)])


# ---------------------------------------------------------------------------------------------- why: the rules
#: per drop reason, the rule that dropped the image, in words; {section.key} is filled from the run's config
RULES = {
    "bad_url": "the URL is malformed or not http(s)",
    "duplicate_url": "the same URL as an earlier row, which is the one kept",
    "blocked_domain": "the host (or a redirect's) is on download.blocklist_file",
    "private_address": "the host is a private, loopback, link-local or metadata address outside "
                       "download.allow_networks",
    "bad_redirect": "a redirect to a URL that is not http(s)",
    "redirect_loop": "a redirect back to a URL of the same chain",
    "too_many_redirects": "a longer redirect chain than the downloader follows",
    "opted_out": "the server sent X-Robots-Tag noai / noimageai",
    "http_error": "the server answered with an error status (429 and 5xx: retried by --retry-failed)",
    "timeout": "no answer within download.timeout_s = {download.timeout_s} s (retried by --retry-failed)",
    "network_error": "the connection failed (refused, reset, DNS; retried by --retry-failed)",
    "empty": "the server sent zero bytes",
    "too_large_file": "more than download.max_bytes = {download.max_bytes} bytes",
    "undecodable": "not an image the decoder can read",
    "truncated": "the image data ends early",
    "decompression_bomb": "more pixels than images.max_image_pixels = {images.max_image_pixels}",
    "animated": "more than one frame",
    "unsupported_mode": "a pixel format that cannot be converted to RGB",
    "too_small": "shorter side below filter.min_side = {filter.min_side} px",
    "bad_aspect": "long side / short side above filter.max_aspect = {filter.max_aspect}",
    "nsfw": "the NSFW detector's score above its threshold",
    "exact_duplicate": "the same decoded pixels as the image dedup kept (right)",
    "near_duplicate": "in the hash group of the image dedup kept (right): hash codes within "
                      "hash.hamming_threshold = {hash.hamming_threshold} bits",
    "copy_duplicate": "a copy of the image dedup kept (right), joined through SSCD cosine above "
                      "dedup.threshold = {dedup.threshold}",
    "eval_contamination": "in a duplicate component with an evaluation image (dedup.eval_threshold = "
                          "{dedup.eval_threshold}): no pool image of it is kept",
    "embed_failed": "the embedder could not decode the image",
    "not_selected": "no anchor set retrieved it",
}
#: example images shown per drop reason
EXAMPLES_PER_REASON = 6


def _config_dict(layout: RunLayout) -> dict:
    import yaml

    try:
        return yaml.safe_load(layout.config_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def rule_text(reason: str, cfg: dict) -> str:
    import re

    def value(m):
        section, key = m.group(1).split(".", 1)
        v = (cfg.get(section) or {}).get(key)
        return "?" if v is None else str(v)

    return re.sub(r"\{([a-z_]+\.[a-z_]+)\}", value, RULES.get(reason, reason))


def descriptor_lines(cfg: dict) -> list[tuple[str, bool]]:
    """(what the run used, demo-only?) for its copy-detection descriptor and its retrieval embedder."""
    stages = cfg.get("stages") or ()
    sscd, embed = cfg.get("sscd") or {}, cfg.get("embed") or {}
    lines = []
    if "sscd" in stages:
        if sscd.get("descriptor") == "pixels":
            lines.append(("copy detection (dedup): pixels, a weight-free function of the pixels", True))
        elif sscd.get("weights"):
            lines.append((f"copy detection (dedup): SSCD, real weights {sscd['weights']}", False))
        else:
            lines.append(("copy detection (dedup): SSCD with random weights (sscd.weights: null)", True))
    if "embed" in stages:
        model, ckpt = embed.get("model"), embed.get("checkpoint")
        if model == "pixels":
            lines.append(("retrieval embedder: pixels, a weight-free function of the pixels", True))
        elif ckpt:
            lines.append((f"retrieval embedder: {model}, real weights {ckpt}", False))
        else:
            lines.append((f"retrieval embedder: {model} with random weights (embed.checkpoint: null)", True))
    return lines


def descriptor_banner(cfg: dict) -> str:
    """The banner at the top of the page: which descriptors and weights made the duplicate and retrieval verdicts;
    demo-only ones (weight-free or random) flagged, since their verdicts say little about real images."""
    lines = descriptor_lines(cfg)
    if not lines:
        return ""
    demo = any(d for _, d in lines)
    items = "".join(f"<li>{html.escape(text)}"
                    f"{' <b class=demo-only>demo only</b>' if d else ''}</li>" for text, d in lines)
    note = (" Demo-only descriptors are fine for tests and the demo corpus; on real data their duplicate and "
            "retrieval verdicts are meaningless: give real weights.") if demo else ""
    return (f"<div id='descriptors' class='{'warning' if demo else 'banner'}'><b>Descriptors used</b>:"
            f"<ul>{items}</ul>{html.escape(note)}</div>")


def _example_file(out: Path, key: str, data: bytes | None, size: int) -> str | None:
    """A grid thumbnail written beside the page (stats/example_<key>.jpg); its relative link, None without data."""
    from PIL import Image

    from curation.pipeline.storage import write_bytes

    if data is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(_thumb(data, size)).save(buf, "JPEG", quality=85)
    name = f"example_{key}.jpg"
    write_bytes(out / name, buf.getvalue())
    return name


def _figure_image(cls: str, key: str, url: str | None, uri: str | None) -> str:
    """One grid image, linked to its URL, titled with its key (a 'no image' box where none was downloaded)."""
    url = url if isinstance(url, str) else None  # a null cell may come back from pandas as NaN
    label = html.escape(f"key {key}" + (f": {url}" if url else ""))
    if uri is None:
        box = f"<span class='noimage' title='{label}'>no image</span>"
    else:
        box = f"<img class='{cls}' src='{uri}' alt='{label}' title='{label}'>"
    return f"<a href='{html.escape(url or '#')}' title='{label}'>{box}</a>"


def drop_examples_html(layout: RunLayout, drops, cfg: dict, size: int = 80) -> str:
    """Per drop reason (stage order, then the largest first): the rule, and up to EXAMPLES_PER_REASON dropped
    images (smallest keys), each linked to its URL and titled with its key; a duplicate beside the image dedup
    kept instead (its survivor).  Download drops have no image: their key, URL and error stand there."""
    from curation.stages import stage_order
    from curation.data.tarindex import MemberReader, image_locations

    if drops is None or not len(drops):
        return ""
    groups = drops.groupby(["stage", "reason"]).size().reset_index(name="n")
    groups["order"] = [stage_order().index(s) for s in groups["stage"]]
    groups = groups.sort_values(["order", "n"], ascending=[True, False])
    picked = {(r.stage, r.reason): drops[(drops["stage"] == r.stage) & (drops["reason"] == r.reason)]
              .sort_values("key").head(EXAMPLES_PER_REASON) for r in groups.itertuples()}
    survivor_keys = {}
    if "dedup" in set(drops["stage"]):
        from curation.pipeline.accounting import survivors

        survivor_keys = dict(zip(*(survivors(layout.root).column(c).to_pylist() for c in ("key", "survivor_key"))))
    # where each image is: what filter dropped is in the download tars, what later stages dropped in the pool's
    wanted = {"filter": set(), "later": set()}
    for (stage, _), rows in picked.items():
        if stage == "download":
            continue
        keys = set(rows["key"]) | {survivor_keys[k] for k in rows["key"] if k in survivor_keys}
        wanted["filter" if stage == "filter" else "later"] |= keys
    loc = {}
    if wanted["filter"]:
        loc.update(image_locations(layout.root, layout.pool_tars("filter"), wanted["filter"]))
    if wanted["later"]:
        loc.update(image_locations(layout.root, layout.pool_tars("dedup"), wanted["later"]))
    parts = ["<h2 id='drop-examples'>Why images were dropped: examples per reason</h2>"]
    for old in layout.stats_dir.glob("example_*.jpg"):  # an earlier report's examples
        old.unlink(missing_ok=True)
    with MemberReader() as reader:
        def uri(key):
            return _example_file(layout.stats_dir, key, reader.read(*loc[key]), size) if key in loc else None

        for r in groups.itertuples():
            rows = picked[(r.stage, r.reason)]
            parts.append(f"<h3 id='drops-{r.stage}-{r.reason}'>{r.stage}: {html.escape(r.reason)} ({r.n:,})</h3>"
                         f"<p class='rule'>Rule: {html.escape(rule_text(r.reason, cfg))}</p><div class='examples'>")
            for d in rows.itertuples():
                cells = [_figure_image("dropped", d.key, d.url, uri(d.key) if r.stage != "download" else None)]
                skey = survivor_keys.get(d.key) if r.stage == "dedup" else None
                if skey is not None:
                    surl = getattr(d, "survivor_url", None)
                    cells.append("<span class='arrow'>kept instead:</span>"
                                 + _figure_image("survivor", skey, surl, uri(skey)))
                detail = html.escape(str(d.detail)[:160]) if isinstance(d.detail, str) else ""
                parts.append(f"<figure class='drop'><div class='pair'>{''.join(cells)}</div>"
                             f"<figcaption>key {html.escape(d.key)}"
                             f"<br>{detail}</figcaption></figure>")
            parts.append("</div>")
    return "\n".join(parts)


def _table_html(df, floatfmt="{:.3f}") -> str:
    if df is None or not len(df):
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append("" if np.isnan(v) else floatfmt.format(v))
            else:
                cells.append(html.escape(str(v)))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd;margin:4px 0}h2{border-bottom:1px solid #ccc}
.warning{background:#fde8e8;border:1px solid #d33;padding:6px 10px}
.banner{background:#eef4fb;border:1px solid #7aa7d8;padding:6px 10px}.demo-only{color:#b00}
.examples{display:flex;flex-wrap:wrap;gap:8px}figure.drop{margin:0;padding:4px;border:1px solid #ddd;font-size:11px;
max-width:320px}figure.drop img{margin:0 2px}.pair{display:flex;align-items:center}
.noimage{display:inline-block;width:80px;height:80px;background:#eee;color:#888;text-align:center;line-height:80px}.arrow{font-size:10px;color:#555;margin:0 2px}.rule{color:#444}"""


def build_report(root: str | Path, cfg=None) -> Path:
    """Write RUN/stats/report.html and its PNGs for the run at `root`, whose config (default: its config.yaml)
    names the anchor sets of the image grids; return the page's path."""
    root = Path(root)
    if cfg is None and RunLayout(root).config_file.exists():
        from curation.config import ConfigError, load_config

        try:
            cfg = load_config(RunLayout(root).config_file)
        except ConfigError as err:  # e.g. anchor folders moved: the page is built without image grids
            print(f"lvd report: no image grids ({err})", file=sys.stderr)
    if cfg is None:
        return write_report(RunLayout(root))
    return write_report(RunLayout.of(cfg, root), cfg.retrieve.anchor_sets, cfg.report, cfg.seed,
                        cfg.dedup.eval_sets)


def write_report(layout: RunLayout, anchor_sets=(), rep=None, seed: int = 0, eval_sets=()) -> Path:
    """Write the run's report page and its PNGs; image grids of `anchor_sets` under `rep` (the report section;
    None: no grids); the embedder's k-NN on the labelled `eval_sets`.  Returns the page's path."""
    import json

    from curation.pipeline.storage import write_text

    out = layout.stats_dir
    out.mkdir(parents=True, exist_ok=True)
    tables = {name: _read(layout.stats(name))
              for name in ("funnel", "drops", "retrieval_stats", "cluster_stats", "component_sizes")}
    imgs = {
        "funnel": plot_funnel(tables["funnel"], out), "drops": plot_drops(tables["drops"], out),
        "components": plot_components(tables["component_sizes"], out),
        "similarity": plot_similarity(set_similarities(layout), out),
        "clusters": plot_clusters(tables["cluster_stats"], out),
    }
    grids = plot_grids(layout, anchor_sets, rep, seed) if rep is not None else []
    manifest = json.loads(layout.shards_manifest.read_text()) if layout.shards_manifest.exists() else None
    curation = curation_section_html(selection_shares(layout), eval_set_knn(layout, eval_sets))
    cfg = _config_dict(layout)
    top, why = why_sections(layout, cfg, tables["drops"], rep.thumb_size if rep is not None else 80)
    sections = [curation, ablation_section_html(layout)]
    write_text(layout.report_html, page_html(str(layout.root), manifest, tables, imgs, grids, sections, top=top,
                                             why=why))
    return layout.report_html


def why_sections(layout: RunLayout, cfg: dict, drops, size: int) -> tuple[str, str]:
    """(HTML for the top of the page: an unfinished run's line and the descriptor banner; the per-reason example
    grids, after the drops table)."""
    from curation.pipeline.accounting import unfinished_line

    unfinished = unfinished_line(layout.root, ignore=("report",))  # the report stage is the one writing this
    top = f"<p class='warning' id='unfinished'>{html.escape(unfinished)}</p>" if unfinished else ""
    return top + descriptor_banner(cfg), drop_examples_html(layout, drops, cfg, size)


def page_html(root: str, manifest: dict | None, tables: dict, imgs: dict, grids: list[tuple[str, str]],
              more: list[str] = (), top: str = "", why: str = "") -> str:
    """The report page: the dataset line (from the shards `manifest`), then a section per table with its plot
    (`imgs`: plot name -> PNG file name or None), the image grids ((set, PNG file name)) and `more` sections
    (HTML)."""
    from curation.engine.retrieval import degenerate_sets

    funnel, drops, stats = tables["funnel"], tables["drops"], tables["retrieval_stats"]
    cs, comp = tables["cluster_stats"], tables["component_sizes"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lvd report: {html.escape(root)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Curation report</h1><p>run root <code>{html.escape(root)}</code></p>", top]
    if manifest is not None:
        parts.append(f"<p>Curated dataset: <b>{manifest['samples']:,}</b> images in {manifest['shards']} shards "
                     f"(<code>shards/{html.escape(manifest['pattern'])}</code>).</p>")

    def section(title, key, extra=""):
        parts.append(f"<h2>{title}</h2>{extra}")
        if imgs.get(key):
            parts.append(f"<img id='plot-{key}' src='{imgs[key]}' alt='{title}'>")
        elif not extra:
            parts.append("<p><em>no data</em></p>")

    section("Funnel", "funnel", _table_html(funnel.sort_values("order").drop(columns=["order"])) if funnel is not None else "")
    dtab = drops.groupby(["stage", "reason"]).size().reset_index(name="images") if drops is not None and len(drops) else None
    section("Drops by reason", "drops", _table_html(dtab))
    parts.append(why)
    if comp is not None:
        section("Duplicate components", "components", _table_html(comp))
    degenerate = degenerate_sets(stats.to_dict("records")) if stats is not None else []
    warn = "".join(f"<p class='warning' id='degenerate-retrieval'><b>Degenerate retrieval</b>: {html.escape(line)}</p>"
                   for line in degenerate)
    section("Retrieval", "similarity", warn + _table_html(stats))
    if cs is not None and len(cs):
        section("Cluster sizes", "clusters")
    if grids:
        parts.append("<h2>Anchors and their retrieved images</h2>")
        for name, png in grids:
            parts.append(f"<h3>{html.escape(name)}</h3><img class='grid' src='{png}' alt='grid {html.escape(name)}'>")
    parts += list(more)
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lvd report", description="write RUN/stats/report.html from a run's tables")
    p.add_argument("run_root", type=Path)
    args = p.parse_args(argv)
    if not args.run_root.exists():
        print(f"lvd report: no such run root: {args.run_root}", file=sys.stderr)
        return 2
    from curation.pipeline.accounting import unfinished_line

    unfinished = unfinished_line(args.run_root)
    if unfinished:  # the report then covers the stages that finished
        print(unfinished, file=sys.stderr)
    page = build_report(args.run_root)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
