"""Curate an LVD-142M-style dataset: run the configured stages on Ray (or in-process) and print the funnel.

    python pipelines/curate.py --config pipelines/configs/demo.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipelines/curate.py --config my_run.yaml

Every stage reads the previous stage's files under the run root and writes its own; rerunning skips finished
shards, so a killed run is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from curation.deps import require_dependencies  # noqa: E402 - standard library only

require_dependencies()  # a job started with a Python that lacks lvd's packages: one line, not a traceback

from curation.config import ConfigError, load_config  # noqa: E402
from curation.stages import stage_order  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="curate.py",
        description=__doc__.split("\n\n")[0],
        epilog="Outputs: RUN/<stage>/..., RUN/stats/funnel.parquet and drops.parquet, RUN/stats/report.html. "
        "See README.md for the layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, type=Path, help="curation YAML config (see pipelines/configs/)")
    p.add_argument("--run-root", type=Path, help="override run_root (use an absolute path under ray job submit)")
    p.add_argument(
        "--stages", help=f"comma-separated subset of the config's stages to run, in pipeline order: "
        f"{','.join(stage_order())}",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override one config value, e.g. --set download.threads=64 (repeatable; values are YAML)",
    )
    p.add_argument("--local", action="store_true", help="run shard tasks in this process instead of on Ray")
    p.add_argument("--ray-address", help="Ray address (default: RAY_ADDRESS, else an in-process Ray)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print errors and warnings about likely mistakes, and exit "
                   "(status 2 on an error)")
    p.add_argument("--show-config", action="store_true",
                   help="with --check: also print the resolved config (every key, defaults included), after the "
                   "errors and warnings")
    p.add_argument("--retry-failed", action="store_true",
                   help="fetch again the URLs dropped for a transient reason (network_error, timeout, HTTP 429 or "
                   "5xx) and redo the later stages where they depend on them; the other rows are kept as they are")
    p.add_argument("--verify", action="store_true",
                   help="on resume, check the content hash of every finished output (sizes are always checked)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    return p


def run_summary(summaries: dict) -> str:
    """One line for the whole run: units run and skipped, and the seconds of each stage."""
    ran = sum(s["ran"] for s in summaries.values())
    skipped = sum(s["skipped"] for s in summaries.values())
    seconds = sum(s["seconds"] for s in summaries.values())
    times = ", ".join(f"{name} {s['seconds']:.1f}" for name, s in summaries.items())
    return f"ran {ran} units of {len(summaries)} stages ({skipped} already complete) in {seconds:.1f} s: {times}"


def main(argv=None) -> int:
    from curation.pipeline.signals import ctrl_c_stops

    ctrl_c_stops()  # also when started from a background job, which inherits SIGINT ignored
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: every finished unit is kept, the rerun resumes
        print("\ninterrupted; rerun to resume", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.run_root:
        overrides.append(f"run_root={args.run_root}")
    if args.local:
        overrides.append("ray.local=true")
    if args.ray_address:
        overrides.append(f"ray.address={args.ray_address}")
    try:
        cfg = load_config(args.config, overrides)
        stages = None
        if args.stages:
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            unknown = [s for s in stages if s not in stage_order()]
            if unknown:
                raise ConfigError(f"config error: --stages: unknown stage(s) {unknown}; known: {list(stage_order())}")
            stages = sorted(stages, key=stage_order().index)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    if args.check:
        from curation.checks import preflight_warnings
        from curation.config import dump_config
        from curation.models.detectors import detection_warning
        from curation.data.urllists import check_url_lists

        from curation.data.samples import image_set_problems

        problems = check_url_lists(cfg.input) + image_set_problems(cfg, stages or cfg.stages)
        for line in problems:  # unreadable URL files or image sets, a missing url column: one line each, first
            print(line, file=sys.stderr)
        faces = detection_warning(cfg.stages, cfg.filter)
        warnings = ([faces] if faces else []) + preflight_warnings(cfg)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.show_config:
            sys.stderr.flush()
            print(dump_config(cfg))
        elif not problems:
            print(f"config ok: {args.config} ({len(warnings)} warnings; --show-config prints it resolved)")
        return 2 if problems else 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from curation.pipeline import accounting
    from curation.pipeline.layout import RunLayout
    from curation.pipeline.runner import StageFailed, run_pipeline

    try:
        summaries = run_pipeline(cfg, stages, progress=not args.no_progress, verify=args.verify,
                                 retry_failed=args.retry_failed)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    except (StageFailed, accounting.AccountingError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    layout = RunLayout(Path(cfg.run_root).resolve())
    root = layout.root
    funnel, drops = accounting.update_stats(root)
    print("\nFunnel (rows in, kept, dropped per stage):")
    print(accounting.format_funnel(funnel, drops))
    print(run_summary(summaries))
    print(f"\nOutputs under {root}: stats/funnel.parquet, stats/drops.parquet", end="")
    if layout.shards_dir.exists():
        print(f", shards/ ({len(list(layout.shards_dir.glob('*.tar')))} tar shards)", end="")
    if layout.report_html.exists():
        print(f", report {layout.report_html}", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
