"""Flash I/O model: closed forms, calibration recovers known constants, the phone run's
per-token I/O and wall time within 10 % MAPE on held-out tokens."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.storage import FlashIO, calibrate, get_storage, io_for, mape, storage_names


def test_closed_form_thread_and_wall_time():
    f = FlashIO(thread_bw=1e9, threads=4, read_latency=1e-4, page_size=4096, exposed=0.5)
    # 2 reads of 5000 B each round up to 2 pages (8192 B)
    t = f.thread_time(10_000, 2)
    assert t == pytest.approx(2 * (1e-4 + 8192 / 1e9))
    assert f.wall_time(10_000, 2) == pytest.approx(t / 4)
    assert f.stall_time(10_000, 2) == pytest.approx(t / 8)
    assert f.thread_time(0, 0) == 0


def test_calibration_recovers_constants():
    rng = np.random.default_rng(0)
    reads = rng.integers(10, 200, 50)
    nbytes = reads * rng.integers(2_000_000, 3_000_000, 50)
    true = FlashIO(thread_bw=8e8, threads=4, read_latency=2e-4, page_size=1, token_overhead=0.01,
                   exposed=0.8, mgmt_per_byte=1e-10, mgmt_per_read=1e-5)
    io = true.thread_time(nbytes, reads)
    fit = calibrate(nbytes, reads, io, true.stall_time(nbytes, reads), true.mgmt_time(nbytes, reads),
                    threads=4, page_size=1)
    assert fit.thread_bw == pytest.approx(8e8, rel=1e-6)
    assert fit.read_latency == pytest.approx(2e-4, rel=1e-6)
    assert fit.exposed == pytest.approx(0.8, rel=1e-6)
    assert fit.mgmt_per_byte == pytest.approx(1e-10, rel=1e-6)
    assert mape(fit.thread_time(nbytes, reads), io) < 1e-6


def test_presets_and_errors():
    assert {"phone-ufs4", "orin-nvme", "desktop-4090"} <= set(storage_names())
    desk = get_storage("desktop-4090")
    assert desk.host_link_bw > 0 and desk.load_time(1e9, "dram") == pytest.approx(5e-6 + 1e9 / 23.9e9)
    phone = get_storage("phone-ufs4")
    assert phone.host_link_bw == 0 and phone.flash.threads * phone.flash.thread_bw == pytest.approx(4.2e9)
    assert io_for("desktop-4090").read_time(23.9e9, 1) == pytest.approx(1 + 5e-6)
    with pytest.raises(MoesimError):
        get_storage("nope")
    with pytest.raises(MoesimError):
        calibrate([1, 2], [1, 1], [1, 1])


def test_phone_io_and_wall_time_within_ten_percent(phone_trace_dir):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "phone_io_model", Path(__file__).resolve().parents[1] / "benchmarks" / "phone_io_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.evaluate(phone_trace_dir)
    assert out["read_bytes_vs_metrics_max_rel_err"] < 0.01  # replayed misses = the run's reads
    assert out["mape_io_ms_held_out"] <= 10.0
    assert out["mape_wall_ms_held_out_recorded_compute"] <= 10.0
    assert 0.3e9 < out["model"]["thread_bw"] * 4 < 5.8e9  # within UFS 4.0's line rate


def test_shared_disk_fair_share_closed_forms():
    import simpy

    from moesim.storage import FairShare, SharedDisk

    def finish(disk, starts):
        env = simpy.Environment()
        share = FairShare(env, disk)
        ends = {}

        def one(i, at, nbytes):
            yield env.timeout(at)
            yield share.transfer(nbytes)
            ends[i] = env.now

        for i, (at, nbytes) in enumerate(starts):
            env.process(one(i, at, nbytes))
        env.run()
        return [ends[i] for i in range(len(starts))]

    one_disk = SharedDisk(latency=0.0, stream_bw=100.0, total_bw=100.0)
    two_channels = SharedDisk(latency=0.0, stream_bw=100.0, total_bw=200.0)
    assert finish(one_disk, [(0, 100), (0, 100)]) == pytest.approx([2.0, 2.0])
    assert finish(two_channels, [(0, 100), (0, 100)]) == pytest.approx([1.0, 1.0])
    # A alone for 0.5 s (50 B), then both at 50 B/s: A's last 50 B end at 1.5 s; B has 50 B
    # left then and moves it alone at 100 B/s: 2.0 s
    assert finish(one_disk, [(0, 100), (0.5, 100)]) == pytest.approx([1.5, 2.0])
    partly = SharedDisk(latency=0.0, stream_bw=100.0, total_bw=150.0)  # 75 B/s each when two
    assert finish(partly, [(0, 150), (0, 150)]) == pytest.approx([2.0, 2.0])
    d = SharedDisk(1e-3, 1e9, 1.5e9, header_bytes=100, block=4096)
    assert d.disk_bytes(5000) == 8192 and d.solo_s(5000) == pytest.approx(1e-3 + 8192 / 1e9)
    with pytest.raises(MoesimError):
        SharedDisk(0.0, 0.0, 1.0)
