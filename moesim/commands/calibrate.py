"""``moesim calibrate --out HW.yaml``: measure this machine and write a hardware profile."""

from __future__ import annotations

from pathlib import Path

import typer

from moesim.commands.common import JSON_OPTION, emit


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        out: Path = typer.Option(..., "--out", help="Profile to write (YAML)."),
        disk_dir: Path = typer.Option(None, "--disk-dir",
                                      help="Folder on the disk to time (default: temp dir)."),
        quick: bool = typer.Option(False, "--quick", help="Fewer sizes (a few seconds)."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Time CPU GEMM by size, memory copy, cold disk read (and CUDA copies/GEMM if present)."""
        import yaml

        from moesim.calibrate import measure_machine
        from moesim.fileio import write_text_atomic

        if disk_dir is not None and not disk_dir.is_dir():
            from moesim.errors import MoesimError

            raise MoesimError(f"--disk-dir {disk_dir}: not a folder")
        profile = measure_machine(str(disk_dir) if disk_dir else None, quick=quick)
        write_text_atomic(out, yaml.safe_dump(profile, sort_keys=False))
        summary = {
            "out": str(out),
            "cpu_gemm_gflops": profile["device"]["flops"]["fp32"] / 1e9,
            "memcpy_gbps": profile["links"]["memcpy"]["bandwidth"] / 1e9,
            "disk_read_gbps": profile["links"]["storage"]["bandwidth"] / 1e9,
            "disk_cold": profile["raw"]["disk"]["cold"],
            "cuda": profile.get("accelerator", {}).get("name"),
        }
        if "host_to_device" in profile["links"]:
            summary["h2d_pinned_gbps"] = profile["links"]["host_to_device"]["bandwidth"] / 1e9
        emit(summary, as_json)
