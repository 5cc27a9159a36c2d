"""Sample text from a trained GPT: a checkpoint or an exported Hugging Face directory.

    python -m lm_lab.generate SOURCE --prompt TEXT [--max-new-tokens N] [--temperature T]
                              [--top-k K] [--top-p P] [--seed S]

``--temperature 0`` is greedy decoding and gives the same text from a checkpoint and from its
export (the exported weights are loaded back into lm_lab's own model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch


def load_source(source: str | Path) -> Any:
    """A ``CausalLMTask`` from a ``.ckpt`` or an exported HF directory."""
    from lm_lab.checkpoint import load_task_of_family

    path = Path(source)
    if path.is_dir():
        return _from_hf_dir(path)
    return load_task_of_family(path, "gpt", "use python -m lm_lab.fill_mask for BERT")


def _from_hf_dir(path: Path) -> Any:
    from lm_lab.checkpoint import read_export_dir
    from lm_lab.models.gpt import GPTConfig, load_hf_state_dict
    from lm_lab.models.layers import HF_ACTIVATION_NAMES
    from lm_lab.tasks.causal_lm import CausalLMTask

    hf, weights, tokenizer = read_export_dir(path, "gpt2", "lm_lab.generate reads GPT-2 layouts")
    act = {v: k for k, v in HF_ACTIVATION_NAMES.items()}.get(hf.get("activation_function", "gelu_new"), "gelu_tanh")
    cfg = GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        max_seq_len=hf["n_positions"],
        dropout=0.0,
        bias=True,
        activation=act,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    task = CausalLMTask(cfg, tokenizer=tokenizer)
    load_hf_state_dict(task.net, weights)
    return task.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm_lab.generate", description="Sample text from a trained GPT.")
    p.add_argument("source", help="a .ckpt file or an exported directory")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    text = task.generate(
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    sys.stdout.write(args.prompt + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
