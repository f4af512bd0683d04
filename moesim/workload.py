"""Request arrivals and sizes: Poisson, gamma (bursty), a burst at time 0, or a JSONL file.

A ``Workload`` is three arrays sorted by arrival: arrival time (seconds), prompt tokens and
output tokens per request. Everything random draws from one seeded generator.
JSONL lines: ``{"arrival_s": 0.12, "prompt_tokens": 512, "output_tokens": 128}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError


class WorkloadError(MoesimError):
    """A workload that cannot be built: bad JSONL, impossible lengths."""


@dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray  # [n] float64, non-decreasing
    prompt_tokens: np.ndarray  # [n] int64 >= 1
    output_tokens: np.ndarray  # [n] int64 >= 1

    def __post_init__(self):
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise WorkloadError("workload arrays differ in length")
        if n == 0:
            raise WorkloadError("workload holds no requests")
        if np.any(np.diff(self.arrival_s) < 0):
            raise WorkloadError("arrival times must be sorted")
        if self.arrival_s[0] < 0 or not np.isfinite(self.arrival_s).all():
            raise WorkloadError("arrival times must be finite and >= 0")
        if self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1:
            raise WorkloadError("every request needs at least 1 prompt and 1 output token")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def total_prompt_tokens(self) -> int:
        return int(self.prompt_tokens.sum())

    @property
    def total_output_tokens(self) -> int:
        return int(self.output_tokens.sum())


def poisson_arrivals(rate_per_s: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process: exponential gaps of mean 1/rate, first at one gap."""
    return np.cumsum(rng.exponential(1.0 / rate_per_s, n))


def gamma_arrivals(rate_per_s: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gamma-distributed gaps with mean 1/rate and coefficient of variation ``cv`` (cv=1: Poisson).

    Shape k = 1/cv^2 and scale = cv^2/rate give mean k*scale = 1/rate and std/mean = cv.
    """
    shape = 1.0 / (cv * cv)
    return np.cumsum(rng.gamma(shape, 1.0 / (rate_per_s * shape), n))


def sample_lengths(spec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Token counts from an int (fixed) or a LengthSection (fixed, uniform, lognormal)."""
    if isinstance(spec, int):
        return np.full(n, spec, dtype=np.int64)
    hi = spec.max if spec.max is not None else np.iinfo(np.int64).max
    if spec.dist == "fixed":
        out = np.full(n, round(spec.mean), dtype=np.int64)
    elif spec.dist == "uniform":
        out = rng.integers(spec.min, spec.max + 1, n)
    else:  # lognormal with the given mean and coefficient of variation
        sigma2 = np.log1p(spec.cv**2)
        mu = np.log(spec.mean) - sigma2 / 2
        out = np.rint(rng.lognormal(mu, np.sqrt(sigma2), n)).astype(np.int64)
    return np.clip(out, spec.min, hi).astype(np.int64)


def read_jsonl(path: str | Path) -> Workload:
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: no such workload file")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rows.append((float(rec["arrival_s"]), int(rec["prompt_tokens"]), int(rec["output_tokens"])))
        except (ValueError, TypeError) as exc:
            raise WorkloadError(f"{path}:{lineno}: not a JSON request line ({exc})") from None
        except KeyError as exc:
            raise WorkloadError(
                f"{path}:{lineno}: missing key {exc}; each line needs arrival_s, prompt_tokens, "
                "output_tokens"
            ) from None
    if not rows:
        raise WorkloadError(f"{path}: no requests in file")
    arr = np.array(rows, dtype=float)
    order = np.argsort(arr[:, 0], kind="stable")
    arr = arr[order]
    try:
        return Workload(arr[:, 0], arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64))
    except WorkloadError as exc:
        raise WorkloadError(f"{path}: {exc}") from None


def build_workload(spec, base_dir: str | Path = ".") -> Workload:
    """The workload a scenario's ``workload`` section describes."""
    if spec.arrival == "jsonl":
        p = Path(spec.file)
        return read_jsonl(p if p.is_absolute() else Path(base_dir) / p)
    rng = np.random.default_rng(np.random.SeedSequence([int(spec.seed), 41]))
    n = spec.num_requests
    if spec.arrival == "poisson":
        arrival = poisson_arrivals(spec.rate_per_s, n, rng)
    elif spec.arrival == "gamma":
        arrival = gamma_arrivals(spec.rate_per_s, spec.cv, n, rng)
    else:  # burst: everything at t = 0 (a closed batch; throughput and saturation studies)
        arrival = np.zeros(n)
    prompt = sample_lengths(spec.prompt_tokens, n, rng)
    output = sample_lengths(spec.output_tokens, n, rng)
    return Workload(arrival, prompt, output)
