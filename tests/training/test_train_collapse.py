"""training/collapse.py: the warning on a lasting collapse of the DINO teacher, from the logged monitors."""
import math

from training.collapse import CollapseWatch

K = 512


def _row(it, h, hm):
    return {"iteration": it, "teacher_entropy": h, "teacher_marginal_entropy": hm}


def test_uniform_collapse_is_reported_once_after_patience_iterations():
    watch = CollapseWatch(K, patience=50)
    healthy = [watch.update(_row(i, 1.0, 3.0)) for i in range(1, 101)]
    assert healthy == [None] * 100
    # at ln K (the learning bench's runs with DINOv2's temperature): 49 iterations are not yet a collapse
    out = [watch.update(_row(i, math.log(K) - 0.002, math.log(K) - 0.001)) for i in range(101, 150)]
    assert out == [None] * 49
    text = watch.update(_row(150, math.log(K) - 0.002, math.log(K)))
    assert text is not None and "uniform" in text and "since iteration 101" in text and "teacher_temp" in text
    assert [watch.update(_row(i, math.log(K), math.log(K))) for i in range(151, 400)] == [None] * 249  # once


def test_a_transient_collapse_is_not_reported_and_the_count_restarts():
    """The first steps go through a near-uniform teacher while the centre catches up (BENCHMARKS.md): an
    interruption restarts the count."""
    watch = CollapseWatch(K, patience=50)
    rows = [_row(i, math.log(K), 5.0) for i in range(1, 50)] + [_row(50, 2.0, 5.0)] \
        + [_row(i, math.log(K), 5.0) for i in range(51, 100)]
    assert [watch.update(r) for r in rows] == [None] * 99
    assert "since iteration 51" in watch.update(_row(100, math.log(K), 5.0))


def test_one_prototype_collapse_and_the_thresholds():
    watch = CollapseWatch(K, patience=3)
    assert watch.kinds(_row(1, math.log(K) - math.log(10 / 9) + 1e-6, 3.0)) == {"uniform"}
    assert watch.kinds(_row(1, math.log(K) - math.log(10 / 9) - 1e-6, 3.0)) == set()
    assert watch.kinds(_row(1, 0.0, math.log(2) - 1e-6)) == {"one_prototype"}
    assert watch.kinds(_row(1, 0.0, math.log(2) + 1e-6)) == set()
    assert watch.kinds({"iteration": 1, "loss": 2.0}) == set()  # distill rows carry no monitors
    assert [watch.update(_row(i, 0.0, 0.0)) for i in (1, 2)] == [None, None]
    assert "one prototype" in watch.update(_row(3, 0.0, 0.0))
