"""The live view's arithmetic: rates between two scrapes (butterfly.top)."""

from __future__ import annotations

from rich.console import Console

from butterfly.top import WorkerSample, render


def test_utilisation_and_link_rates_are_per_second_between_two_scrapes() -> None:
    before = WorkerSample(
        url="http://w0:9100", at=10.0, state="ok", node="w0", compute_s={"0-5": 4.0},
        traffic={("c1", "in"): 1e6}, computations=100,
    )  # fmt: skip
    after = WorkerSample(
        url="http://w0:9100", at=12.0, state="ok", node="w0", compute_s={"0-5": 5.5},
        traffic={("c1", "in"): 9e6}, computations=160, queue=3,
    )  # fmt: skip
    console = Console(width=200, record=True)
    console.print(render([before], [after]))
    text = console.export_text()
    assert "0-5 (75%)" in text  # 1.5 s of compute in 2 s
    assert "←c1 4.00" in text  # 8 MB in 2 s
    assert "30.0" in text  # computations per second
