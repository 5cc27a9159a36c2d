"""Predict the words behind ``[MASK]`` with a trained BERT: a checkpoint or an exported directory.

    python -m lm_lab.fill_mask SOURCE "The [MASK] sat on the mat." [--top-k 5]

prints the ``top-k`` tokens (with probabilities) for every ``[MASK]`` and the text with each mask
replaced by its best guess. An exported directory is loaded back into lm_lab's own model, so it
gives the same predictions as the checkpoint it came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from lm_lab.training.console import run_command


def load_source(source: str | Path) -> Any:
    """A ``MaskedLMTask`` (eval mode) from a ``.ckpt`` or an exported HF directory."""
    from lm_lab.training.checkpoints import load_task

    return load_task(source, able_to="fill_mask", hint="use python -m lm_lab.generate for a decoder (GPT-2, Llama)")


def format_predictions(text: str, predictions: list[list[tuple[str, float]]]) -> str:
    lines = []
    for k, preds in enumerate(predictions, 1):
        lines.append(f"[MASK] {k}: " + "  ".join(f"{t} ({p:.3f})" for t, p in preds))
    filled = text
    for preds in predictions:
        best = preds[0][0]
        filled = filled.replace("[MASK]", best[2:] if best.startswith("##") else best, 1)
    lines.append(f"filled: {filled}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lm_lab.fill_mask", description="Fill [MASK] tokens with a trained BERT."
    )
    p.add_argument("source", help="a .ckpt file or an exported directory")
    p.add_argument("text", help="text with one or more [MASK] tokens")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from lm_lab.errors import USER_ERRORS

    if args.top_k < 1:
        print("error: --top-k must be >= 1", file=sys.stderr)
        return 2
    if "[MASK]" not in args.text:
        print(
            "error: the text has no [MASK]: write [MASK] where a word should be predicted, "
            "e.g. 'The [MASK] sat on the mat.'",
            file=sys.stderr,
        )
        return 2
    try:
        task = load_source(args.source).to(args.device)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        predictions = task.fill_mask(args.text, top_k=args.top_k)
    except ValueError as e:  # no [MASK] after tokenization, text too long
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_predictions(args.text, predictions))
    return 0


def cli() -> None:
    """The ``lm-lab-*`` console script and ``python -m``: ``main()`` as the whole process."""
    run_command(main)


if __name__ == "__main__":
    cli()
