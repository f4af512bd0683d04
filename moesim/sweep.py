"""Parameter sweeps over simulation scenarios: grid or random search, run in parallel with
joblib (local processes) or on a Dask cluster through joblib's ``dask`` backend, collected in
one Parquet table, resumable.

A sweep file (YAML) names a base scenario, fixed changes, and the parameters to vary::

    scenario: mixtral-8x7b-ep8         # bundled name, a scenario file, or an inline mapping
    set: {workload.num_requests: 64}   # applied to every point
    search: grid                       # grid (every combination) | random (``samples`` draws)
    parameters:
      workload.rate_per_s: [8, 16, 32]
      placement.kind: [contiguous, balanced]
    replicates: 2                      # seeds per point: workload.seed and routing.seed + r

Random search draws ``samples`` points with ``seed``; a parameter is a list (uniform choice) or
``{dist: uniform|loguniform|int, low, high}`` or ``{values: [...]}``.

Every point is identified by a hash of its fully resolved scenario (and trace file), so a rerun
with the same output file skips the points already there: an interrupted sweep resumes, and a
changed base scenario is recomputed rather than silently reused. A point whose scenario is
invalid (say the model does not fit) becomes a row with its one-line ``error``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError

BACKENDS = ("local", "dask")
SEARCHES = ("grid", "random")
# summary figures that depend on the machine, not on the scenario: kept apart from the results
WALL_KEYS = ("wall_s", "sim_s_per_wall_s")


class SweepError(MoesimError):
    """A sweep file or option that cannot describe a sweep."""


@dataclass
class Point:
    """One scenario of the sweep: its place in the sweep order, its changes and its identity."""

    index: int
    replicate: int
    params: dict[str, Any]
    changes: dict[str, Any]
    point_id: str = ""


@dataclass
class Sweep:
    name: str
    base: dict  # the base scenario as a mapping (validated when points resolve)
    base_dir: str
    fixed: dict[str, Any] = field(default_factory=dict)
    search: str = "grid"
    parameters: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    seed: int = 0
    replicates: int = 1
    metrics: list[str] | None = None
    trace: str | None = None

    # ----- the points ---------------------------------------------------------------------------
    def points(self) -> list[Point]:
        combos = self._grid() if self.search == "grid" else self._random()
        out = []
        base = self.scenario()
        for params in combos:
            for r in range(self.replicates):
                changes = {**self.fixed, **params}
                if self.replicates > 1:
                    changes["workload.seed"] = base.workload.seed + r
                    changes["routing.seed"] = base.routing.seed + r
                point = Point(len(out), r, params, changes)
                point.point_id = self._identity(base, changes)
                out.append(point)
        return out

    def _grid(self) -> list[dict]:
        keys = list(self.parameters)
        values = [self.parameters[k] for k in keys]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]

    def _random(self) -> list[dict]:
        rng = np.random.default_rng(self.seed)
        draws = []
        for _ in range(self.samples):
            draws.append({k: _draw(rng, k, spec) for k, spec in self.parameters.items()})
        return draws

    def scenario(self, changes: dict | None = None):
        """The base scenario (validated), with ``changes`` applied."""
        from moesim.scenario import scenario_from_dict

        sc = scenario_from_dict(self.base, where=f"sweep {self.name}: scenario", base_dir=self.base_dir)
        return sc.with_changes(changes) if changes else sc

    def trace_path(self) -> str | None:
        if self.trace is None:
            return None
        p = Path(self.trace).expanduser()
        return str(p if p.is_absolute() else Path(self.base_dir) / p)

    def _identity(self, base, changes: dict) -> str:
        """Hash of the resolved scenario (minus where it was read from) and the trace file."""
        from moesim.scenario import ScenarioError

        try:
            data = base.with_changes(changes).model_dump(mode="json")
        except ScenarioError as exc:  # an invalid point is still a point: hash what was asked
            data = {"base": base.model_dump(mode="json"), "changes": changes, "invalid": str(exc)}
        data.pop("base_dir", None)
        data.pop("name", None)
        trace = self.trace_path()
        if trace is not None:
            st = Path(trace).stat() if Path(trace).exists() else None
            data["_trace"] = [trace, st.st_size if st else None, st.st_mtime_ns if st else None]
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def _draw(rng: np.random.Generator, key: str, spec) -> Any:
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"parameters.{key}: empty list of values")
        return _plain(spec[int(rng.integers(len(spec)))])
    if not isinstance(spec, dict):
        raise SweepError(f"parameters.{key}: give a list of values or {{dist, low, high}}")
    if "values" in spec:
        return _draw(rng, key, list(spec["values"]))
    dist = spec.get("dist", "uniform")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise SweepError(f"parameters.{key}: dist {dist!r} needs numeric 'low' and 'high'") from None
    if high < low:
        raise SweepError(f"parameters.{key}: high {high} is below low {low}")
    if dist == "uniform":
        return float(rng.uniform(low, high))
    if dist == "loguniform":
        if low <= 0:
            raise SweepError(f"parameters.{key}: loguniform needs low > 0")
        return float(np.exp(rng.uniform(np.log(low), np.log(high))))
    if dist == "int":
        return int(rng.integers(int(low), int(high) + 1))
    raise SweepError(f"parameters.{key}: unknown dist {dist!r}; choose uniform, loguniform, int")


def _plain(value):
    """numpy scalars -> Python ones (YAML-able, hashable the same way)."""
    return value.item() if isinstance(value, np.generic) else value


# ----- reading sweep files ------------------------------------------------------------------------
def load_sweep(path: str | Path) -> Sweep:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return sweep_from_dict(data, where=str(path), base_dir=path.parent, name=path.stem)


def sweep_from_dict(data, where: str = "sweep", base_dir: str | Path = ".", name: str = "sweep") -> Sweep:
    from moesim.scenario import ScenarioError, bundled_scenarios

    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping at the top level")
    known = {"name", "description", "scenario", "set", "search", "parameters", "samples", "seed",
             "replicates", "metrics", "trace"}
    extra = sorted(set(data) - known)
    if extra:
        raise SweepError(f"{where}: unknown field {extra[0]!r}; fields: {', '.join(sorted(known))}")
    spec = data.get("scenario")
    base_dir = Path(base_dir)
    if spec is None:
        raise SweepError(f"{where}: 'scenario' is required (a bundled name, a file or a mapping)")
    if isinstance(spec, str):
        import yaml

        p = Path(spec).expanduser()
        p = p if p.is_absolute() else base_dir / p
        bundled = bundled_scenarios()
        if p.is_file():
            scen_file = p
        elif spec in bundled:
            scen_file = bundled[spec]
        else:
            raise SweepError(f"{where}: scenario {spec!r} is neither a file nor a bundled scenario "
                             f"({', '.join(sorted(bundled))})")
        base = yaml.safe_load(scen_file.read_text()) or {}
        base.setdefault("name", scen_file.stem)
        scen_dir = scen_file.parent
    elif isinstance(spec, dict):
        base, scen_dir = dict(spec), base_dir
    else:
        raise SweepError(f"{where}: 'scenario' must be a name, a file or a mapping")
    search = data.get("search", "grid")
    if search not in SEARCHES:
        raise SweepError(f"{where}: search {search!r}; choose grid or random")
    params = data.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{where}: 'parameters' must map dotted scenario keys to values to try")
    if search == "grid":
        for key, values in params.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}: parameters.{key}: a grid needs a non-empty list of values")
    samples = data.get("samples", 0)
    if search == "random" and (not isinstance(samples, int) or samples < 1):
        raise SweepError(f"{where}: random search needs 'samples' (a positive whole number)")
    replicates = data.get("replicates", 1)
    if not isinstance(replicates, int) or replicates < 1:
        raise SweepError(f"{where}: replicates must be a positive whole number")
    fixed = data.get("set") or {}
    if not isinstance(fixed, dict):
        raise SweepError(f"{where}: 'set' must map dotted scenario keys to values")
    metrics = data.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)):
        raise SweepError(f"{where}: 'metrics' must be a list of summary names (e.g. tpot_mean_s)")
    sweep = Sweep(name=str(data.get("name", name)), base=base, base_dir=str(scen_dir),
                  fixed=fixed, search=search, parameters=params, samples=samples if search == "random" else 0,
                  seed=int(data.get("seed", 0)), replicates=replicates, metrics=metrics,
                  trace=data.get("trace"))
    if sweep.trace is not None:
        # a trace named in the sweep file resolves against the sweep file's folder
        t = Path(sweep.trace).expanduser()
        sweep.trace = str(t if t.is_absolute() else base_dir / t)
        if not Path(sweep.trace).is_file():
            raise SweepError(f"{where}: trace {sweep.trace}: no such file")
    try:
        sweep.scenario(dict(fixed))
    except ScenarioError as exc:
        raise SweepError(str(exc)) from None
    return sweep


# ----- running one point ----------------------------------------------------------------------------
def run_point(sweep: Sweep, point: Point) -> dict:
    """Simulate one point; return its row (parameters, figures, error, wall seconds)."""
    from moesim.engine import simulate

    t0 = time.perf_counter()
    row: dict[str, Any] = {"point": point.index, "point_id": point.point_id,
                           "replicate": point.replicate}
    for key, value in point.params.items():
        row[key] = value
    try:
        res = simulate(sweep.scenario(point.changes), sweep.trace_path())
        figures = {k: v for k, v in res.summary.items()
                   if isinstance(v, (int, float, bool, np.integer, np.floating)) and k not in WALL_KEYS}
        if sweep.metrics is not None:
            missing = [m for m in sweep.metrics if m not in figures]
            if missing:
                raise SweepError(f"metric {missing[0]!r} is not a simulation figure; figures: "
                                 f"{', '.join(sorted(figures))}")
            figures = {m: figures[m] for m in sweep.metrics}
        row.update({k: _plain(v) for k, v in figures.items()})
        row["error"] = None
    except MoesimError as exc:
        row["error"] = str(exc)
    row["wall_s"] = time.perf_counter() - t0
    return row


# ----- the table ---------------------------------------------------------------------------------------
def read_results(path: str | Path):
    """The results table of a sweep (or an empty frame when the file is absent)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise SweepError(f"{path}: not a readable sweep results table ({str(exc).splitlines()[0]}); "
                         "move it away or give another --out") from None


def _table(rows: list[dict], sweep: Sweep):
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for key in sweep.parameters:
        if key in df.columns:
            col = df[key]
            kinds = {type(v) for v in col if v is not None}
            if kinds - {int, float, bool} and len(kinds) > 1 or any(isinstance(v, (dict, list)) for v in col):
                df[key] = [json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in col]
    df["error"] = pd.Series([e if isinstance(e, str) else None for e in df["error"]], dtype=object)
    return df.sort_values("point", kind="stable").reset_index(drop=True)


def _write(df, path: Path) -> None:
    from moesim.fileio import atomic_path

    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


# ----- running a sweep -----------------------------------------------------------------------------------
@dataclass
class SweepRun:
    table: Any  # pandas DataFrame of every point done so far (this run and earlier ones)
    total: int
    computed: int
    skipped: int
    errors: int
    backend: str
    wall_s: float

    def to_dict(self) -> dict:
        return {"points": self.total, "computed": self.computed, "skipped_done": self.skipped,
                "errors": self.errors, "backend": self.backend, "wall_s": self.wall_s}


def run_sweep(sweep: Sweep, out: str | Path | None = None, *, backend: str = "local",
              scheduler: str | None = None, n_jobs: int = -1, chunk: int | None = None,
              on_point=None) -> SweepRun:
    """Run every point of ``sweep`` not yet in ``out``; write ``out`` after every chunk.

    ``backend='local'`` runs joblib's process pool (``n_jobs=1``: in this process);
    ``backend='dask'`` sends the same joblib calls to a Dask cluster: ``scheduler`` is its
    address (``tcp://host:8786``), or None for a LocalCluster of ``n_jobs`` worker processes.
    ``on_point(done, total, row)`` is called as each point finishes (progress bars); raising
    from it stops the sweep after saving what finished.
    """
    import pandas as pd

    if backend not in BACKENDS:
        raise SweepError(f"unknown backend {backend!r}; choose local or dask")
    if scheduler and backend != "dask":
        raise SweepError("--scheduler needs --backend dask")
    t0 = time.perf_counter()
    points = sweep.points()
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.is_dir():
        raise SweepError(f"--out {out_path} is a folder; give the .parquet file to write")
    previous = read_results(out_path) if out_path is not None else pd.DataFrame()
    done_ids = set(previous["point_id"]) if "point_id" in previous.columns else set()
    ids = {p.point_id for p in points}
    # rows of this sweep already computed: renumber them to this sweep's order
    order = {p.point_id: p.index for p in points}
    kept = previous[previous["point_id"].isin(ids)].copy() if len(done_ids) else previous
    if len(kept):
        kept["point"] = kept["point_id"].map(order)
    rows = kept.to_dict("records") if len(kept) else []
    todo = [p for p in points if p.point_id not in done_ids]
    total, done = len(points), len(points) - len(todo)
    if on_point is not None and done:
        on_point(done, total, None)
    n_workers = _workers(n_jobs)
    chunk = chunk or max(8, 4 * n_workers)
    new_rows: list[dict] = []

    def save():
        if out_path is not None and new_rows:
            _write(_table(rows + new_rows, sweep), out_path)

    with _executor(backend, scheduler, n_workers) as parallel:
        try:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                for row in parallel(part, sweep):
                    new_rows.append(row)
                    done += 1
                    if on_point is not None:
                        on_point(done, total, row)
                save()
        finally:
            save()
    table = _table(rows + new_rows, sweep)
    errors = int(table["error"].notna().sum()) if "error" in table.columns else 0
    return SweepRun(table, total, len(new_rows), total - len(todo), errors, backend,
                    time.perf_counter() - t0)


def _workers(n_jobs: int) -> int:
    import os

    if n_jobs == 0:
        raise SweepError("--jobs must not be 0 (use -1 for all cores)")
    cores = os.cpu_count() or 1
    return max(1, cores + 1 + n_jobs) if n_jobs < 0 else n_jobs


class _executor:
    """Context manager yielding ``parallel(points, sweep) -> iterator of rows`` (in order)."""

    def __init__(self, backend: str, scheduler: str | None, n_workers: int):
        self.backend, self.scheduler, self.n_workers = backend, scheduler, n_workers
        self.client = self.cluster = None

    def __enter__(self):
        from joblib import Parallel, delayed, parallel_config

        if self.backend == "local":
            if self.n_workers == 1:
                return lambda part, sweep: (run_point(sweep, p) for p in part)

            def local(part, sweep):
                with parallel_config(backend="loky", n_jobs=self.n_workers):
                    yield from Parallel(return_as="generator")(delayed(run_point)(sweep, p) for p in part)

            return local
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise SweepError("the dask backend needs dask[distributed] (pip install 'moesim[sweep]')") from None
        if self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise SweepError(f"cannot reach the Dask scheduler at {self.scheduler}: {exc}") from None
        else:
            self.cluster = LocalCluster(n_workers=self.n_workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)

        def dask(part, sweep):
            with parallel_config(backend="dask", n_jobs=-1):
                yield from Parallel(return_as="generator")(delayed(run_point)(sweep, p) for p in part)

        return dask

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        return False


# ----- reading results ------------------------------------------------------------------------------------
def pareto_front(table, objectives: dict[str, str]) -> np.ndarray:
    """Boolean mask of the rows no other row dominates; ``objectives`` maps a column to 'min'
    or 'max'. Rows with an error or a missing value are never on the front."""
    if not objectives:
        raise SweepError("give at least one objective column")
    cols = []
    for col, sense in objectives.items():
        if col not in table.columns:
            raise SweepError(f"no column {col!r} in the results")
        if sense not in ("min", "max"):
            raise SweepError(f"objective {col}: sense must be 'min' or 'max', not {sense!r}")
        values = table[col].to_numpy(dtype=float)
        cols.append(values if sense == "min" else -values)
    x = np.stack(cols, axis=1) if cols else np.zeros((len(table), 0))
    valid = np.isfinite(x).all(axis=1)
    if "error" in table.columns:
        valid &= table["error"].isna().to_numpy()
    front = np.zeros(len(table), dtype=bool)
    idx = np.flatnonzero(valid)
    pts = x[idx]
    for j, i in enumerate(idx):
        le = (pts <= pts[j]).all(axis=1)
        lt = (pts < pts[j]).any(axis=1)
        front[i] = not (le & lt).any()
    return front
