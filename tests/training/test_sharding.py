"""Sharding (``trainer=fsdp``: FSDP2 through Lightning's ModelParallelStrategy) measured against
DDP, and its checkpoints against an uninterrupted run; activation checkpointing against plain
backprop. The 2-process runs are real ``python train.py`` processes (gloo on CPU)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from lm_lab import registry
from lm_lab.errors import CheckpointError
from lm_lab.training.checkpoints import find_checkpoints, load_checkpoint, load_export_dir, read_checkpoint
from lm_lab.training.sharding import CHECKSUM_FILE, checkpoint_activations, is_sharded_checkpoint
from tests.conftest import SHAKESPEARE, run_train
from tests.training.test_distributed import BERT, QUIET, assert_same_curves, metrics, train

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DDP = ["trainer=ddp_cpu"]
STEPS = 6
GPT = [
    "model=gpt_tiny",
    "model.dropout=0",  # dropout masks are drawn per rank
    "data=files",
    "data.tokenizer=char",
    "data.block_size=64",
    "data.batch_size=16",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    *QUIET,
    "scheduler.warmup_steps=2",
    f"scheduler.decay_steps={STEPS}",  # the same schedule for a run stopped at 3 and resumed
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_20k.txt"
    path.write_text(SHAKESPEARE.read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(corpus: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """gpt_tiny for 6 steps: DDP, FSDP, and FSDP stopped after 3 steps then resumed from its sharded checkpoint."""
    root = tmp_path_factory.mktemp("sharding")
    args = [*GPT, f"data.data_files={corpus}"]
    out = {name: root / name for name in ("ddp", "fsdp", "resumed")}
    train([*args, *DDP, f"trainer.max_steps={STEPS}"], out["ddp"], cache)
    train([*args, *FSDP, f"trainer.max_steps={STEPS}"], out["fsdp"], cache)
    train([*args, *FSDP, "trainer.max_steps=3"], out["resumed"], cache)
    out["half"] = root / "half.ckpt"  # the step-3 checkpoint, before the resume replaces last.ckpt
    shutil.copytree(out["resumed"] / "checkpoints" / "last.ckpt", out["half"])
    train([*args, *FSDP, f"trainer.max_steps={STEPS}", "ckpt_path=last"], out["resumed"], cache)
    return out


@pytest.mark.slow
def test_fsdp_trains_to_the_ddp_losses(runs: dict[str, Path]) -> None:
    assert_same_curves(runs["ddp"], runs["fsdp"])
    ddp, fsdp = metrics(runs["ddp"]), metrics(runs["fsdp"])
    assert len(fsdp["train/loss"]) == STEPS and fsdp["tokens_seen"] == ddp["tokens_seen"]


@pytest.mark.slow
def test_fsdp_writes_sharded_checkpoints_with_checksums(runs: dict[str, Path]) -> None:
    found = find_checkpoints(runs["fsdp"])
    assert found and found[0].name == "last.ckpt" and all(is_sharded_checkpoint(p) for p in found)
    files = {p.name for p in found[0].iterdir()}
    assert {"meta.pt", CHECKSUM_FILE, ".metadata"} <= files
    assert sum(name.endswith(".distcp") for name in files) == 2  # one shard per rank
    assert not list((runs["fsdp"] / "checkpoints").glob(".*"))  # no temporary directory left behind


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly(runs: dict[str, Path]) -> None:
    assert_same_curves(runs["fsdp"], runs["resumed"])
    assert metrics(runs["resumed"])["tokens_seen"] == metrics(runs["fsdp"])["tokens_seen"]
    assert read_checkpoint(runs["half"])["global_step"] == 3


@pytest.mark.slow
def test_export_from_a_sharded_checkpoint_has_the_ddp_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    from lm_lab.export import main as export_main

    out = tmp_path / "hf"
    assert export_main([str(runs["fsdp"] / "checkpoints" / "last.ckpt"), str(out)]) == 0
    exported = load_export_dir(out)
    reference = load_checkpoint(runs["ddp"] / "checkpoints" / "last.ckpt")  # one file, written under DDP
    ids = torch.randint(0, reference.model_cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.net(ids), reference.net(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_damaged_shard_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(runs["half"], ckpt)
    shard = ckpt / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensors
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is damaged: its file __1_0.distcp"):
        read_checkpoint(ckpt)


@pytest.mark.slow
def test_resuming_a_sharded_checkpoint_under_ddp_is_one_line(
    runs: dict[str, Path], corpus: Path, cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "ddp"
    args = [*GPT, f"data.data_files={corpus}", *DDP, f"trainer.max_steps={STEPS}", f"ckpt_path={runs['half']}"]
    r = run_train([*args, f"hydra.run.dir={run_dir}"], tmp_path, cache, HF_HUB_OFFLINE="1")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is a sharded checkpoint (trainer=fsdp): resume it with trainer=fsdp" in errors[0]
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama_tiny", "bert_tiny"])
def test_fsdp_with_activation_checkpointing_matches_ddp(model: str, corpus: Path, cache: Path, tmp_path: Path) -> None:
    """The other networks' blocks as sharding units, each recomputed in the backward pass."""
    short = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1"]
    if model == "bert_tiny":  # MLM + NSP on sentence pairs (masks drawn per rank and micro-batch, as under DDP)
        base = [a for a in BERT if not a.startswith(("trainer.max_steps", "trainer.val_check", "trainer.limit_val"))]
    else:
        base = [f"model={model}", "data=files", "data.tokenizer=char", "data.block_size=32", "data.batch_size=8"]
        base += [*QUIET, "scheduler.warmup_steps=1"]
    args = [*base, *short, f"data.data_files={corpus}"]
    train([*args, *DDP], tmp_path / "ddp", cache)
    train([*args, *FSDP, "activation_checkpointing=true"], tmp_path / "fsdp", cache)
    assert_same_curves(tmp_path / "ddp", tmp_path / "fsdp")


# ---------------------------------------------------------------------- single process


@pytest.mark.parametrize("name", sorted(registry.NETWORKS))
def test_every_network_names_its_block_and_checkpointing_keeps_gradients_and_names(name: str) -> None:
    spec = registry.NETWORKS[name]
    cls = spec.config_class()
    no_dropout = {f.name: 0.0 for f in dataclasses.fields(cls) if f.name in ("dropout", "attn_dropout")}
    cfg = cls(vocab_size=97, n_layer=2, n_head=2, n_embd=32, max_seq_len=16, **no_dropout)
    torch.manual_seed(0)
    plain = spec.build(cfg)
    wrapped = spec.build(cfg)
    wrapped.load_state_dict(plain.state_dict())
    block = spec.block_class()
    assert sum(isinstance(m, block) for m in plain.modules()) == cfg.n_layer
    assert checkpoint_activations(wrapped, (block,)) == cfg.n_layer
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoints and exports unchanged
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    for net in (plain, wrapped):
        net.train()
        out = net(ids)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().pow(2).mean().backward()
    for (key, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=key)
