"""The emulated storage device (store.ReadLimiter): reads take at least bytes / bandwidth, one
at a time across threads; a slower real read is counted; runs record it and stay exact."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from moesim.cli import main  # noqa: E402
from moesim.executor import ExecutorError, RunSettings, capture  # noqa: E402
from moesim.executor.store import ExpertStore, ReadLimiter  # noqa: E402
from tests.test_executor import random_trace, tiny_spec  # noqa: E402

MIB = 2**20


def _store(tmp_path, files: int, mib: float, gbps: float | None) -> tuple[ExpertStore, int]:
    store = ExpertStore(tmp_path, num_experts=100, cold="none", read_gbps=gbps)
    for key in range(files):
        store.write(key, {"w": torch.ones(int(mib * MIB) // 4, dtype=torch.float32)})
    return store, store.path(0).stat().st_size


def test_reads_take_at_least_bytes_over_bandwidth(tmp_path):
    # page-cache reads (cold="none") run at GB/s; the device at 0.2 GB/s takes 5 ms per MB
    store, size = _store(tmp_path, 6, 1, 0.2)
    t0 = time.perf_counter()
    for key in range(6):
        store.read(key)
    took = time.perf_counter() - t0
    floor = 6 * size / 0.2e9
    assert took >= floor
    assert took < 3 * floor + 0.05  # sleeps end when booked (loose bound: a shared machine)
    assert store.limiter.reads == 6


def test_threads_share_one_device(tmp_path):
    store, size = _store(tmp_path, 8, 1, 0.2)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda ks: [store.read(k) for k in ks], args=(ks,))
               for ks in (range(0, 4), range(4, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    # two threads do not double the bandwidth: 8 reads back to back on one device
    assert took >= 8 * size / 0.2e9
    assert store.limiter.reads == 8


def test_reads_slower_than_the_device_are_counted():
    lim = ReadLimiter(1e6)  # a device no real read can keep up with
    end = lim.reserve(4096)
    time.sleep(0.001)
    lim.finish(end)
    assert (lim.reads, lim.slow_reads) == (1, 1)
    # the device stays busy until the slow read ended: the next booking starts after it
    assert lim.reserve(0) >= end


def test_without_limit_reads_are_unthrottled(tmp_path):
    store, _ = _store(tmp_path, 2, 0.25, None)
    assert store.limiter is None
    store.read(0)


@pytest.mark.parametrize("bad", [0, -1.5])
def test_bad_bandwidth_is_one_clear_error(tmp_path, bad, capsys):
    with pytest.raises(ExecutorError, match="positive"):
        ExpertStore(tmp_path, 4, read_gbps=bad)
    with pytest.raises(ExecutorError, match="positive"):
        RunSettings(read_gbps=bad)
    code = main(["run-real", "--out", str(tmp_path / "r.parquet"), "--read-gbps", str(bad),
                 "--store", str(tmp_path / "s"), "--tokens", "2", "--layers", "1",
                 "--override", "hidden=64", "--override", "moe_intermediate=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--read-gbps" in err[0]


def test_run_records_the_emulated_device_and_stays_exact(tmp_path):
    import yaml

    from moesim.calibrate import measure_machine
    from moesim.executor.calibrate import extend_profile
    from moesim.validate import validate

    spec, tr = tiny_spec(), random_trace(12)
    settings = RunSettings(policy="lru", capacity_experts=5, io_threads=1, read_gbps=0.05)
    run = capture(spec, settings, tmp_path / "store", trace=tr)
    emu = run.meta.capture["policy_stats"]["emulated_read"]
    assert emu["gbps"] == 0.05 and emu["reads"] == len(run.meta.capture["transfers"]["key"])
    assert run.meta.capture["settings"]["read_gbps"] == 0.05
    tx = run.meta.capture["transfers"]
    dur = np.array(tx["end_s"]) - np.array(tx["start_s"])
    # every read lasted at least its bytes over the emulated bandwidth
    assert (dur >= np.array(tx["file_bytes"]) / 0.05e9 * 0.999).all()
    path = run.write(tmp_path / "run.parquet")
    prof = tmp_path / "hw.yaml"
    prof.write_text(yaml.safe_dump(measure_machine(str(tmp_path), quick=True)))
    extend_profile(prof, [spec], threads=1, disk_dir=str(tmp_path), sizes_mib=(0.25, 0.5),
                   read_gbps=0.05)
    r = validate(path, prof)
    assert r["bytes_exact"] and r["hits_exact"]
    # the profile measured the emulated device (0.05 GB/s), not the disk (GB/s): a fit of
    # latency + bytes / bandwidth over two file sizes, loose against timing noise
    link = yaml.safe_load(prof.read_text())["links"]["expert_read"]
    assert 0.025e9 < link["bandwidth"] < 0.1e9
