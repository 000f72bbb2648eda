"""`lvd train --total-steps N` fits the schedules to N steps (the lr ends near min_lr at step N), `--max-steps N`
stops the full schedules after N steps; and the messages of `lvd export` on a file that is no checkpoint."""
import copy
import math

import torch
from lvd_train_testutils import TINY_CFG, read_metrics, shards_and_config

from training.cli import main as train_main
from training.export import main as export_main


def test_total_steps_fits_the_schedules_to_the_run(tmp_path):
    cfg = copy.deepcopy(TINY_CFG)
    cfg["optim"].update(epochs=5, iters_per_epoch=4, warmup_epochs=1, freeze_last_layer_epochs=0.5,
                        base_lr=0.002, min_lr=1e-5)  # 20 iterations: warmup 4, last layer frozen 2
    cfg["checkpoint"]["period_iters"] = 100
    data, path = shards_and_config(tmp_path, cfg)
    steps = 10
    assert train_main(["--config", str(path), "--data", str(data), "--output", str(tmp_path / "out"),
                       "--total-steps", str(steps)]) == 0
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == steps
    # the schedule of a 10-iteration run: warmup round(4 x 10/20) = 2 iterations (0 -> base_lr), then a half
    # cosine over the other 8 from base_lr to min_lr, whose last point (7 of 8) is close to min_lr
    lr, base, low = [r["lr"] for r in rows], 0.002, 1e-5
    want = [0.0, base] + [low + 0.5 * (base - low) * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(lr, want)), (lr, want)
    assert lr[-1] - low < 0.04 * (base - low)  # a cut-off schedule would still be at its midpoint (~base / 2)


def test_max_steps_stops_the_full_schedules_after_n_steps(tmp_path):
    cfg = copy.deepcopy(TINY_CFG)
    cfg["optim"].update(epochs=5, iters_per_epoch=4, warmup_epochs=1, base_lr=0.002, min_lr=1e-5)
    cfg["checkpoint"]["period_iters"] = 100
    data, path = shards_and_config(tmp_path, cfg)
    assert train_main(["--config", str(path), "--data", str(data), "--output", str(tmp_path / "out"),
                       "--max-steps", "6"]) == 0
    lr = [r["lr"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")]
    base, low = 0.002, 1e-5  # warmup linspace(0, base, 4), then the cosine over 16 iterations
    want = [0.0, base / 3, 2 * base / 3, base] + [low + 0.5 * (base - low) * (1 + math.cos(math.pi * i / 16))
                                                  for i in range(2)]
    assert len(lr) == 6
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(lr, want)), (lr, want)


def test_export_of_a_file_that_is_no_checkpoint_says_so(tmp_path, capsys):
    csv = tmp_path / "urls.csv"
    csv.write_text("url,caption\nhttp://example.invalid/a.jpg,a\n")
    other = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(2)}, other)
    zipped = tmp_path / "broken.pt"
    zipped.write_bytes(b"PK\x03\x04 not really a zip")
    for path in (csv, other, zipped):
        assert export_main([str(path), "-o", str(tmp_path / "b.pth")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: not an lvd or DINOv2 checkpoint"), err
