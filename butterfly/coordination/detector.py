"""The phi-accrual failure detector (Hayashibara et al. 2004), as Akka implements it. Sans-IO.

Instead of a yes/no timeout it gives a suspicion level φ that grows with the time since the
last heartbeat, scaled by how regular heartbeats have been:

    φ(Δt) = -log10(1 - F(Δt)),   F = CDF of N(mean + acceptable_pause, max(σ, min_std))

estimated over the last ``window`` inter-arrival times. φ = 1 means a 10 % chance that the
worker is still alive and merely late, φ = 8 (the default threshold) one in 10^8. The
acceptable pause absorbs GC pauses and bursts of load without suspicion.

    >>> d = PhiAccrualDetector()
    >>> d.heartbeat(now=0.0); d.heartbeat(now=1.0)
    >>> d.phi(now=1.5) < 1 < d.phi(now=6.0)
    True
"""

from __future__ import annotations

import collections
import math

__all__ = ["PhiAccrualDetector", "phi"]


def phi(elapsed: float, mean: float, std: float) -> float:
    """φ of ``elapsed`` for a normal distribution (Akka's logistic approximation of its CDF).

    φ = -log10(1 - F) with 1 - F = 1 / (1 + e^z), z = y (1.5976 + 0.070566 y²), y = (Δt - μ) / σ,
    so φ = log10(1 + e^z): computed without overflow for any gap (zero or huge), increasing in it.
    """
    y = (elapsed - mean) / std
    z = y * (1.5976 + 0.070566 * y * y)
    if z > 0:
        return (z + math.log1p(math.exp(-z))) / math.log(10)
    return math.log1p(math.exp(z)) / math.log(10)


class PhiAccrualDetector:
    """Suspicion of one peer from the arrival times (seconds, monotonic) of its heartbeats."""

    def __init__(
        self,
        *,
        threshold: float = 8.0,
        window: int = 1000,
        min_std: float = 0.1,
        acceptable_pause: float = 3.0,
        first_interval: float = 1.0,
    ) -> None:
        self.threshold = threshold
        self.min_std = min_std
        self.acceptable_pause = acceptable_pause
        self._intervals: collections.deque[float] = collections.deque(maxlen=window)
        # Running sums, so phi is O(1) however long the window: it runs on the event loop.
        self._sum = 0.0
        self._sum_squares = 0.0
        # Like Akka: start from the expected interval ± a quarter, so one heartbeat suffices.
        for interval in (first_interval * 0.75, first_interval * 1.25):
            self._add(interval)
        self._last: float | None = None

    def _add(self, interval: float) -> None:
        if len(self._intervals) == self._intervals.maxlen:
            old = self._intervals[0]
            self._sum -= old
            self._sum_squares -= old * old
        self._intervals.append(interval)
        self._sum += interval
        self._sum_squares += interval * interval

    def heartbeat(self, now: float) -> None:
        if self._last is not None:
            self._add(now - self._last)
        self._last = now

    def _distribution(self) -> tuple[float, float]:
        """Mean (plus the acceptable pause) and deviation (at least the minimum) of the gaps."""
        n = len(self._intervals)
        mean = self._sum / n
        std = math.sqrt(max(self._sum_squares / n - mean * mean, 0.0))
        return mean + self.acceptable_pause, max(std, self.min_std)

    def phi(self, now: float) -> float:
        """Suspicion now; 0 before the first heartbeat."""
        if self._last is None:
            return 0.0
        return phi(max(now - self._last, 0.0), *self._distribution())

    def suspects(self, now: float) -> bool:
        return self.phi(now) >= self.threshold

    def time_to_suspicion(self, now: float) -> float:
        """Seconds from ``now`` until φ reaches the threshold if no heartbeat arrives (0 if it
        already has), so a watcher can check exactly then instead of at its next tick.

        φ increases with the gap, so the crossing is found by bisection (to 1 µs).
        """
        last = self._last
        if last is None:
            return math.inf
        mean, std = self._distribution()

        def crossed(t: float) -> bool:
            return phi(max(t - last, 0.0), mean, std) >= self.threshold

        if crossed(now):
            return 0.0
        # Both loops are bounded: a peer's absurd interval (inf, NaN, 1e300) must not
        # hold the event loop. 2^40 s is beyond any crossing worth waiting for.
        low, high = now, now + 1.0
        for _ in range(40):
            if crossed(high):
                break
            low, high = high, now + 2 * (high - now)
        else:
            return math.inf
        for _ in range(80):  # 2^40 s down to 1 µs takes 60 halvings
            if high - low <= 1e-6:
                break
            middle = (low + high) / 2
            low, high = (low, middle) if crossed(middle) else (middle, high)
        return high - now
