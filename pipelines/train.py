"""DINOv2 pretraining entry point.

    python pipelines/train.py --config pipelines/configs/train_demo.yaml --data RUN/shards [--output DIR]
        [--max-steps N | --total-steps N] [key.path=value ...]
    ray job submit --working-dir . -- python pipelines/train.py --config train.yaml --data RUN/shards

The config is validated (pydantic) before any work; a bad key or value fails with one line naming its path.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.deps import require_dependencies  # noqa: E402 - standard library only

require_dependencies("pipelines/train.py")  # a job started with a Python that lacks lvd's packages: one line, not a traceback

from training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
