"""``compile=true``: the network compiled by ``torch.compile``, its CPU training as reproducible as eager's.

Inductor's C++ kernels accumulate the token embedding's gradient (an ``index_put`` whose token ids
repeat) with atomic adds from every thread, in whatever order the threads get there. So on a CPU
with two threads or more, two compiled runs from the same seed were not the same run: on nanoGPT's
character-level recipe, 28 of 29 repeated backward passes of one batch gave gradients that differ
in their last bits, the per-step losses of two 60-step runs parted at step ~10, and three whole
runs ended at val/loss 1.8998, 1.8993 and 1.8998 (eager: 1.8984 every time). A resumed compiled run
could not equal the uninterrupted one either. With PyTorch's deterministic algorithms on, Inductor
lowers that accumulation to ATen's deterministic ``index_put_`` instead (0 of 29 differ; repeated
runs the same to the bit). ``compile_network`` turns them on for a compiled run on CPU
(``warn_only``: an op without a deterministic kernel warns instead of failing) unless they are on
already (``trainer.deterministic``), and ``torch_flags_kept`` puts PyTorch's flags back when
``train()`` returns (a sweep runs its jobs in one process). GPUs are left alone: there the choice
between speed and bitwise reproducibility is ``trainer.deterministic``'s, as in Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("lm_lab")


def compile_network(net: nn.Module, *, on_cpu: bool) -> None:
    """Compile ``net`` in place (``nn.Module.compile``: its state dict keeps the eager names); on CPU,
    with deterministic algorithms, so that compiled training gives the same result on every run."""
    import torch

    if on_cpu and not torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.info("compile=true on CPU: deterministic algorithms on, so that runs and resumes are reproducible")
    net.compile()


@contextlib.contextmanager
def torch_flags_kept() -> Iterator[None]:
    """Restore PyTorch's deterministic-algorithm flags on exit (the Trainer and ``compile_network``
    set them for a run; the process may go on to another). Imports nothing: ``train()`` enters it
    before torch is imported (torch's own defaults are then the flags to restore)."""
    torch = sys.modules.get("torch")
    saved = (
        (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        if torch is not None
        else (False, False)
    )
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
