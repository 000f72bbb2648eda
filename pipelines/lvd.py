"""`lvd`: one command for the whole tool; this module owns the command table.

    lvd curate --config run.yaml        run the curation stages (same as pipelines/curate.py)
    lvd train --config t.yaml --data D  train DINOv2 on curated shards (same as pipelines/train.py)
    lvd export ...                      write a trained teacher backbone in the official DINOv2 format
    lvd plot OUT                        draw a training run's curves (losses, lr, accuracy) to OUT/curves.png
    lvd report RUN                      write RUN/stats/report.html
    lvd funnel RUN                      print a run's funnel and drop reasons
    lvd serve-demo --out DIR            generate the demo corpus and serve it on 127.0.0.1
"""

from __future__ import annotations

import sys


def _funnel(argv) -> int:
    import argparse
    from pathlib import Path

    from curation.pipeline import accounting
    from curation.pipeline.layout import RunLayout

    p = argparse.ArgumentParser(prog="lvd funnel", description="print a run's per-stage funnel and drop reasons")
    p.add_argument("run_root", type=Path)
    args = p.parse_args(argv)
    if not RunLayout(args.run_root).config_file.is_file():
        what = "does not exist" if not args.run_root.exists() else "is not a run root (no config.yaml)"
        print(f"lvd funnel: {args.run_root} {what}", file=sys.stderr)
        return 2
    unfinished = accounting.unfinished_line(args.run_root)
    if unfinished:  # first, so it is not missed above a long funnel
        print(unfinished, file=sys.stderr)
    funnel, drops = accounting.update_stats(args.run_root)
    print(accounting.format_funnel(funnel, drops))
    return 0


# Each command imports its module only when it runs: `lvd --help` and `lvd funnel` stay fast, and a curation host
# need not import torch's trainer to print a funnel.
def _curate(argv):
    from pipelines.curate import main as curate

    return curate(argv)


def _train(argv):
    from training.cli import main as train

    return train(argv)


def _export(argv):
    from training.export import main as export

    return export(argv)


def _plot(argv):
    from training.plot import main as plot

    return plot(argv)


def _report(argv):
    from curation.report import main as report

    return report(argv)


def _serve_demo(argv):
    from curation.demo.server import main as serve_demo

    return serve_demo(argv)


COMMANDS = {
    "curate": ("run the curation pipeline", _curate),
    "train": ("train DINOv2 on curated shards", _train),
    "export": ("export a trained backbone (official DINOv2 format)", _export),
    "plot": ("draw training curves to a PNG", _plot),
    "report": ("write RUN/stats/report.html", _report),
    "funnel": ("print a run's funnel", _funnel),
    "serve-demo": ("generate and serve the demo corpus on 127.0.0.1", _serve_demo),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<11} {text}")
        print("\n`lvd COMMAND --help` explains each command's options.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lvd: unknown command {name!r}; try `lvd --help`", file=sys.stderr)
        return 2
    return COMMANDS[name][1](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
