"""`make demo`: the whole system on the bundled demo corpus, on one machine, as a user would run it on a cluster.

1. generate the demo corpus (deterministic, a few hundred images and every kind of bad input) and serve it from a
   real HTTP server on 127.0.0.1;
2. start a local Ray head unless RAY_ADDRESS names one;
3. `ray job submit ... pipelines/curate.py --config <demo config>` and stream its log;
4. `ray job submit ... pipelines/train.py` for a short DINOv2 run on the curated shards, exporting a backbone
   that the curation embedder then loads;
5. stop what it started and print the funnel and where everything is.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _absolutise(cfg: dict, out: Path) -> dict:
    """Make the demo config's paths absolute (a Ray job runs in a copy of the repo): `demo-run/...` goes under
    `out`, other relative paths under the repository root."""

    def fix(p):
        if os.path.isabs(p):
            return p
        if p.startswith("demo-run/"):
            return str(out / p[len("demo-run/"):])
        return str((REPO / p).resolve())

    cfg["run_root"] = fix(cfg["run_root"])
    cfg["input"]["url_list"] = fix(cfg["input"]["url_list"])
    for s in cfg.get("dedup", {}).get("eval_sets", []):
        s["path"] = fix(s["path"])
    for s in cfg.get("retrieve", {}).get("anchor_sets", []):
        s["path"] = fix(s["path"])
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "pipelines" / "configs" / "demo.yaml")
    p.add_argument("--train-config", type=Path, default=REPO / "pipelines" / "configs" / "train_demo.yaml")
    p.add_argument("--out", type=Path, default=REPO / "demo-run", help="where the corpus and the run go")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo run first")
    p.add_argument("--no-train", action="store_true", help="stop after curation")
    args = p.parse_args(argv)

    from curation.pipeline import accounting
    from curation.demo.corpus import generate_corpus, write_url_list
    from curation.demo.server import DemoServer
    from curation.cluster.local_cluster import LocalRayHead, RayJobClient

    t0 = time.time()
    out = args.out.resolve()
    if args.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    corpus = out / "corpus"
    if not (corpus / "manifest.parquet").exists():
        print(f"[demo] generating the demo corpus in {corpus}", flush=True)
        generate_corpus(corpus, seed=0, scale=1)

    cfg = yaml.safe_load(args.config.read_text())
    cfg = _absolutise(cfg, out)
    run_root = Path(cfg["run_root"])

    head = None
    with _demo_server(DemoServer, corpus) as server:
        write_url_list(corpus, server.base_url)
        print(f"[demo] serving the corpus at {server.base_url}", flush=True)
        resolved = out / "demo.resolved.yaml"
        resolved.write_text(yaml.safe_dump(cfg, sort_keys=False))
        try:
            address = os.environ.get("RAY_ADDRESS")
            if address:
                if not address.startswith("http"):
                    print("[demo] RAY_ADDRESS must be the dashboard URL (http://HEAD:8265) for job submission")
                    return 2
                client = RayJobClient(address)
                print(f"[demo] using the Ray cluster at {address}", flush=True)
            else:
                print("[demo] starting a local Ray head", flush=True)
                client = head = LocalRayHead().start()
                print(f"[demo] Ray dashboard: {head.dashboard_url}", flush=True)
            rc, _ = client.submit(
                ["python", "pipelines/curate.py", "--config", str(resolved), "--no-progress"],
                working_dir=str(REPO), stream=sys.stdout,
            )
            if rc != 0:
                print(f"[demo] the curation job failed (exit {rc})", file=sys.stderr)
                return rc
            if not args.no_train:
                train_out = run_root / "train"
                rc, _ = client.submit(
                    ["python", "pipelines/train.py", "--config", str(args.train_config.resolve()),
                     "--data", str(run_root / "shards"), "--output", str(train_out),
                     "--export", str(train_out / "backbone.pth")],
                    working_dir=str(REPO), stream=sys.stdout,
                )
                if rc != 0:
                    print(f"[demo] the training job failed (exit {rc})", file=sys.stderr)
                    return rc
        finally:
            if head is not None:
                head.stop()

    if not args.no_train and not _check_export(run_root / "train", run_root / "shards"):
        return 1
    funnel, drops = accounting.update_stats(run_root)
    print("\n[demo] funnel (rows in, kept, dropped per stage):")
    print(accounting.format_funnel(funnel, drops))
    print(f"\n[demo] done in {time.time() - t0:.0f} s. Outputs:")
    for name, what in (("stats/funnel.parquet", "per-stage counts"), ("stats/drops.parquet", "every dropped row"),
                       ("stats/report.html", "the report (open in a browser)"), ("shards", "curated WebDataset"),
                       ("train", "training run: metrics.jsonl, checkpoints, exported backbone")):
        path = run_root / name
        if path.exists():
            print(f"  {path}  - {what}")
    return 0


def _demo_server(server_class, corpus: Path):
    """The corpus server, started on the port of the previous demo run when it is free: a rerun then writes the same
    URL list, which the run root requires to resume (it refuses changed inputs)."""
    from urllib.parse import urlsplit

    import pyarrow.parquet as pq

    port = 0
    if (corpus / "urls.parquet").exists():
        urls = pq.read_table(corpus / "urls.parquet", columns=["url"])["url"].to_pylist()
        port = next((urlsplit(u).port for u in urls if u and u.startswith("http://127.0.0.1:")), None) or 0
    try:
        return server_class(corpus, port=port).start()
    except OSError:
        return server_class(corpus).start()


def _check_export(train_dir: Path, shards: Path) -> bool:
    """Embed a few curated images with the exported backbone through the curation embedder, as a user feeding the
    trained model back into curation would."""
    export = train_dir / "backbone.pth"
    if not export.exists():
        print(f"[demo] the training job wrote no exported backbone at {export}", file=sys.stderr)
        return False
    from curation.config import EmbedConfig
    from curation.models.embedder import build_embedder
    from curation.pipeline.storage import iter_tar_samples

    embedder = build_embedder(EmbedConfig(model="lvd", checkpoint=export, img_size=112, device="cpu"))
    images = []
    for shard in sorted(shards.glob("*.tar")):
        for _key, sample in iter_tar_samples(shard):
            data = next((v for k, v in sample.items() if k in ("jpg", "jpeg", "png", "webp")), None)
            if data is not None:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            if len(images) == 4:
                break
        if len(images) == 4:
            break
    vectors = embedder.embed_images(images)
    print(f"[demo] the curation embedder loads the trained backbone {export}: {len(images)} curated images -> "
          f"{vectors.shape[1]}-d embeddings")
    return True


if __name__ == "__main__":
    sys.exit(main())
