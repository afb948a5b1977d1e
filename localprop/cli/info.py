"""``localprop info``: versions, backends present, devices."""
from __future__ import annotations

import platform

import torch

from localprop import __version__
from localprop.ops import backends


def collect() -> dict:
    """Versions, devices and, per device type, each backend's availability."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + ([f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
                         if cuda else [])
    report = {"localprop": __version__, "python": platform.python_version(), "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "triton": triton_version, "devices": devices,
              "cpu_threads": torch.get_num_threads(),
              "backends": {"cpu": backends.report(torch.device("cpu"))}}
    if cuda:
        report["backends"]["cuda"] = backends.report(torch.device("cuda"))
    return report


def run(args) -> int:
    info = collect()
    for key, value in info.items():
        if key == "backends":
            for device, table in value.items():
                print(f"backends on {device}:")
                auto = backends.resolve("auto", torch.device(device))
                for name, status in table.items():
                    mark = " (auto)" if name == auto else ""
                    print(f"  {name:<10} {status}{mark}")
        elif key == "devices":
            print(f"{'devices':<12} {', '.join(value)}")
        else:
            print(f"{key:<12} {value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, backends present, devices")
    p.set_defaults(func=run)
