"""Throughput, FLOPs per token, MFU and peak memory (``callbacks.throughput``), on real tiny runs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from lm_lab.models.bert.model import BertConfig
from lm_lab.models.gpt import GPT, GPTConfig
from lm_lab.models.llama.model import Llama, LlamaConfig
from lm_lab.objectives.masked_lm.settings import MaskedLMConfig
from lm_lab.objectives.masked_lm.task import MaskedLMTask
from tests.conftest import SHAKESPEARE, TINY
from train import train


def test_gpt_flops_per_token_by_hand() -> None:
    """PaLM: 6N + 12·L·H·Q·T, N without the position table (the tied embedding is the output head's matmul)."""
    net = GPT(GPTConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=16, max_seq_len=64))
    # per layer: ln_1 32, c_attn 16*48+48, c_proj 16*16+16, ln_2 32, c_fc 16*64+64, c_proj 64*16+16 = 3,280
    n = 100 * 16 + 2 * 3280 + 32  # wte (= lm_head) + layers + ln_f = 8,192
    assert net.num_params() == n
    assert net.estimate_flops_per_token(32) == 6 * 8192 + 12 * 2 * 16 * 32 == 61_440


def test_llama_flops_per_token_leaves_out_an_untied_embedding() -> None:
    cfg = dict(vocab_size=100, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, max_seq_len=64)
    # one layer: q k v o 4*256, gate/up/down 3*16*32, two norms 32 = 2,592; final norm 16
    tied = Llama(LlamaConfig(**cfg))
    assert tied.estimate_flops_per_token(8) == 6 * (1600 + 2592 + 16) + 12 * 1 * 16 * 8 == 26_784
    untied = Llama(LlamaConfig(**cfg, tie_embeddings=False))  # embed_tokens is a lookup: only lm_head counts
    assert untied.estimate_flops_per_token(8) == 26_784


def test_bert_flops_per_token_by_hand() -> None:
    """Encoder + MLM head on the masked fraction + pooler/NSP once per sequence."""
    cfg = BertConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)
    task = MaskedLMTask(cfg, MaskedLMConfig(pair_objective="nsp"))
    # per layer: 4*32*32 + 2*32*64 + 2*16*32 = 9,216; head (32*32 + 32*100) * 0.25 = 1,056; pair (1024 + 64) / 16 = 68
    assert task.estimate_flops_per_token(16, 0.25, 1 / 16) == 6 * (2 * 9216 + 1056 + 68) == 117_336
    no_pair = MaskedLMTask(cfg, MaskedLMConfig(pair_objective="none"))
    assert no_pair.estimate_flops_per_token(16, 0.25, 1 / 16) == 6 * (2 * 9216 + 1056)


@pytest.mark.slow
def test_metrics_in_csv_and_console_line(compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real tiny run: every window's tokens/s, FLOP/s, MFU (against the configured CPU peak) and peak
    memory reach the CSV log; FLOPs per token use the training block size (32), not model.max_seq_len
    (256); one summary line at the end."""
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        *TINY,
        f"data.data_files={SHAKESPEARE}",
        "data.path=text",
        "data.tokenizer=char",
        "trainer.max_steps=6",
        "callbacks.throughput.window=2",
        "callbacks.throughput.cpu_peak_flops=4e10",
    )
    with caplog.at_level(logging.INFO, logger="lm_lab"):
        _, objects = train(cfg)
    task = objects["task"]
    assert task.flops_per_token == task.net.estimate_flops_per_token(32) != task.net.estimate_flops_per_token(256)
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("tokens_per_sec")]
    assert len(rows) >= 2
    for r in rows:
        rate, flops, mfu, mem = (float(r[k]) for k in ("tokens_per_sec", "flops_per_sec", "mfu", "peak_memory_mib"))
        assert rate > 0 and mem > 50  # a Python process with torch resident is far above 50 MiB
        assert flops == pytest.approx(rate * task.flops_per_token, rel=1e-5)
        assert mfu == pytest.approx(flops / 4e10, rel=1e-5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("throughput: ")]
    assert len(lines) == 1
    assert "tokens/s" in lines[0] and "FLOP/s, MFU " in lines[0] and "of 40 GFLOP/s/device" in lines[0]
    assert "MiB (RSS)" in lines[0]


def test_peak_flops_override_and_bad_values() -> None:
    from lm_lab.callbacks.throughput import Throughput, peak_flops

    assert peak_flops(torch.device("cpu")) is None  # the GPU table says nothing about CPUs
    with pytest.raises(ValueError, match="cpu_peak_flops=-1 must be > 0"):
        Throughput(cpu_peak_flops=-1)
    with pytest.raises(ValueError, match="window=0 must be >= 1"):
        Throughput(window=0)
    with pytest.raises(ValueError, match="cpu_bf16_ratio=0 must be > 0"):
        Throughput(cpu_bf16_ratio=0)


@pytest.mark.parametrize(("precision", "peak"), [("32-true", 4e10), ("bf16-mixed", 1e11), ("bf16-true", 1e11)])
def test_cpu_peak_follows_the_compute_dtype(precision: str, peak: float) -> None:
    """A bf16 run's MFU is against the CPU's bf16 peak (fp32 peak x cpu_bf16_ratio), an fp32 run's
    against the fp32 peak; the override wins over both; no CPU peak, no MFU."""
    import lightning as L

    from lm_lab.callbacks.throughput import Throughput

    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False)
    cpu = torch.device("cpu")
    assert Throughput(cpu_peak_flops=4e10, cpu_bf16_ratio=2.5).device_peak(trainer, cpu) == pytest.approx(peak)
    assert Throughput(peak_flops=7e9, cpu_peak_flops=4e10).device_peak(trainer, cpu) == 7e9
    assert Throughput(cpu_peak_flops=None).device_peak(trainer, cpu) is None
