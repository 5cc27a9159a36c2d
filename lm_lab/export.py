"""Export a checkpoint as a Hugging Face ``transformers`` directory.

    python -m lm_lab.export CHECKPOINT OUT_DIR

writes ``config.json``, ``model.safetensors`` and the tokenizer files, loadable with
``AutoModelForCausalLM`` (GPT-2, Llama) / ``BertForPreTraining`` (BERT) and ``AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from lm_lab.training.console import run_command


def hf_files(task: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, state dict) in Hugging Face layout for a loaded task, by its network's mapping
    in the registry (``lm_lab/models/<network>/hf.py``)."""
    config, state = task.hf_files()
    tok = task.tokenizer
    if tok is not None:
        for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, role, None)
            if value is not None:
                config[role] = value
    return config, state


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the HF directory atomically (a temporary sibling renamed into place)."""
    from lm_lab.training.checkpoints import load_checkpoint

    task = load_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # mkdtemp makes the folder private (0700); the export is a normal folder (0777 less the umask).
        tmp.chmod(0o777 & ~_umask())
        config, state = hf_files(task)
        config["transformers_version"] = _transformers_version()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        if task.tokenizer is not None:
            task.tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_lab.export", description=__doc__.splitlines()[1])
    parser.add_argument("checkpoint", help="an lm_lab .ckpt file")
    parser.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    from lm_lab.errors import USER_ERRORS

    try:
        out = export(args.checkpoint, args.out_dir)
    except (*USER_ERRORS, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out} (load with transformers' from_pretrained)")
    return 0


def cli() -> None:
    """The ``lm-lab-*`` console script and ``python -m``: ``main()`` as the whole process."""
    run_command(main)


if __name__ == "__main__":
    cli()
