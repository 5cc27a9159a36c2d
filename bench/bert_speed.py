"""BERT training-step throughput: lm_lab's BertForPreTraining vs transformers' BertForPreTraining.

    python bench/bert_speed.py [--model bert_mini] [--block 128] [--batch 32] [--vocab 30522]
                               [--corpus pydocs|shakespeare] [--steps 8] [--repeats 5]

Both train on the same real batches from lm_lab's BERT pipeline (sentence pairs with their real
length distribution, 15% masking), same architecture, same AdamW (PyTorch's fused kernel: lm_lab's
default ``optimizer.fused=null`` picks it on CPU, and transformers' ``Trainer`` defaults to
``optim="adamw_torch_fused"`` with torch >= 2.8); tokens/s counts real (non-pad)
tokens. lm_lab: its attention (SDPA's math in fp32 with lm_lab's faster CPU dropout mask while
attention dropout is on: ``lm_lab.models.layers.dropout``), the encoder on the real tokens only (``Unpadded``: padding is left
out of every layer but attention), MLM head only at masked positions, batches padded to their longest
pair. transformers: its default attention, every batch padded to the block size (as a fixed-shape
pipeline does), MLM head over all positions. Row 2 computes the MLM head everywhere; row 3 pads the batch to the block (which the unpadded encoder then skips).
The ``bf16-mixed`` rows run the forward pass and loss under ``torch.autocast("cpu", torch.bfloat16)``
(Lightning's ``trainer.precision=bf16-mixed``; fp32 weights and optimizer), for lm_lab and for
transformers alike; lm_lab then attends on CPU as ``lm_lab.models.layers.sdpa`` does (up to 128
positions as math with bf16 matmuls and an fp32 softmax, longer sequences by the fused kernel in
fp32), transformers with SDPA on the bf16 tensors. Ratios are against transformers in fp32 (its default) and, for the bf16 row, also against
transformers under the same autocast. bf16 needs a CPU with AVX512-BF16 or AMX to be fast
(``--precision fp32`` leaves those rows out).
Reported: the median over ``repeats`` timings of ``steps`` steps; the implementations take turns
step by step, so that load changes hit all of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def real_batches(args: argparse.Namespace) -> tuple[list[dict[str, torch.Tensor]], Any]:
    from lm_lab.data.options import DataConfig
    from lm_lab.objectives.masked_lm.data import MaskedLMDataModule

    corpus: dict[str, Any] = {"path": "pydocs"}
    if args.corpus == "shakespeare":
        corpus = {"path": "text", "data_files": str(SHAKESPEARE), "sample_by": "paragraph"}
    cfg = DataConfig(
        **corpus,
        vocab_size=args.vocab,
        block_size=args.block,
        batch_size=args.batch,
        cache_dir=str(REPO / ".cache" / "lm_lab"),
    )
    dm = MaskedLMDataModule(cfg, seed=0)
    dm.prepare_data()
    dm.setup()
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == args.steps:
            break
    return batches, dm.tokenizer


def pad_to(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    fill = {"input_ids": 0, "token_type_ids": 0, "attention_mask": 0, "labels": -100}
    out = dict(batch)
    for key, value in fill.items():
        t = batch[key]
        out[key] = F.pad(t, (0, length - t.size(1)), value=value)
    return out


def autocast(bf16: bool) -> Any:
    """The forward pass and loss under bf16 autocast (as Lightning's ``bf16-mixed``), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class Ours:
    def __init__(self, cfg: Any, masked_head: bool, dynamic: bool, block: int, bf16: bool = False) -> None:
        from lm_lab.models.bert import BertForPreTraining as BertModel

        self.model, self.masked_head, self.dynamic, self.block = BertModel(cfg).train(), masked_head, dynamic, block
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.bf16 = bf16

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        b = batch if self.dynamic else pad_to(batch, self.block)
        labels = b["labels"]
        positions = labels != -100
        with autocast(self.bf16):
            out = self.model(
                b["input_ids"],
                b["token_type_ids"],
                b["attention_mask"],
                mlm_positions=positions if self.masked_head else None,
            )
            logits = out.mlm_logits if self.masked_head else out.mlm_logits[positions]
            loss = F.cross_entropy(logits.float(), labels[positions]) + F.cross_entropy(
                out.nsp_logits.float(), b["next_sentence_label"]
            )
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class HF:
    def __init__(self, cfg: Any, block: int, bf16: bool = False) -> None:
        import transformers

        from lm_lab.models.bert.hf import hf_config_dict

        kwargs = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("model_type", "architectures")}
        self.model = transformers.BertForPreTraining(transformers.BertConfig(**kwargs)).train()
        self.attn = self.model.config._attn_implementation
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.block, self.bf16 = block, bf16

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        b = pad_to(batch, self.block)
        with autocast(self.bf16):
            out = self.model(
                input_ids=b["input_ids"],
                token_type_ids=b["token_type_ids"],
                attention_mask=b["attention_mask"],
                labels=b["labels"],
                next_sentence_label=b["next_sentence_label"],
            )
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item()


def timed_step(impl: Any, batch: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    impl.step(batch)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert_mini", help="a conf/model/bert_*.yaml preset")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=30522, help="WordPiece vocabulary to train (BERT's: 30522)")
    p.add_argument("--corpus", choices=["pydocs", "shakespeare"], default="pydocs")
    p.add_argument("--steps", type=int, default=8, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=["both", "fp32"], default="both", help="fp32: leave the bf16-mixed rows out")
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]  # before our own work
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import hydra
    from omegaconf import OmegaConf

    datasets.disable_progress_bars()
    batches, tok = real_batches(args)
    model_yaml = OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml")
    model_yaml.pop("defaults", None)  # the preset's objective choice is for Hydra's composition, not the config
    cfg = hydra.utils.instantiate(model_yaml, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    impls = {
        "lm_lab (SDPA, masked-only head, dynamic padding)": Ours(cfg, True, True, args.block),
        "lm_lab, full MLM head": Ours(cfg, False, True, args.block),
        "lm_lab, padded to block": Ours(cfg, True, False, args.block),
    }
    bf16 = args.precision == "both"
    if bf16:
        impls["lm_lab, bf16-mixed (lm_lab's CPU attention)"] = Ours(cfg, True, True, args.block, bf16=True)
    hf = HF(cfg, args.block)
    if bf16:
        impls[f"transformers, bf16-mixed ({hf.attn}, padded, full head)"] = HF(cfg, args.block, bf16=True)
    hf_name = f"transformers BertForPreTraining ({hf.attn}, padded, full head)"
    impls[hf_name] = hf
    for impl in impls.values():  # warm-up (allocator, kernels)
        for batch in batches[:2]:
            timed_step(impl, batch)
    # Step by step in turn, so that a noisy neighbour slows every implementation alike.
    times: dict[str, list[float]] = {name: [] for name in impls}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.repeats):
        total = dict.fromkeys(impls, 0.0)
        for batch in batches:
            for name, impl in impls.items():
                total[name] += timed_step(impl, batch)
        for name in impls:
            times[name].append(total[name])
    # On an idle machine the process keeps all its threads busy: CPU time ~ threads x wall time.
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)

    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    mean_len = statistics.mean(b["input_ids"].size(1) for b in batches)
    print(
        f"{args.model} (L={cfg.n_layer}, H={cfg.n_embd}, A={cfg.n_head}), vocab {cfg.vocab_size}, batch {args.batch} "
        f"x block {args.block}, corpus {args.corpus}: {real_tokens / len(batches) / args.batch:.1f} real tokens per "
        f"sequence, dynamic padding to {mean_len:.1f} on average; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} x {args.steps} steps"
    )
    print(
        f"CPU time / wall time while timing: {busy:.2f} (of {torch.get_num_threads()} threads; "
        f"load average {load0:.2f} at start)"
    )
    if busy < 0.9 * torch.get_num_threads():
        print(
            "warning: the threads did not get the CPUs to themselves: other jobs are running, rerun on an idle machine"
        )
    base = statistics.median(times[hf_name])
    hf_bf16 = next((statistics.median(v) for k, v in times.items() if k.startswith("transformers, bf16")), None)
    width = max(map(len, impls))
    print(f"| {'implementation':<{width}} | ms/step | tokens/s | vs transformers fp32 | vs transformers bf16-mixed |")
    print(f"|{'-' * (width + 2)}|--------:|---------:|---------------------:|---------------------------:|")
    for name in impls:
        t = statistics.median(times[name])
        same = f"{hf_bf16 / t:.2f}x" if hf_bf16 is not None and "bf16" in name else ""
        print(
            f"| {name:<{width}} | {1000 * t / len(batches):7.1f} | {real_tokens / t:8.0f} | {base / t:19.2f}x "
            f"| {same:>26} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
