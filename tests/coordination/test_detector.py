"""The phi-accrual failure detector: Akka's golden values and its behaviour over simulated time."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from butterfly.coordination.detector import PhiAccrualDetector, phi


@pytest.mark.parametrize(
    ("gap_ms", "expected"), [(1200, 1.6), (1400, 4.7), (1600, 10.8), (1700, 15.3)]
)
def test_golden_values_from_akka(gap_ms: float, expected: float) -> None:
    assert phi(gap_ms, 1000, 100) == pytest.approx(expected, abs=0.1)


@given(st.floats(0, 1e9), st.floats(0, 1e9))
def test_phi_increases_with_the_gap(a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert phi(low, 1000, 100) <= phi(high, 1000, 100)


def test_zero_and_huge_gaps_raise_no_error() -> None:
    assert phi(0, 1000, 100) == pytest.approx(0, abs=1e-9)
    assert math.isfinite(phi(1e12, 1000, 100)) and phi(1e12, 1000, 100) > 1e6
    assert phi(1e300, 1000, 100) == math.inf


def _regular(detector: PhiAccrualDetector, beats: int, interval: float = 1.0) -> float:
    now = 0.0
    for _ in range(beats):
        detector.heartbeat(now)
        now += interval
    return now - interval


def test_an_hour_of_healthy_heartbeats_raises_no_suspicion() -> None:
    rng = random.Random(0)
    detector = PhiAccrualDetector()
    now, worst = 0.0, 0.0
    while now < 3600:
        detector.heartbeat(now)
        gap = max(rng.gauss(1.0, 0.1), 0.0)
        worst = max(worst, detector.phi(now + gap))  # just before the next heartbeat lands
        now += gap
    assert worst < 1.0
    assert not detector.suspects(now)


def test_a_dead_worker_is_suspected_within_eight_seconds_of_its_last_heartbeat() -> None:
    detector = PhiAccrualDetector()
    last = _regular(detector, 100)
    suspected_after = next(t / 10 for t in range(1, 200) if detector.suspects(last + t / 10))
    assert suspected_after < 8.0
    assert suspected_after == pytest.approx(
        4.5, abs=0.1
    )  # mean 1 s + pause 3 s + 5.4 σ (σ floored at 100 ms)


def test_a_four_second_pause_is_tolerated_with_a_three_second_acceptable_pause() -> None:
    detector = PhiAccrualDetector(acceptable_pause=3.0)
    last = _regular(detector, 100)
    assert detector.phi(last + 4.0) < 1.0
    assert not detector.suspects(last + 4.0)


def test_without_an_acceptable_pause_the_same_silence_is_suspicious() -> None:
    detector = PhiAccrualDetector(acceptable_pause=0.0)
    last = _regular(detector, 100)
    assert detector.suspects(last + 4.0)


def test_no_heartbeat_yet_means_no_suspicion() -> None:
    assert PhiAccrualDetector().phi(now=1e6) == 0.0


def test_time_to_suspicion_is_when_phi_reaches_the_threshold() -> None:
    d = PhiAccrualDetector(threshold=8.0, acceptable_pause=3.0, first_interval=1.0)
    for t in range(10):
        d.heartbeat(float(t))
    wait = d.time_to_suspicion(9.5)
    assert 3.5 < wait < 6.0
    assert d.phi(9.5 + wait) >= 8.0 > d.phi(9.5 + wait - 1e-5)
    assert d.time_to_suspicion(9.5 + wait + 1) == 0.0
    assert PhiAccrualDetector().time_to_suspicion(0.0) == float("inf")


@pytest.mark.parametrize("interval", [math.inf, math.nan, 4e9, 1e300])
def test_time_to_suspicion_returns_at_once_for_an_absurd_first_interval(interval: float) -> None:
    # A peer's Hello once put this bisection into an endless loop on the event loop.
    detector = PhiAccrualDetector(first_interval=interval)
    detector.heartbeat(1000.0)
    assert detector.time_to_suspicion(1000.0) >= 0.0
