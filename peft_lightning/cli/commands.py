"""The commands beside LightningCLI's: ``list``, ``export`` and ``plot`` (``tune`` lives in ``peft_lightning.tuning``).

Each takes the arguments after its name, prints its result, and raises ``UsageError`` for bad input (``main`` turns
it into one line and exit code 2). None imports Lightning at module import: ``list`` answers in ~0.2 s.
"""

from __future__ import annotations

import argparse
from typing import Any

from peft_lightning.errors import UsageError


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for a plain command (export, plot, tune) whose errors are one-line UsageErrors."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # type: ignore[override]
            raise UsageError(f"{name}: {message} (see `python -m peft_lightning {name} --help`)")

    return Parser(prog=f"python -m peft_lightning {name}", description=description)


def list_command(argv: list[str]) -> None:
    """``list``: every recipe, its domain, and whether its data and weights are here (takes no options)."""
    # Cards read from the recipes' source: no recipe (and so no torch) is imported.
    from peft_lightning.registry import recipe_cards

    rows = [(card.name, card.domain, *card.availability(), card.description) for card in recipe_cards()]
    width = max(len(r[0]) for r in rows)
    print(f"{'recipe':<{width}}  {'domain':<8} {'here':<5} description")
    for name, domain, ok, why, desc in rows:
        print(f"{name:<{width}}  {domain:<8} {'yes' if ok else 'no':<5} {desc}\n{'':<{width}}  {'':<8} {'':<5} ({why})")


def export_command(argv: list[str]) -> None:
    """``export``: a checkpoint's adapter in the peft format, the merged model with ``--merge``, ``model.onnx`` with
    ``--onnx``, and a model card."""
    parser = command_parser(
        "export",
        "Write a checkpoint's adapter in the standard peft format (adapter_config.json + "
        "adapter_model.safetensors, loadable by PeftModel.from_pretrained) and, with --merge, the merged "
        "model (model.safetensors for timm, merged/ with save_pretrained for transformers), with --onnx model.onnx "
        "(the merged model for onnxruntime), and README.md: a model card with the recipe, base model, data, adapter "
        "options, the checkpoint's recorded metrics and how to load it.",
    )
    parser.add_argument("--recipe", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--ckpt_path", required=True, help="a Lightning checkpoint from fit (adapter-only or full)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge", action="store_true", help="also write the model with the adapters merged in")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx: the merged model in fp32 with a dynamic batch axis (and sequence axis for "
        "text), input pixel_values or input_ids/attention_mask, output logits (vision and text; needs "
        "pip install 'peft_lightning[onnx]')",
    )
    args = parser.parse_args(argv)
    from peft_lightning.model_files.export import export, load_task
    from peft_lightning.registry import get_recipe

    task = load_task(get_recipe(args.recipe), args.ckpt_path)
    for path in export(task, args.out, merge=args.merge, onnx=args.onnx, recipe=args.recipe, ckpt_path=args.ckpt_path):
        print(path)


def plot_command(argv: list[str]) -> None:
    """``plot``: the training curves of one run folder, or of several overlaid."""
    parser = command_parser(
        "plot",
        "Training curves from run folders' metrics.csv, as a PNG. One run: loss, the monitored metric "
        "and the learning rate per layer group, with unfreeze points and re-tuning rounds marked, written "
        "to RUN_DIR/curves.png. Several runs (or a folder of runs): overlaid, written to --out.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (runs/RECIPE/TIMESTAMP), their metrics.csv, or folders holding runs",
    )
    parser.add_argument(
        "--out", help="output image (default: RUN_DIR/curves.png for one run, comparison.png for several)"
    )
    parser.add_argument("--x", choices=("step", "epoch"), default="step", help="x axis (default: step)")
    args = parser.parse_args(argv)
    from peft_lightning.output.plots import find_runs, plot_compare, plot_run

    runs = find_runs(args.runs)
    if len(runs) == 1:
        print(plot_run(runs[0], args.out, x=args.x))
    else:
        print(plot_compare(runs, args.out or "comparison.png", x=args.x))
