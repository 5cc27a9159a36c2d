"""lm_lab: pretrain GPT and BERT language models with Lightning, Hydra, datasets and W&B."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_checkpoint(path: str, map_location: str = "cpu") -> Any:
    """Load a trained checkpoint: the LightningModule in eval mode with ``.tokenizer``."""
    from lm_lab.training.checkpoints import load_checkpoint as _load

    return _load(path, map_location=map_location)


__all__ = ["load_checkpoint", "__version__"]
