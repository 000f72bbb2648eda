"""`curate.py --check`: what a valid config would still do wrong, said before any work starts.

The config schema refuses impossible values; these are possible but almost certainly not meant: models that would
run with random weights, URL lists without the URL column, and URLs on loopback/private addresses that the
download refuses unless ``download.allow_networks`` lets them through.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from curation.config import CurateConfig

#: URLs read for the private-address check (the check is a hint, not a scan of a billion-row list)
URL_SAMPLE = 100_000


def _url_column_problems(cfg: CurateConfig) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from curation.stages.download import _url_files

    problems = []
    for f in _url_files(cfg.input.url_list):
        suffix = f.suffix.lower()
        try:
            if suffix == ".parquet":
                names = pq.read_schema(f).names
            elif suffix in (".csv", ".tsv"):
                opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
                with pacsv.open_csv(f, parse_options=opts) as reader:
                    names = reader.schema.names
            else:
                problems.append(f"{f}: URL lists must be .parquet, .csv or .tsv")
                continue
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported by name, in one line
            problems.append(f"{f}: unreadable URL list ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            continue
        if cfg.input.url_col not in names:
            problems.append(f"{f}: no column {cfg.input.url_col!r} (columns: {names}); set input.url_col")
    return problems


def _private_urls(cfg: CurateConfig) -> tuple[int, list[str]]:
    """(how many sampled URLs point at loopback/private hosts the policy refuses, a few examples)."""
    from curation.stages.download import read_url_lists
    from curation.urlsafety import Refused, UrlPolicy

    policy = UrlPolicy.from_config(cfg.download)
    urls = read_url_lists(cfg.input.url_list, cfg.input.url_col, None)["url"].slice(0, URL_SAMPLE).to_pylist()
    hits = []
    for url in urls:
        try:
            policy.check_url(url)
            host = (urlsplit(url).hostname or "").lower().rstrip(".")
            if host == "localhost" or host.endswith(".localhost"):
                hits.append(url)
        except Refused as err:
            if err.reason == "private_address":
                hits.append(url)
        except Exception:  # noqa: BLE001 - malformed URLs are the download's business (bad_url drops)
            pass
    return len(hits), hits[:3]


def preflight_warnings(cfg: CurateConfig) -> list[str]:
    """One line per likely mistake in a valid config (empty when none)."""
    out = []
    stages = set(cfg.stages)
    if "dedup" in stages and cfg.dedup.descriptor == "sscd" and cfg.sscd.weights is None:
        out.append("sscd.weights is null: copy detection would run SSCD with random weights and find no real "
                   "copies (give the official sscd_disc_mixup file, or dedup.descriptor: pixels for tests)")
    if "embed" in stages and cfg.embed.model != "pixels" and cfg.embed.checkpoint is None:
        out.append(f"embed.checkpoint is null: the embedder {cfg.embed.model!r} would run with random weights and "
                   "retrieval would select at chance (give local weights in embed.checkpoint)")
    if "download" in stages:
        columns = _url_column_problems(cfg)
        out += columns
        if not columns and not cfg.download.allow_networks:
            n, examples = _private_urls(cfg)
            if n:
                out.append(f"{n} URLs point at loopback/private addresses (e.g. {', '.join(examples)}) and "
                           "download.allow_networks is empty: every one would be dropped as private_address (allow "
                           "e.g. 127.0.0.1/32 for a local server)")
    return out
