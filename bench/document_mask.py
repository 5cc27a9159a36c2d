"""Cost of document-aware attention (``model.document_mask``) against plain causal attention on CPU.

    python bench/document_mask.py [--models gpt_mini llama_mini] [--block 256] [--batch 4]
                                  [--doc-len 64] [--vocab 8192] [--steps 2] [--repeats 3]
                                  [--attn-repeats 30]

Table 1, attention alone (cheap, so it is repeated ``--attn-repeats`` times; the first figure to
trust on a shared machine): one attention call forward + backward on (B, n_head, T, head size)
tensors of each preset's shape, plain causal against the document mask (its construction from the
token ids included). Table 2, whole network:
one network per preset, training-mode forward + backward of the next-token loss on packed blocks of
random tokens in which documents of random length (exponential, mean ``--doc-len``) end with the
EOS token. Variants, on the same weights and batches: plain causal attention (SDPA ``is_causal``:
its fused causal kernel), the document mask (SDPA with a boolean (B, 1, T, T) mask, the CPU path),
the same with positions restarting per document, and the document mask on blocks holding a single
document (the mask's own overhead, with nothing to skip). The variants take turns step by step, so
that load from other jobs hits all alike; reported: the median over ``repeats`` timings of
``steps`` steps, and its ratio to plain causal attention. fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EOS = 0


def packed_batch(batch: int, block: int, vocab: int, doc_len: float, g: torch.Generator) -> torch.Tensor:
    """(B, T + 1) random ids 1..V-1 with EOS ending documents of exponential length (mean ``doc_len``)."""
    ids = torch.randint(1, vocab, (batch, block + 1), generator=g)
    for row in ids:
        pos = 0
        while True:
            pos += max(1, int(torch.empty(1).exponential_(1 / doc_len, generator=g)))
            if pos > block:
                break
            row[pos - 1] = EOS
    return ids


def build(preset: str, vocab: int, block: int, positions: bool) -> torch.nn.Module:
    import hydra
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(REPO / "conf" / "model" / f"{preset}.yaml")
    yaml.pop("defaults", None)
    torch.manual_seed(0)
    cfg = hydra.utils.instantiate(
        yaml,
        vocab_size=vocab,
        max_seq_len=max(block, yaml.max_seq_len),
        document_mask=True,
        document_positions=positions,
    )
    from lm_lab import registry

    return registry.network_of(cfg).build(cfg).train()


def step(net: torch.nn.Module, ids: torch.Tensor, doc: bool) -> float:
    from lm_lab.models.layers import document_ids

    t0 = time.perf_counter()
    x, y = ids[:, :-1], ids[:, 1:]
    kwargs = {"document_ids": document_ids(x, EOS)} if doc else {}
    logits = net(x, **kwargs)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    net.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def attention_times(
    preset: str, batches: list[torch.Tensor], repeats: int
) -> tuple[tuple[int, int, int, int], dict[str, float]]:
    """Median seconds of one attention forward + backward, plain causal vs document mask, at ``preset``'s shape."""
    from omegaconf import OmegaConf

    from lm_lab.models.layers import causal_attention, causal_document_mask, document_ids

    yaml = OmegaConf.load(REPO / "conf" / "model" / f"{preset}.yaml")
    b, t = batches[0].size(0), batches[0].size(1) - 1
    nh, hs = yaml.n_head, yaml.n_embd // yaml.n_head
    nkv = yaml.get("n_kv_head") or nh
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, nh, t, hs, generator=g, requires_grad=True)
    k, v = (torch.randn(b, nkv, t, hs, generator=g, requires_grad=True) for _ in range(2))

    def run(ids: torch.Tensor | None) -> float:
        t0 = time.perf_counter()
        mask = causal_document_mask(document_ids(ids[:, :-1], EOS)) if ids is not None else None
        causal_attention(q, k, v, mask=mask, enable_gqa=nkv != nh).sum().backward()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"plain causal (SDPA is_causal)": [], "document mask (SDPA bool mask)": []}
    for i in range(repeats + 1):
        ids = batches[i % len(batches)]
        plain, masked = run(None), run(ids)
        if i:  # the first round warms up
            times["plain causal (SDPA is_causal)"].append(plain)
            times["document mask (SDPA bool mask)"].append(masked)
    return (b, nh, t, hs), {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt_mini", "llama_mini"], help="conf/model presets (decoders)")
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--doc-len", type=float, default=64.0, help="mean document length in tokens")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2, help="steps per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attn-repeats", type=int, default=30)
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    batches = [packed_batch(args.batch, args.block, args.vocab, args.doc_len, g) for _ in range(args.steps)]
    docs = statistics.mean(float((b[:, :-1] == EOS).sum(1).float().mean()) + 1 for b in batches)
    single = [torch.where(b == EOS, torch.ones_like(b), b) for b in batches]  # no EOS: one document per block
    rows: list[tuple[str, str, float, float]] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    attn = {preset: attention_times(preset, batches, args.attn_repeats) for preset in args.models}
    for preset in args.models:
        plain_net, restart_net = (
            build(preset, args.vocab, args.block, False),
            build(preset, args.vocab, args.block, True),
        )
        restart_net.load_state_dict(plain_net.state_dict())
        # name -> (network, document ids?, batches)
        variants = {
            "plain causal (SDPA is_causal)": (plain_net, False, batches),
            "document mask (SDPA bool mask)": (plain_net, True, batches),
            "document mask + position restart": (restart_net, True, batches),
            "document mask, one document per block": (plain_net, True, single),
        }
        for net, doc, data in variants.values():  # warm-up
            step(net, data[0], doc)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            total = dict.fromkeys(variants, 0.0)
            for i in range(len(batches)):
                for name, (net, doc, data) in variants.items():
                    total[name] += step(net, data[i], doc)
            for name in variants:
                times[name].append(total[name])
        base = statistics.median(times[next(iter(variants))])
        for name in variants:
            t = statistics.median(times[name])
            rows.append((preset, name, t, base))
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    tokens = args.batch * args.block * args.steps
    print(
        f"batch {args.batch} x block {args.block}, {docs:.1f} documents per block on average (mean length "
        f"{args.doc_len:g}), vocab {args.vocab}; forward + backward, fp32; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} x {args.steps} steps"
    )
    print(f"CPU time / wall time while timing: {busy:.2f} (load average {load0:.2f} at start)")
    if busy < 0.9 * torch.get_num_threads():
        print("warning: the threads did not get the CPUs to themselves: other jobs are running")
    print(f"\nAttention alone, forward + backward, median of {args.attn_repeats}\n")
    print("| model | shape (B, heads, T, head size) | attention | ms | time vs plain causal |")
    print("| --- | --- | --- | ---: | ---: |")
    for preset, (shape, med) in attn.items():
        base = next(iter(med.values()))
        for name, t in med.items():
            print(f"| {preset} | {shape} | {name} | {1000 * t:.2f} | {t / base:.2f}x |")
    print(f"\nWhole network, forward + backward, median of {args.repeats} x {args.steps} steps\n")
    print("| model | attention | ms/step | tokens/s | time vs plain causal |")
    print("| --- | --- | ---: | ---: | ---: |")
    for preset, name, t, base in rows:
        print(f"| {preset} | {name} | {1000 * t / args.steps:.1f} | {tokens / t:,.0f} | {t / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
