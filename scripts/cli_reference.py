"""Regenerate docs/cli.md, the command-line reference, from the commands' own ``--help``.

    .venv/bin/python scripts/cli_reference.py           # rewrite docs/cli.md
    .venv/bin/python scripts/cli_reference.py --check   # exit 1 if docs/cli.md is out of date (for CI)

The reference is whatever ``python -m peft_lightning ... --help`` prints (the flags' help comes from the classes'
docstrings through LightningCLI), so it cannot drift from the code as long as this script is rerun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
RECIPE = "effnet_fashion"  # the flags are the same for every recipe of a domain; the defaults are the recipe's

SECTIONS = [
    ("Commands", [], "The entry point: `python -m peft_lightning` (or the `peft-lightning` script)."),
    (
        "fit / validate / test / predict",
        ["fit", "--recipe", RECIPE, "--help"],
        f"LightningCLI's subcommands for one recipe, here `{RECIPE}` (its defaults are shown; "
        "`fit --recipe NAME --print_config` prints another recipe's). `validate`, `test` and `predict` take the same "
        "groups without the fit-only ones.",
    ),
    (
        "Fine-tuning strategies",
        "strategies",
        "`--finetuning.strategy` takes a built-in strategy's name (`full`, `head`, `freeze_unfreeze`, `gradual`, "
        "`milestones`, `retune`, `auto`), which runs it with its default options, or a `Strategy` class by name or "
        "import path, whose options follow as `--finetuning.strategy.OPTION` (`--finetuning.strategy Retune "
        "--finetuning.strategy.round_epochs 1`; in YAML `strategy: {class_path: Retune, init_args: {round_epochs: "
        "1}}`). A class given on the command line keeps the options it shares with the strategy it replaces (the "
        "recipe's). Each built-in strategy's options, from `fit --recipe NAME --finetuning.strategy.help CLASS`:",
    ),
    (
        "list",
        None,
        "Every recipe, its domain, and whether its data and weights are on this machine now "
        "(`python -m peft_lightning list`; takes no options).",
    ),
    ("tune", ["tune", "--help"], "Hyperparameter search with Optuna, each trial a `fit` (docs/tune.md)."),
    (
        "export",
        ["export", "--help"],
        "A checkpoint's adapters in the standard peft format, the merged model (--merge) and ONNX (--onnx).",
    ),
    ("plot", ["plot", "--help"], "Training curves of run folders: one run, or several overlaid."),
]


def help_text(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "110", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "peft_lightning", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # LightningCLI imports Lightning: minutes on a loaded machine
    )
    if res.returncode != 0:
        raise SystemExit(f"`python -m peft_lightning {' '.join(args)}` failed: {res.stderr.strip()[-500:]}")
    lines = res.stdout.rstrip().splitlines()
    usage = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))  # lines of the usage block
    if lines and lines[0].startswith("usage:") and usage > 5:
        # LightningCLI's usage line lists every flag again (hundreds of lines): the options below say it all.
        lines = [
            f"usage: python -m peft_lightning {' '.join(a for a in args if a != '--help')} [options]",
            *lines[next(i for i, line in enumerate(lines) if not line.strip()) :],
        ]
    return "\n".join(lines)


def strategy_help() -> list[tuple[str, str]]:
    """Each built-in strategy's ``--finetuning.strategy.help CLASS``, in one process (one Lightning import)."""
    code = (
        "import contextlib, io\n"
        "from peft_lightning.callbacks.strategies import BUILTIN\n"
        "from peft_lightning.cli import main\n"
        "for cls in BUILTIN.values():\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        f"        main(['fit', '--recipe', {RECIPE!r}, '--finetuning.strategy.help', cls.__name__])\n"
        "    print('=== ' + cls.__name__)\n"
        "    print(out.getvalue())\n"
    )
    env = {**os.environ, "COLUMNS": "110", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"the strategies' --finetuning.strategy.help failed: {res.stderr.strip()[-500:]}")
    found = []
    for block in res.stdout.split("=== ")[1:]:
        name, _, text = block.partition("\n")
        lines = text.rstrip().splitlines()
        start = next(i for i, line in enumerate(lines) if not line.strip())  # after jsonargparse's usage lines
        found.append((name, "\n".join(lines[start + 1 :])))
    return found


def render() -> str:
    lines = [
        "# Command-line reference",
        "",
        "Generated by `scripts/cli_reference.py` from the commands' `--help`; do not edit by hand. The README "
        "explains the ideas; this page lists every flag.",
        "",
    ]
    lines += [f"- [{title}](#{title.lower().replace(' / ', '--').replace(' ', '-')})" for title, _, _ in SECTIONS]
    lines.append("")
    for title, args, intro in SECTIONS:
        lines += [f"## {title}", "", intro, ""]
        if args == "strategies":
            for name, text in strategy_help():
                shown = f"fit --recipe {RECIPE} --finetuning.strategy.help {name}"
                lines += [f"### {name}", "", f"`python -m peft_lightning {shown}`:", "", "```text", text, "```", ""]
        elif args is not None:
            shown = " ".join(args) if args else "--help"
            lines += [
                f"`python -m peft_lightning {shown}`:",
                "",
                "```text",
                help_text(args or ["--help"]),
                "```",
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs from the current help")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(
                f"{OUT.relative_to(ROOT)} is out of date: run `python scripts/cli_reference.py`",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
