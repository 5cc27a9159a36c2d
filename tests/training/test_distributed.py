"""Data parallelism measured against the single-process run, never only against itself.

Real `python train.py` processes: 2-process CPU DDP (gloo) against 1 process at the same global
batch. `debug=data_trace` records the samples each rank trains on (dataset positions), so the
shards can be compared sample by sample; losses come from each run's metrics.csv.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_lab.callbacks.data_trace import sample_ids
from lm_lab.data.sampling import PAD_INDEX, EvalPadding, EvalSampler, ResumableSampler
from tests.conftest import REPO, SHAKESPEARE

TRAIN = str(REPO / "train.py")
TOL = 1e-5  # per-step losses: float reassociation only (measured ~1e-6)
# Per-step metrics in metrics.csv, each rank's samples in data_trace/, nothing else.
QUIET = [
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.text_samples=null",
    "sample_tokens=0",
    "debug=data_trace",
]
GPT = [
    "model=gpt_tiny",
    "model.dropout=0",  # dropout masks are drawn per rank: the one thing that may differ by design
    "data=files",
    "data.tokenizer=char",
    "data.block_size=64",
    "data.batch_size=16",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=1.0",  # the whole validation split: 31 blocks, odd, so one rank pads
    *QUIET,
    "scheduler.warmup_steps=2",
    "scheduler.decay_steps=24",
    "final_validation=false",
]
DDP = ["trainer=ddp_cpu"]
STEPS = 24  # an epoch is 281 blocks // 16 = 17 steps: the runs cross into epoch 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20,000 characters of Tiny Shakespeare: short epochs, so runs cross epochs."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_20k.txt"
    path.write_text(SHAKESPEARE.read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train(args: list[str], run_dir: Path, cache: Path) -> None:
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    r = subprocess.run(
        [sys.executable, TRAIN, *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.csv as {name: {step: value}} (a resumed run's later rows win)."""
    out: dict[str, dict[int, float]] = {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("step", "epoch"):
                    out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def trace(run_dir: Path) -> dict[int, list[dict]]:
    """{rank: [{"step", "epoch", "ids"}, ...]} from debug=data_trace."""
    out = {}
    for path in sorted(glob.glob(str(run_dir / "data_trace" / "rank*.jsonl"))):
        rank = int(Path(path).stem.removeprefix("rank"))
        with open(path) as f:
            out[rank] = [json.loads(line) for line in f]
    return out


def samples_per_step(run_dir: Path) -> dict[int, list]:
    """All ranks' samples of each optimizer step, sorted."""
    steps: dict[int, list] = {}
    for records in trace(run_dir).values():
        for r in records:
            steps.setdefault(r["step"], []).extend(r["ids"])
    return {s: sorted(ids) for s, ids in steps.items()}


def assert_same_curves(a: Path, b: Path, keys: tuple[str, ...] = ("train/loss", "val/loss")) -> None:
    ma, mb = metrics(a), metrics(b)
    for key in keys:
        assert ma[key].keys() == mb[key].keys(), key
        diff = max(abs(ma[key][s] - mb[key][s]) for s in ma[key])
        assert diff <= TOL, f"{key}: max |diff| {diff:.2e}"


# ---------------------------------------------------------------------- samplers


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_sampler_ranks_draw_disjoint_prefixes_of_one_global_order(world: int) -> None:
    n, micro, step = 101, 2, 2 * 2 * world  # 2 micro-batches of 2 per rank and step
    ranks = [
        ResumableSampler(n, shuffle=True, seed=7, rank=r, world_size=world, step_samples=step) for r in range(world)
    ]
    orders = [list(s) for s in ranks]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == len(ranks[0])
    flat = [i for o in orders for i in o]
    assert len(set(flat)) == len(flat) == n // step * step  # disjoint; whole steps; the rest dropped
    one = list(ResumableSampler(n, shuffle=True, seed=7, step_samples=step))
    for s in range(0, len(orders[0]) + 1, micro):  # after each micro-batch of every rank ...
        drawn = sorted(i for o in orders for i in o[:s])
        assert drawn == sorted(one[: s * world])  # ... exactly a prefix of the 1-process order


def test_training_sampler_resumes_a_global_position_on_another_world_size() -> None:
    n, step = 64, 8
    one = list(ResumableSampler(n, shuffle=True, seed=3, step_samples=step))
    two = [ResumableSampler(n, shuffle=True, seed=3, rank=r, world_size=2, step_samples=step) for r in range(2)]
    state = two[0].state_dict(consumed_global=24)  # 3 steps done on 2 ranks
    resumed = ResumableSampler(n, shuffle=True, seed=3, step_samples=step)  # ... resumed on 1
    resumed.load_state_dict(state)
    assert list(resumed) == one[24:]
    four = [ResumableSampler(n, shuffle=True, seed=3, rank=r, world_size=4, step_samples=step) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    assert sorted(i for s in four for i in s) == sorted(one[24:])


@pytest.mark.parametrize(("n", "world"), [(10, 1), (93, 2), (93, 4), (5, 3), (2, 4)])
def test_eval_sampler_scores_every_sample_once(n: int, world: int) -> None:
    shares = [list(EvalSampler(n, seed=1234, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # same number of batches on every rank
    real = [i for s in shares for i in s if i != PAD_INDEX]
    assert sorted(real) == list(range(n))  # none twice, none missing


def test_eval_padding_slots_carry_no_targets() -> None:
    data = [{"input_ids": torch.arange(4) + i, "labels": torch.arange(4) + i + 1} for i in range(3)]
    padded = EvalPadding(data)
    batch = padded.collate(padded.__getitems__([2, PAD_INDEX]))
    assert batch["labels"][0].tolist() == [3, 4, 5, 6]
    assert batch["labels"][1].tolist() == [-100] * 4


def test_datamodule_refuses_to_guess_its_rank_in_a_distributed_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_lab.data.options import DataConfig
    from lm_lab.objectives.causal_lm.data import CausalLMDataModule

    dm = CausalLMDataModule(DataConfig())
    assert dm._rank_world() == (0, 1)  # on its own, outside any job
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="without a Trainer"):
        dm._rank_world()


def test_sample_ids_are_positions_or_token_hashes() -> None:
    ids = torch.tensor([[1, 2], [3, 4], [1, 2]])
    assert sample_ids({"input_ids": ids, "index": torch.tensor([5, 6, 7])}) == [5, 6, 7]
    hashed = sample_ids({"input_ids": ids})
    assert hashed[0] == hashed[2] != hashed[1]


# ---------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def gpt_runs(corpus: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt_runs")
    args = [*GPT, f"data.data_files={corpus}", f"trainer.max_steps={STEPS}"]
    runs = {"one": root / "one", "two": root / "two"}
    train(args, runs["one"], cache)
    train([*args, *DDP], runs["two"], cache)
    return runs


def test_ddp_ranks_train_on_disjoint_shards_that_make_up_the_one_process_batches(gpt_runs: dict[str, Path]) -> None:
    one, two = trace(gpt_runs["one"]), trace(gpt_runs["two"])
    assert sorted(two) == [0, 1] and len(two[0]) == len(two[1]) == STEPS
    for r0, r1, ref in zip(two[0], two[1], one[0], strict=True):
        assert r0["step"] == r1["step"] == ref["step"]
        assert not set(r0["ids"]) & set(r1["ids"]), f"step {r0['step']}: both ranks drew the same samples"
        assert sorted(r0["ids"] + r1["ids"]) == sorted(ref["ids"])
    epoch0 = [i for rank in two.values() for r in rank if r["epoch"] == 0 for i in r["ids"]]
    assert len(epoch0) == len(set(epoch0)) == 17 * 16  # the whole epoch (281 blocks, whole steps), once


def test_ddp_losses_and_token_counts_equal_the_one_process_run(gpt_runs: dict[str, Path]) -> None:
    assert_same_curves(gpt_runs["one"], gpt_runs["two"])
    one, two = metrics(gpt_runs["one"]), metrics(gpt_runs["two"])
    assert len(two["val/loss"]) == 2 and len(two["train/loss"]) == STEPS
    # Each token counted once: steps done x 16 sequences x 64 tokens, on 1 and on 2 processes.
    assert two["tokens_seen"] == one["tokens_seen"] == {s: s * 16 * 64.0 for s in range(1, STEPS + 1)}


@pytest.mark.slow  # 14-16 s; the default suite keeps the ~10-minute budget
def test_a_run_extended_past_its_max_steps_continues_its_epoch(
    corpus: Path, cache: Path, gpt_runs: dict[str, Path], tmp_path: Path
) -> None:
    """Stopped by max_steps mid-epoch, then resumed with more steps: no sample of the epoch skipped."""
    run = tmp_path / "extended"
    args = [*GPT, f"data.data_files={corpus}"]
    train([*args, f"trainer.max_steps={STEPS // 2}"], run, cache)
    train([*args, f"trainer.max_steps={STEPS}", "ckpt_path=last"], run, cache)
    assert samples_per_step(run) == samples_per_step(gpt_runs["one"])
    assert_same_curves(gpt_runs["one"], run)


@pytest.mark.slow  # ~21 s; the sampler's part is in the default suite (a global position on another world size)
def test_resume_on_another_number_of_devices_continues_the_global_data_position(
    corpus: Path, cache: Path, gpt_runs: dict[str, Path], tmp_path: Path
) -> None:
    """2 processes for 12 steps, then 1 process accumulating 2 micro-batches: same samples per step
    and the same per-step losses as the uninterrupted 1-process run."""
    run = tmp_path / "two_then_one"
    args = [*GPT, f"data.data_files={corpus}"]
    train([*args, *DDP, f"trainer.max_steps={STEPS // 2}"], run, cache)
    train([*args, "data.micro_batch_size=8", f"trainer.max_steps={STEPS}", "ckpt_path=last"], run, cache)
    assert samples_per_step(run) == samples_per_step(gpt_runs["one"])
    assert_same_curves(gpt_runs["one"], run, keys=("train/loss",))


@pytest.mark.slow
def test_four_processes_follow_the_one_process_trajectory(
    corpus: Path, cache: Path, gpt_runs: dict[str, Path], tmp_path: Path
) -> None:
    """The same config on 4 processes (4 sequences each per step): the samples of each step and the
    per-step losses of the 1-process run (its first 8 steps; the schedule is pinned to 24)."""
    run = tmp_path / "four"
    train([*GPT, f"data.data_files={corpus}", *DDP, "trainer.devices=4", "trainer.max_steps=8"], run, cache)
    assert sorted(trace(run)) == [0, 1, 2, 3]
    want = {s: ids for s, ids in samples_per_step(gpt_runs["one"]).items() if s < 8}
    assert samples_per_step(run) == want
    four, one = metrics(run)["train/loss"], metrics(gpt_runs["one"])["train/loss"]
    assert sorted(four) == list(range(1, 9))
    assert max(abs(four[s] - one[s]) for s in four) <= TOL


@pytest.mark.slow
def test_resume_from_one_process_with_accumulation_onto_two(
    corpus: Path, cache: Path, gpt_runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "one_then_two"
    args = [*GPT, f"data.data_files={corpus}"]
    train([*args, "data.micro_batch_size=4", f"trainer.max_steps={STEPS // 2}"], run, cache)
    train([*args, *DDP, f"trainer.max_steps={STEPS}", "ckpt_path=last"], run, cache)
    assert samples_per_step(run) == samples_per_step(gpt_runs["one"])
    assert_same_curves(gpt_runs["one"], run)


BERT = [
    "model=bert_tiny",
    "model.dropout=0",
    "model.attn_dropout=0",
    "data=files",
    "data.path=text",
    "data.sample_by=paragraph",
    "data.vocab_size=500",
    "data.block_size=32",
    "data.batch_size=16",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1.0",
    *QUIET,
    "scheduler.warmup_steps=2",
    "final_validation=false",
]


def test_bert_pairs_under_ddp_with_accumulation_match_one_process(corpus: Path, cache: Path, tmp_path: Path) -> None:
    """Masked-token counts differ between micro-batches and ranks: losses normalized over the whole
    optimizer step make 2 processes x 2 micro-batches equal to 1 process with one batch."""
    args = [*BERT, f"data.data_files={corpus}"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(args, one, cache)
    train([*args, *DDP, "data.micro_batch_size=4"], two, cache)
    for records in trace(two).values():
        assert len(records) == 8 * 2  # 2 micro-batches per optimizer step
    ranks = trace(two)
    for step in range(8):
        ids = [[i for r in ranks[k] if r["step"] == step for i in r["ids"]] for k in (0, 1)]
        assert not set(ids[0]) & set(ids[1])
    assert samples_per_step(two) == samples_per_step(one)
    assert_same_curves(one, two, keys=("train/loss", "train/mlm_loss", "train/nsp_loss", "val/loss", "val/mlm_acc"))


@pytest.mark.slow
def test_streamed_corpus_is_split_between_ranks(corpus: Path, cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "stream"
    args = [
        *GPT,
        f"data.data_files={corpus}",
        "data.path=text",
        "data.sample_by=paragraph",
        "data.streaming=true",
        "data.streaming_val_docs=20",
        "trainer.max_steps=10",
        *DDP,
    ]
    train(args, run, cache)
    ranks = trace(run)
    blocks = [{i for r in ranks[k] if r["epoch"] == 0 for i in r["ids"]} for k in (0, 1)]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]


# ---------------------------------------------------------------------- loss normalization


class GradCapture:
    """A callback (built by Hydra from the run config) that saves the first optimizer step's
    gradients and each of its micro-batches' target counts to ``path``."""

    def __new__(cls, path: str) -> object:
        import lightning as L

        class _Capture(L.Callback):
            targets: list[int] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
                if trainer.global_step == 0:
                    self.targets.append(int((batch["labels"] != -100).sum()))

            def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
                if trainer.global_step == 0:
                    grads = torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None])
                    torch.save({"grads": grads, "targets": self.targets}, path)

        return _Capture()


def test_accumulated_step_has_the_gradients_of_one_big_batch(compose_cfg, corpus: Path, tmp_path: Path) -> None:
    """Masked-token losses: 4 micro-batches of 4 give the gradients of one batch of 16, although
    the micro-batches hold different numbers of masked tokens (a per-micro-batch mean would weigh
    their tokens unequally)."""
    from train import train as train_in_process

    args = [
        *[a for a in BERT if not a.startswith(("debug=", "trainer.max_steps"))],
        f"data.data_files={corpus}",
        "trainer.max_steps=1",
        "+callbacks.capture._target_=tests.training.test_distributed.GradCapture",
    ]
    runs = {}
    for micro in (16, 4):
        path = tmp_path / f"grads-{micro}.pt"
        cfg = compose_cfg(
            *args, f"data.micro_batch_size={micro}", f"+callbacks.capture.path={path}", run_dir=tmp_path / f"run{micro}"
        )
        train_in_process(cfg)
        runs[micro] = torch.load(path, weights_only=True)
    big, acc, counts = runs[16]["grads"], runs[4]["grads"], runs[4]["targets"]
    assert len(counts) == 4 and len(set(counts)) > 1, counts  # the case that needs the normalization
    assert torch.allclose(acc, big, rtol=1e-4, atol=1e-7), (acc - big).abs().max()


@pytest.mark.slow  # 14-16 s; the default suite keeps the ~10-minute budget
def test_bert_without_a_pair_objective_trains_under_ddp(corpus: Path, cache: Path, tmp_path: Path) -> None:
    """objective.pair_objective=none: the pooler and NSP head feed no loss, which DDP refuses unless they
    are left out of training (they were: "parameters that were not used in producing the loss")."""
    args = [*BERT, f"data.data_files={corpus}", "objective.pair_objective=none", "trainer.max_steps=3", *DDP]
    train(args, tmp_path / "none", cache)
    m = metrics(tmp_path / "none")
    assert len(m["train/mlm_loss"]) == 3 and "train/nsp_loss" not in m


@pytest.mark.slow  # 14-16 s; the default suite keeps the ~10-minute budget
def test_a_stream_too_small_for_every_rank_is_one_line_before_training(
    corpus: Path, cache: Path, tmp_path: Path
) -> None:
    """Each rank reads its own shard of a streamed corpus; one without a batch used to leave its
    epoch loop spinning forever. Now: one line for the job (not one per process), exit 2, no run dir."""
    run_dir = tmp_path / "short_stream"
    args = [
        *GPT,
        f"data.data_files={corpus}",
        "data.path=text",
        "data.sample_by=paragraph",
        "data.streaming=true",
        "data.streaming_val_docs=145",  # of 149 paragraphs: 2 per rank, fewer than 8 blocks of 64
        "trainer.max_steps=5",
        *DDP,
    ]
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    r = subprocess.run(
        [sys.executable, TRAIN, *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds less than one batch" in errors[0], r.stderr[-2000:]
    assert not run_dir.exists()
