"""Run one benchmark: `python -m benchmarks.run NAME [--quick]`.

Each benchmark interleaves its contenders (A B A B ...) after a warm-up, reports medians and ratios, writes
`benchmarks/results/NAME.json` (figures, versions, machine) and prints one JSON line with the headline last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = ("caching", "adapters")


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import lightning
    import timm

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "timm": timm.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="a smoke run (under 2 minutes on 2 CPU cores)")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"benchmarks.{args.name}")
    result = module.run(quick=args.quick)
    result = {"benchmark": args.name, "quick": args.quick, "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
              "machine": machine(), **result}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"benchmark": args.name, "results": str(out), **result["headline"]}))


if __name__ == "__main__":
    main()
