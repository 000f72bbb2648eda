"""``lvd export``: write a trained backbone in the official DINOv2 layout (see training.models.backbone_io)."""
from __future__ import annotations

import argparse
import os
import pickle
import sys

from .checkpoint import export_backbone

__all__ = ["main"]

#: what `lvd export` says of a file it cannot export: it takes lvd training checkpoints (the DINOv2 trainer's)
NOT_A_CHECKPOINT = "not an lvd or DINOv2 checkpoint"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lvd export",
        description="Export the EMA-teacher backbone of a DINOv2 training checkpoint as a plain state dict with the "
                    "official DINOv2 key names (OUT.pth) plus a JSON sidecar (OUT.json: arch, img_size, patch_size, "
                    "num_register_tokens). Load it with training.models.backbone_io.load_official_checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint_*.pt file, or a training output dir (its newest checkpoint)")
    p.add_argument("-o", "--output", required=True, help="output .pth path (the sidecar goes next to it)")
    p.add_argument("--student", action="store_true", help="export the student instead of the EMA teacher")
    p.add_argument("--role", default=None, help="export this model of the checkpoint instead (e.g. teacher_b: the "
                   "EMA of the further student b of a multi-student distillation; gram_teacher)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.checkpoint):
        print(f"error: {args.checkpoint}: no such checkpoint file or training output dir", file=sys.stderr)
        return 2
    try:
        which = args.role or ("student" if args.student else "teacher")
        out = export_backbone(args.checkpoint, args.output, which=which)
    except (pickle.UnpicklingError, EOFError) as e:  # torch's unpickler on a file that is no checkpoint at all
        print(f"error: {args.checkpoint}: {NOT_A_CHECKPOINT} (unreadable as one: {e})".splitlines()[0],
              file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        text = str(e)
        if "is not an lvd training checkpoint" in text:  # a torch file, but some other one
            text = f"{NOT_A_CHECKPOINT} (a torch file without lvd's checkpoint format)"
        elif "PytorchStreamReader" in text:  # a damaged or foreign zip
            text = f"{NOT_A_CHECKPOINT} (unreadable as one: {text})"
        print(f"error: {args.checkpoint}: {text}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
