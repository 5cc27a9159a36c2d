"""Sample text from a trained decoder (GPT-2, Llama): a checkpoint or an exported Hugging Face directory.

    python -m lm_lab.generate SOURCE --prompt TEXT [--max-new-tokens N] [--temperature T]
                              [--top-k K] [--top-p P] [--seed S] [--raw]

``--temperature 0`` is greedy decoding and gives the same text from a checkpoint and from its
export (the exported weights are loaded back into lm_lab's own model).

A checkpoint of an instruction-tuned model (``objective=sft``) answers the prompt in its own
template (``objective.template``, named on stderr); ``--raw`` continues the prompt as it is. The
output is the prompt as given followed by the generated text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from lm_lab.training.console import run_command


def load_source(source: str | Path) -> Any:
    """A decoder's ``CausalLMTask`` (eval mode) from a ``.ckpt`` or an exported HF directory."""
    from lm_lab.training.checkpoints import load_task

    return load_task(source, able_to="generate", hint="use python -m lm_lab.fill_mask for an encoder (BERT)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lm_lab.generate", description="Sample text from a trained decoder (GPT-2, Llama)."
    )
    p.add_argument("source", help="a .ckpt file or an exported directory")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--raw",
        action="store_true",
        help="continue the prompt as it is, without an instruction-tuned checkpoint's prompt template",
    )
    args = p.parse_args(argv)
    from lm_lab.errors import USER_ERRORS

    if args.temperature < 0 or args.max_new_tokens < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        print("error: need --temperature >= 0, --max-new-tokens >= 0 and 0 < --top-p <= 1", file=sys.stderr)
        return 2
    try:
        task = load_source(args.source).to(args.device)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {}
    if callable(getattr(task, "format_prompt", None)):  # an instruction-tuned model (objective=sft)
        options["raw"] = args.raw
        if not args.raw:
            print(
                f"prompt template (objective.template; --raw to skip it): {task.objective_cfg.template!r}",
                file=sys.stderr,
            )
    text = task.generate(
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        **options,
    )
    sys.stdout.write(args.prompt + text + "\n")
    return 0


def cli() -> None:
    """The ``lm-lab-*`` console script and ``python -m``: ``main()`` as the whole process."""
    run_command(main)


if __name__ == "__main__":
    cli()
