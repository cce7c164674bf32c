"""Run one benchmark: `python -m benchmarks.run NAME [--quick]`.

Each benchmark interleaves its contenders (A B A B ...) after a warm-up, reports medians and ratios, writes
`benchmarks/results/NAME.json` (`NAME_quick.json` with `--quick`; figures, versions, machine, the load average
at start and end), a PNG chart where one helps, and prints one JSON line with the headline last.
`--smoke` is a tinier budget still (what the test suite runs); `--out DIR` writes elsewhere.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = (
    "overhead",
    "trainer",
    "caching",
    "adapters",
    "quality",
    "startup",
    "tune",
    "surgical",
    "choose",
    "time_to_accuracy",
)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import lightning
    import timm
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("peft", "accelerate", "datasets", "torchmetrics"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    from peft_lightning.engine.precision import CPU_BF16_FLAGS, cpu_flags

    return {
        "cpu": cpu,
        "cpu_bf16_units": sorted(f for f in CPU_BF16_FLAGS if f in cpu_flags()),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **versions,
    }


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages: on a shared machine, what else was running."""
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on 2 free CPU cores)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tinier budget than --quick, for the test suite (benchmarks that have none run their --quick budget)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the offline recipes' assets are local; never wait on a hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    module = importlib.import_module(f"benchmarks.{args.name}")
    from benchmarks.common import quiet_unless_debug

    quiet_unless_debug()  # its Trainers and from_pretrained calls in this process, as `fit` does for its own
    quick = args.quick or args.smoke
    kwargs = {"smoke": True} if args.smoke and "smoke" in inspect.signature(module.run).parameters else {}
    started, load_start = time.time(), load()
    result = module.run(quick=quick, **kwargs)
    mode = "smoke" if args.smoke else "quick" if quick else "full"
    command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    chart = result.pop("chart", None)
    result = {
        "benchmark": args.name,
        "quick": quick,
        "mode": mode,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "load_avg_start": load_start,
        "load_avg_end": load(),
        "machine": machine(),
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name + ("" if mode == "full" else f"_{mode}")
    out = args.out / f"{stem}.json"
    if chart is not None:
        from benchmarks.common import bar_chart

        title = f"{chart['title']} [{mode}; load {load_start[0]:.1f}-{result['load_avg_end'][0]:.1f}]"
        bar_chart(args.out / f"{stem}.png", title, chart["groups"], chart["ylabel"], chart.get("notes"))
        result["chart"] = f"{stem}.png"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"benchmark": args.name, "mode": mode, "results": str(out), **result["headline"]}))


if __name__ == "__main__":
    main()
