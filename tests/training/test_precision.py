"""``trainer.precision`` presets: those this CPU can run train a tiny GPT and BERT to losses close to
fp32; ``16-mixed`` (fp16 with loss scaling) is refused on CPU in one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lm_lab.schema import ConfigError
from tests.conftest import SHAKESPEARE, step_losses
from train import train

STEPS = 3
BASE = [
    "trainer=cpu",
    "logger=csv",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.text_samples=null",
    "sample_tokens=0",
    "final_validation=false",
    "scheduler.warmup_steps=1",
    "model.dropout=0",
    f"data.data_files={SHAKESPEARE}",
    "data.path=text",
    "data.block_size=32",
    "data.batch_size=4",
]
MODELS = {
    "gpt_tiny": ["model=gpt_tiny", "data.tokenizer=char"],
    "bert_tiny": ["model=bert_tiny", "model.attn_dropout=0", "data.sample_by=paragraph", "data.vocab_size=500"],
}
# Largest relative difference of a per-step loss to fp32 over 3 steps, measured (docs/distributed.md,
# Precision): bf16-mixed 3.2e-5 (GPT) / 2.5e-5 (BERT), bf16-true 2.3e-4 / 3.6e-4; about 10x margin.
TOLERANCE = {"bf16-mixed": 1e-3, "bf16-true": 5e-3}


def losses(compose_cfg, run_dir: Path, overrides: list[str]) -> list[float]:
    cfg = compose_cfg(*BASE, *overrides, run_dir=run_dir)
    train(cfg)
    by_step, _ = step_losses(run_dir)
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow  # six short training runs: GPT and BERT, each in three precisions
@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny"])
def test_cpu_precision_presets_train_close_to_fp32(model: str, compose_cfg, tmp_path: Path) -> None:
    reference = losses(compose_cfg, tmp_path / "fp32", [*MODELS[model], "trainer.precision=32-true"])
    assert len(reference) == STEPS and all(math.isfinite(v) for v in reference)
    for precision, tol in TOLERANCE.items():
        got = losses(compose_cfg, tmp_path / precision, [*MODELS[model], f"trainer.precision={precision}"])
        assert len(got) == STEPS and all(math.isfinite(v) for v in got), (precision, got)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, reference, strict=True))
        print(f"{model} {precision}: max relative difference to fp32 over {STEPS} steps {worst:.2e}")
        assert worst <= tol, f"{model} {precision}: losses {got} vs fp32 {reference} (max relative {worst:.2e})"


def test_fp16_with_loss_scaling_is_refused_on_cpu(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(*BASE, *MODELS["gpt_tiny"], "trainer.precision=16-mixed", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed .* needs a GPU: on CPU use"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fp16_is_refused_under_fsdp_in_one_line(compose_cfg, tmp_path: Path) -> None:
    overrides = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=16-mixed"]
    cfg = compose_cfg(*BASE[1:], *MODELS["gpt_tiny"], *overrides, run_dir=tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"trainer=fsdp cannot run trainer.precision=16-mixed .* use trainer.precision"
    ):
        train(cfg)


def test_matmul_precision_is_checked(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(*BASE, *MODELS["gpt_tiny"], "matmul_precision=fast", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"matmul_precision='fast' must be one of highest, high, medium"):
        train(cfg)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_decoders_attention_runs_on_the_flash_kernel_alone(name: str) -> None:
    """The decoders call SDPA with ``is_causal`` and no mask or forced backend, so PyTorch may pick
    the flash kernel (which CPU builds have too); restricted to it, the logits are unchanged."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lm_lab import registry

    spec = registry.network(name)
    torch.manual_seed(0)
    net = spec.build(spec.config_class()(vocab_size=97, n_layer=2, n_head=2, n_embd=32, max_seq_len=16)).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        default = net(ids)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = net(ids)
    torch.testing.assert_close(flash, default, rtol=1e-5, atol=1e-5)


def test_cpu_bf16_attention_short_sequences_as_math_long_ones_in_fp32() -> None:
    """Under CPU autocast the decoders' and BERT's attention get bf16 q/k/v. Up to
    ``CPU_BF16_MATH_ATTENTION_MAX_LEN`` positions ``sdpa`` runs the math with bf16 matmuls and an fp32
    softmax (faster than PyTorch's fused CPU kernel there): within bf16's rounding of fp32 attention,
    values and gradients. Longer sequences: fp32 SDPA on the bf16 inputs, to the bit (PyTorch's
    fused kernel is 2-5x slower in bf16). Causal, boolean-mask and padding-mask paths."""
    import torch
    import torch.nn.functional as F

    from lm_lab.models import layers
    from lm_lab.models.layers import attention, causal_attention

    short, long = layers.CPU_BF16_MATH_ATTENTION_MAX_LEN, layers.CPU_BF16_MATH_ATTENTION_MAX_LEN + 8
    g = torch.Generator().manual_seed(0)
    for t in (16, short, long):
        q, k, v = (torch.randn(2, 4, t, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
        keep = torch.rand(2, 1, 1, t, generator=g) > 0.3
        keep[..., 0] = True
        grad_out = torch.randn(2, 4, t, 8, generator=g).bfloat16()
        cases = {
            "causal": (lambda q=q, k=k, v=v: causal_attention(q, k, v), dict(is_causal=True)),
            "mask": (lambda q=q, k=k, v=v, keep=keep: attention(q, k, v, mask=keep), dict(attn_mask=keep)),
        }
        for name, (call, kwargs) in cases.items():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = call()
            assert got.dtype == torch.bfloat16, (t, name)
            got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
            leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
            exact = F.scaled_dot_product_attention(*leaves, **kwargs)
            exact_grads = torch.autograd.grad(exact, leaves, grad_out.float())
            if t > short:
                torch.testing.assert_close(got, exact.bfloat16(), rtol=0, atol=0, msg=f"{t} {name}")
                continue
            # bf16 scores and probabilities: errors of a few bf16 ulps of values of order 1.
            torch.testing.assert_close(got.float(), exact, rtol=0, atol=2e-2, msg=f"{t} {name}")
            for a, b in zip(got_grads, exact_grads, strict=True):
                torch.testing.assert_close(a.float(), b, rtol=0, atol=3e-2, msg=f"{t} {name} grad")
            assert (got.float() - exact).abs().mean() < 2e-3, (t, name)


def test_auto_precision_follows_the_hardware(tmp_path: Path) -> None:
    from lm_lab.training import precision as prec

    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert prec.cpu_has_native_bf16(str(zen4)) and prec.cpu_has_native_bf16(str(arm))
    assert not prec.cpu_has_native_bf16(str(old))
    assert not prec.cpu_has_native_bf16(str(tmp_path / "missing"))
    # Values other than auto pass through untouched; auto on this machine's CPU follows /proc/cpuinfo.
    assert prec.resolve_precision("32-true", on_gpu=False) == "32-true"
    assert prec.resolve_precision("bf16-true", on_gpu=False) == "bf16-true"
    want = "bf16-mixed" if prec.cpu_has_native_bf16() else "32-true"
    assert prec.resolve_precision("auto", on_gpu=False) == want


def test_auto_precision_reaches_the_trainer(compose_cfg, tmp_path: Path, caplog) -> None:
    import logging

    from lm_lab.training.precision import cpu_has_native_bf16

    caplog.set_level(logging.INFO)
    cfg = compose_cfg(*BASE, *MODELS["gpt_tiny"], "trainer.precision=auto", run_dir=tmp_path / "run")
    train(cfg)
    want = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    assert f"trainer.precision=auto: {want}" in caplog.text
    lightning_says = "Using bfloat16 Automatic Mixed Precision" in caplog.text
    assert lightning_says == (want == "bf16-mixed")
    by_step, _ = step_losses(tmp_path / "run")
    assert len(by_step) == STEPS and all(math.isfinite(v) for v in by_step.values())


def test_a_resume_in_other_arithmetic_is_named(compose_cfg, tmp_path: Path, caplog) -> None:
    """A checkpoint records the precision it was trained in; resuming it in another (as
    trainer.precision=auto would on a machine with other hardware) is one warning line, and in the
    same precision none."""
    import logging

    import torch

    first = tmp_path / "first"
    train(compose_cfg(*BASE, *MODELS["gpt_tiny"], "trainer.precision=32-true", run_dir=first))
    last = first / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True, mmap=True)["precision"] == "32-true"
    more = [f"trainer.max_steps={STEPS + 1}", f"ckpt_path={last}"]
    caplog.set_level(logging.WARNING, logger="lm_lab")
    train(compose_cfg(*BASE, *MODELS["gpt_tiny"], "trainer.precision=32-true", *more, run_dir=tmp_path / "same"))
    assert "trained in" not in caplog.text
    train(compose_cfg(*BASE, *MODELS["gpt_tiny"], "trainer.precision=bf16-true", *more, run_dir=tmp_path / "other"))
    warnings = [r.getMessage() for r in caplog.records if "trained in" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "in trainer.precision=bf16-true; it was trained in 32-true" in warnings[0]
    assert "set trainer.precision=32-true" in warnings[0]
