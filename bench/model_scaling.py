"""Training throughput and peak memory on CPU as functions of sequence length and model size.

    python bench/model_scaling.py [--tokens 2048] [--steps 2] [--vocab 8192]
                            [--lengths 64 128 256 512 1024] [--length-model gpt_mini]
                            [--sizes gpt_tiny gpt_mini gpt_6m gpt_30m] [--size-block 256]

Each point runs in its own Python process, so that its peak resident set size (``getrusage``) is its
own: build the GPT, one warm-up step, then ``--steps`` timed training steps (forward, next-token
cross-entropy, backward, AdamW) on random tokens, ``--tokens`` tokens per step (batch = tokens /
sequence length). Sweep 1: ``--length-model`` at each of ``--lengths``. Sweep 2: each of ``--sizes``
at ``--size-block`` tokens; besides the presets, ``gpt_6m`` (4 layers, 256 wide) and ``gpt_30m``
(8 layers, 512 wide, 8 heads: ~29M parameters with the default vocabulary) are defined here.
Reported: tokens/s (mean over the timed steps), achieved FLOP/s by PaLM's count (6N + 12·L·H·T per
token), and peak RSS (of the process, and above the RSS before the first step). fp32. The points
run one after another, not interleaved: compare them only within one run, on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXTRA = {
    "gpt_6m": dict(n_layer=4, n_head=4, n_embd=256),
    "gpt_30m": dict(n_layer=8, n_head=8, n_embd=512),
}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def one(model: str, block: int, tokens: int, steps: int, vocab: int) -> dict[str, float]:
    """Run one point in this process; returns its measurements."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from lm_lab.models.gpt import GPT, GPTConfig

    if model in EXTRA:
        kw = dict(EXTRA[model])
    else:
        yaml = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")
        kw = {k: yaml[k] for k in ("n_layer", "n_head", "n_embd")}
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=vocab, max_seq_len=block, **kw)).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = max(1, tokens // block)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, block + 1), generator=g) for _ in range(steps + 1)]
    rss0 = rss_mib()

    def step(ids: torch.Tensor) -> None:
        logits = net(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(data[0])  # warm-up
    t0 = time.perf_counter()
    for ids in data[1:]:
        step(ids)
    seconds = time.perf_counter() - t0
    rate = batch * block * steps / seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "params": net.num_params(non_embedding=False),
        "batch": batch,
        "tokens_per_sec": rate,
        "flops_per_sec": rate * net.estimate_flops_per_token(block),
        "peak_rss_mib": peak,
        "rss_before_mib": rss0,
    }


def run_point(model: str, block: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", model, str(block), "--tokens", str(args.tokens)]
    cmd += ["--steps", str(args.steps), "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(title: str, points: list[tuple[str, int, dict[str, float]]]) -> None:
    print(f"\n{title}\n")
    print(
        "| model | parameters | seq len | batch | tokens/s | GFLOP/s (PaLM count) | peak RSS (MiB) | above start (MiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, block, r in points:
        print(
            f"| {model} | {r['params'] / 1e6:.2f}M | {block} | {r['batch']} | {r['tokens_per_sec']:,.0f} | "
            f"{r['flops_per_sec'] / 1e9:.1f} | {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:,.0f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("MODEL", "BLOCK"), help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per training step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per point (after one warm-up step)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--length-model", default="gpt_mini")
    p.add_argument("--sizes", nargs="+", default=["gpt_tiny", "gpt_mini", "gpt_6m", "gpt_30m"])
    p.add_argument("--size-block", type=int, default=256)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.tokens, args.steps, args.vocab)))
        return 0
    import torch

    load0 = os.getloadavg()[0]
    print(
        f"{args.tokens} tokens per step, vocab {args.vocab}; forward + backward + AdamW, fp32; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; mean of {args.steps} steps after one warm-up; "
        f"load average {load0:.2f} at start"
    )
    lengths = [(args.length_model, n, run_point(args.length_model, n, args)) for n in args.lengths]
    table(f"Sequence length ({args.length_model})", lengths)
    sizes = [(m, args.size_block, run_point(m, args.size_block, args)) for m in args.sizes]
    table(f"Model size (sequence length {args.size_block})", sizes)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
