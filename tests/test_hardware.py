"""Hardware presets, YAML loading and validation."""

from __future__ import annotations

import pytest

from moesim import hardware as hw
from moesim.errors import MoesimError


def test_every_preset_has_a_source():
    for name in hw.device_names():
        assert hw.get_device(name).source
    for name in hw.cluster_names():
        c = hw.get_cluster(name)
        assert c.source and c.nvlink.source
    for name in hw.machine_names():
        m = hw.get_machine(name)
        assert m.source and all(t.source for t in m.tiers)


def test_spec_sheet_figures():
    h100, h800 = hw.get_device("h100-sxm"), hw.get_device("h800")
    assert h800.peak_flops("bf16") == h100.peak_flops("bf16")  # same die, cut NVLink
    assert h100.peak_flops("bf16") == pytest.approx(989.4e12)
    assert h100.peak_flops("fp8") == pytest.approx(2 * h100.peak_flops("bf16"), rel=1e-3)
    assert hw.get_device("h200").memory.capacity == 141e9
    assert hw.get_device("a100-sxm").peak_flops("fp8") == 312e12  # no FP8: falls back to bf16
    # H800 NVLink is the cut-down one: 200 GB/s per direction vs 450 on H100
    assert hw.get_link("nvlink4-h800").peak < hw.get_link("nvlink4-h100").peak
    assert hw.get_link("ufs-4.0").bandwidth < hw.get_link("nvme-gen4-x4").bandwidth


def test_edge_machines_have_their_tiers():
    phone = hw.get_machine("phone-sd8g3")
    assert phone.tier("ufs").read_bw == 4.2e9 and phone.accelerator is None
    orin = hw.get_machine("jetson-agx-orin")
    assert orin.tier("nvme").kind == "nvme" and orin.host_link is None  # unified memory
    desk = hw.get_machine("desktop-4090")
    assert desk.host_link.bandwidth == pytest.approx(23.9e9)
    with pytest.raises(hw.HardwareError, match="no memory tier"):
        phone.tier("hbm")


def test_link_transfer_time_and_efficiency_curve():
    link = hw.Link(name="x", kind="pcie", bandwidth=10e9, latency=1e-6,
                   efficiency=((1e3, 0.1), (1e6, 1.0)))
    assert link.transfer_time(0) == 0
    assert link.transfer_time(1e9) == pytest.approx(1e-6 + 0.1)
    assert link.efficiency_at(1e3) == 0.1 and link.efficiency_at(1e9) == 1.0
    assert link.efficiency_at(10**4.5) == pytest.approx(0.55)  # halfway in log size
    with pytest.raises(ValueError):
        hw.Link(name="x", kind="pcie", bandwidth=1, efficiency=((10, 0.5), (5, 0.6)))


def test_for_ep():
    c = hw.get_cluster("h800-ib")
    assert c.for_ep(8).num_nodes == 1 and c.for_ep(64).num_nodes == 8
    assert c.for_ep(4).gpus_per_node == 4
    with pytest.raises(hw.HardwareError, match="multiple of 8"):
        c.for_ep(24 + 1)
    with pytest.raises(hw.HardwareError, match="divide"):
        c.for_ep(3)


def test_cluster_yaml(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("cluster:\n  name: mine\n  gpu: h100-sxm\n  num_nodes: 2\n"
                    "  gpus_per_node: 8\n  nvlink: nvlink4-h100\n  nic: {preset: cx7-ib-400g,"
                    " bandwidth: 40.0e9}\n  nics_per_node: 8\n")
    c = hw.load_cluster(good)
    assert c.num_gpus == 16 and c.nic.bandwidth == 40e9 and c.gpu.name == "h100-sxm"
    over = tmp_path / "o.yaml"
    over.write_text("preset: h800-ib\nnum_nodes: 4\n")
    assert hw.load_cluster(over).num_gpus == 32


@pytest.mark.parametrize("text, match", [
    ("name: x\ngpu: h100-sxm\nnum_nodes: 2\ngpus_per_node: 8\nnvlink: nvlink4-h100\n",
     "need a 'nic'"),
    ("name: x\ngpu: h100-sxm\nnum_nodes: 0\ngpus_per_node: 8\nnvlink: nvlink4-h100\n",
     "num_nodes"),
    ("name: x\ngpu: b300\nnum_nodes: 1\ngpus_per_node: 8\nnvlink: nvlink4-h100\n",
     "unknown device preset 'b300'"),
    ("name: x\ngpu: h100-sxm\nnum_nodes: 1\ngpus_per_node: 8\nnvlink: nvlink4-h100\n"
     "nic: cx7-ib-400g\nnics_per_node: 3\n", "must divide"),
    ("name: x\ngpu: h100-sxm\nnum_nodes: 1\ngpus_per_node: 8\nnvlink: nvlink4-h100\ncolour: red\n",
     "colour"),
    (": : :\n", "not valid YAML"),
])
def test_bad_cluster_yaml_is_one_line(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(MoesimError, match=match) as err:
        hw.load_cluster(p)
    assert "\n" not in str(err.value)


def test_unknown_presets():
    for fn in (hw.get_device, hw.get_cluster, hw.get_link, hw.get_machine, hw.load_cluster):
        with pytest.raises(MoesimError, match="unknown"):
            fn("does-not-exist")


def test_h800_preset_carries_the_fit():
    c = hw.get_cluster("h800-ib")
    assert c.comm.nvl_bw == pytest.approx(158.4e9, rel=0.01)
    assert "fit_deepep" in c.comm.source
