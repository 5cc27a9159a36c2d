"""Training-step throughput of lm_lab's GPT and Llama against ``transformers`` at equal config, on CPU.

    python bench/hf_speed.py [--models gpt_mini llama_mini] [--block 256] [--batch 4] [--vocab 8192]
                             [--steps 2] [--repeats 3]

For each preset: lm_lab's network and the ``transformers`` model built from the same config by the
export mapping (``GPT2LMHeadModel`` / ``LlamaForCausalLM``, its default attention implementation),
with lm_lab's weights copied in; the script first checks that both give the same logits. Each
then trains on the same random token batches: forward, the same next-token cross-entropy,
backward, ``torch.optim.AdamW`` step. The two take turns step by step (so load from other jobs hits
both alike); reported: the median over ``repeats`` timings of ``steps`` steps, tokens/s, and the
ratio lm_lab / transformers. fp32.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def build_pair(preset: str, vocab: int, block: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lm_lab network, transformers model) with the same weights."""
    import hydra
    import transformers
    from omegaconf import OmegaConf

    from lm_lab import registry

    yaml = OmegaConf.load(REPO / "conf" / "model" / f"{preset}.yaml")
    yaml.pop("defaults", None)
    cfg = hydra.utils.instantiate(yaml, vocab_size=vocab, max_seq_len=max(block, yaml.max_seq_len))
    torch.manual_seed(0)
    spec = registry.network_of(cfg)
    ours = spec.build(cfg).train()
    mapping = importlib.import_module(spec.hf)
    hf_cfg = mapping.hf_config_dict(cfg)
    arch = hf_cfg["architectures"][0]
    config_cls = transformers.AutoConfig.for_model(hf_cfg.pop("model_type")).__class__
    hf_cfg.pop("architectures")
    theirs = getattr(transformers, arch)(config_cls(**hf_cfg)).train()
    missing, unexpected = theirs.load_state_dict(mapping.hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()
    x = torch.randint(0, vocab, (2, 32))
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x).logits).abs().max().item()
    assert diff < 1e-4, f"{preset}: logits differ by {diff}"
    return ours.train(), theirs.train()


class Trainer:
    def __init__(self, model: torch.nn.Module, hf: bool) -> None:
        self.model, self.hf = model, hf
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        x, y = ids[:, :-1], ids[:, 1:]
        logits = self.model(x).logits if self.hf else self.model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt_mini", "llama_mini"])
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2, help="steps per timing")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    import transformers

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=g) for _ in range(args.steps)]
    rows: list[tuple[str, str, float, float]] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for preset in args.models:
        ours, theirs = build_pair(preset, args.vocab, args.block)
        impls: dict[str, Any] = {
            f"lm_lab {type(ours).__name__}": Trainer(ours, hf=False),
            f"transformers {type(theirs).__name__} ({theirs.config._attn_implementation})": Trainer(theirs, hf=True),
        }
        for impl in impls.values():  # warm-up
            impl.step(batches[0])
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.repeats):
            total = dict.fromkeys(impls, 0.0)
            for b in batches:
                for name, impl in impls.items():
                    total[name] += impl.step(b)
            for name in impls:
                times[name].append(total[name])
        base = statistics.median(times[list(impls)[1]])
        for name in impls:
            rows.append((preset, name, statistics.median(times[name]), base))
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    tokens = args.batch * args.block * args.steps
    print(
        f"batch {args.batch} x block {args.block}, vocab {args.vocab}; forward + backward + AdamW, fp32; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats} x {args.steps} steps, alternating"
    )
    print(f"CPU time / wall time while timing: {busy:.2f} (load average {load0:.2f} at start)")
    if busy < 0.9 * torch.get_num_threads():
        print("warning: the threads did not get the CPUs to themselves: other jobs are running")
    print("| preset | implementation | ms/step | tokens/s | tokens/s vs transformers |")
    print("| --- | --- | ---: | ---: | ---: |")
    for preset, name, t, base in rows:
        print(f"| {preset} | {name} | {1000 * t / args.steps:.1f} | {tokens / t:,.0f} | {base / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
