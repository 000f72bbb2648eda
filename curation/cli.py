"""`lvd`: one command for the whole tool.

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

    from curation import accounting
    from curation.layout import RunLayout

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


def _lazy(module: str, func: str = "main"):
    def run(argv):
        import importlib

        return importlib.import_module(module).__getattribute__(func)(argv)

    return run


COMMANDS = {
    "curate": ("run the curation pipeline", _lazy("pipelines.curate")),
    "train": ("train DINOv2 on curated shards", _lazy("training.cli")),
    "export": ("export a trained backbone (official DINOv2 format)", _lazy("training.export")),
    "plot": ("draw training curves to a PNG", _lazy("training.plot")),
    "report": ("write RUN/stats/report.html", _lazy("curation.report")),
    "funnel": ("print a run's funnel", _funnel),
    "serve-demo": ("generate and serve the demo corpus on 127.0.0.1", _lazy("curation.demo.server")),
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
