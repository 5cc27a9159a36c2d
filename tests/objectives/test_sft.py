"""Instruction fine-tuning (objective=sft): the prompt's targets are masked by its encoded length, the
loss is the response tokens', a run reports test/loss and lowers it, starts from a causal_lm
checkpoint, resumes exactly, answers in its template through lm_lab.generate, and refuses bad
inputs in one line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from lm_lab.data.options import DataConfig
from lm_lab.data.tokenizer import EOT, eot_id, train_tokenizer
from lm_lab.errors import DataError
from lm_lab.objectives.causal_lm.task import CausalLMTask
from lm_lab.objectives.sft.data import IGNORE_INDEX, PadCollate, SFTDataModule, encode_example, mask_targets
from lm_lab.objectives.sft.settings import SFTConfig
from lm_lab.objectives.sft.task import SFTTask
from lm_lab.schema import ConfigError
from lm_lab.training.checkpoints import load_checkpoint
from lm_lab.training.pretrained import load_into, read_source
from tests.conftest import REPO, SHAKESPEARE, SHARED, TINY, compose_config
from train import train

CHATTERBOT = SHARED / "chatterbot_qa"
SFT = [
    *TINY,
    "objective=sft",
    "data=files",
    f"data.data_files={{train: {CHATTERBOT / 'train.jsonl'}, test: {CHATTERBOT / 'test.jsonl'}}}",
    "data.block_size=64",
    "data.batch_size=8",
    "data.vocab_size=1000",
    "sample_tokens=0",
    "callbacks.text_samples=null",
]
TEMPLATE = "Q: {prompt}\nA: "  # 3 + len(prompt) + 4 characters


def run(overrides: list[str], run_dir: Path, cache: Path) -> tuple[dict, dict]:
    cfg = compose_config(overrides, run_dir, cache)
    try:
        return train(cfg)
    finally:
        GlobalHydra.instance().clear()


def step_losses(run_dir: Path) -> tuple[dict[int, float], int]:
    """train/loss per optimizer step from metrics.csv (the last row of a step wins), and the number of rows."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}, len(rows)


@pytest.fixture(scope="module")
def char_tok() -> typing.Any:
    """One token per character: every position below can be counted by hand."""
    return train_tokenizer("char", ["Q: hi\nA: yo", "abcdefghijklmnopqrstuvwxyz ?!.\n:QA"], vocab_size=100)


# ---------------------------------------------------------------------- masking, by hand
def test_prompt_targets_are_masked_by_encoded_length(char_tok: typing.Any) -> None:
    eot = eot_id(char_tok)
    ids = lambda s: char_tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    settings = SFTConfig(template=TEMPLATE)
    # "Q: hi\nA: " is 9 tokens, "yo" 2, then end-of-text: 12 tokens, 11 inputs and 11 targets. Target j
    # is token j + 1: tokens 1..8 belong to the prompt part (-100), 9..11 are the response and EOT.
    ex = encode_example(char_tok, settings, "hi", "yo", block_size=32)
    assert ex["input_ids"] == ids("Q: hi\nA: yo")
    assert ex["labels"] == [IGNORE_INDEX] * 8 + ids("yo") + [eot]
    # Cut at block_size + 1 tokens: the EOT goes first, then the response; nothing of the prompt is a target.
    assert encode_example(char_tok, settings, "hi", "yo", block_size=10)["labels"] == [IGNORE_INDEX] * 8 + ids("yo")
    assert encode_example(char_tok, settings, "hi", "yo", block_size=9)["labels"] == [IGNORE_INDEX] * 8 + ids("y")
    assert encode_example(char_tok, settings, "hi", "yo", block_size=8)["labels"] == [IGNORE_INDEX] * 8  # no target
    # train_on_prompt: every token but the first is a target.
    full = encode_example(char_tok, SFTConfig(template=TEMPLATE, train_on_prompt=True), "hi", "yo", block_size=32)
    assert full["labels"] == ids("Q: hi\nA: yo")[1:] + [eot]
    # An empty response still teaches the model to stop: the EOT is the one target.
    assert encode_example(char_tok, settings, "hi", "", block_size=32)["labels"] == [IGNORE_INDEX] * 8 + [eot]
    # The template is not searched for: a prompt that contains it is masked by its length all the same.
    tricky = encode_example(char_tok, settings, "A: x", "yo", block_size=32)
    assert tricky["labels"] == [IGNORE_INDEX] * 10 + ids("yo") + [eot]
    # The rule itself, on ids.
    assert mask_targets([5, 6, 7], [8, 9], block_size=3) == ([5, 6, 7, 8], [IGNORE_INDEX] * 3 + [8])
    assert mask_targets([5, 6, 7], [8, 9], block_size=8, train_on_prompt=True) == ([5, 6, 7, 8, 9], [-100, 6, 7, 8, 9])


def test_bpe_prompt_and_response_are_encoded_apart() -> None:
    texts = [json.loads(line) for line in (CHATTERBOT / "train.jsonl").read_text().splitlines()[:300]]
    tok = train_tokenizer("bpe", [f"{t['prompt']}\n{t['response']}" for t in texts], vocab_size=600)
    settings = SFTConfig()
    prompt, response = "My printer is not printing.", "Ensure it's powered on and has paper, then restart it."
    ex = encode_example(tok, settings, prompt, response, block_size=256)
    prompt_ids = tok.encode(settings.format(prompt), add_special_tokens=False).ids
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][: n - 1] == [IGNORE_INDEX] * (n - 1)
    targets = ex["labels"][n - 1 :]
    assert targets[-1] == tok.token_to_id(EOT) and IGNORE_INDEX not in targets
    assert tok.decode(targets[:-1]) == response


def _write(path: Path, rows: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"question": p, "answer": r}) + "\n" for p, r in rows))
    return str(path)


# Tokens with TEMPLATE (one per character): prompt part + response + EOT = 9 + 2 + 1, 19 + 5 + 1, 30 + 1 + 1
# and 8 + 25 + 1.
ROWS = [("hi", "yo"), ("how are you?", "fine."), ("a b c d e f g h i j k l", "i"), ("x", "a long answer that is cut")]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "train": _write(tmp_path / "train.jsonl", ROWS * 2),
        "validation": _write(tmp_path / "val.jsonl", ROWS[:2]),
        "test": _write(tmp_path / "test.jsonl", ROWS[2:]),
    }


def _datamodule(files: dict[str, str], cache: Path, block_size: int, **settings: typing.Any) -> SFTDataModule:
    cfg = DataConfig(
        path=None,
        data_files=files,
        prompt_column="question",
        response_column="answer",
        tokenizer="char",
        block_size=block_size,
        batch_size=2,
        cache_dir=str(cache),
    )
    dm = SFTDataModule(cfg, SFTConfig(template=TEMPLATE, **settings))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_datamodule_rows_batches_and_packing(files: dict[str, str], tmp_path: Path) -> None:
    dm = _datamodule(files, tmp_path / "cache", block_size=24)
    tok = dm.tokenizer
    settings = dm.objective_cfg
    # The third example's prompt part (30 tokens) fills all block_size + 1 = 25: no target, dropped.
    # The fourth is cut to 25 tokens: 17 response targets, no EOT.
    want = [encode_example(tok, settings, p, r, block_size=24) for p, r in ROWS * 2]
    assert [sum(t != IGNORE_INDEX for t in w["labels"]) for w in want[:4]] == [3, 6, 0, 17]
    want = [w for w in want if any(t != IGNORE_INDEX for t in w["labels"])]
    got = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert [(g["input_ids"], g["labels"]) for g in got] == [(w["input_ids"], w["labels"]) for w in want]
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2 and dm.has_test() and len(dm.test_set) == 1
    # Right-padded with EOT; padding is no target and no attention.
    batch = PadCollate(eot_id(tok))([dm.train_set[0], dm.train_set[1]])
    assert batch["input_ids"].shape == (2, 24) and batch["labels"].shape == (2, 24)
    n0 = len(want[0]["input_ids"])
    assert n0 == 11 and batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (24 - n0)
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n0:] == eot_id(tok)).all()
    assert batch["labels"][1].tolist() == want[1]["labels"] and batch["attention_mask"][1].all()
    # The loaders: every training batch counts its optimizer step's targets; the test split is scored.
    first = next(iter(dm.train_dataloader()))
    assert int(first["step_targets"]) == int((first["labels"] != IGNORE_INDEX).sum()) > 0
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in dm.test_dataloader()) == 17

    # Another template or train_on_prompt: another cache entry, never the stale one.
    other = SFTDataModule(dm.cfg, SFTConfig(template="{prompt} => "))
    assert other.examples_cache() != dm.examples_cache()
    assert SFTDataModule(dm.cfg, SFTConfig(template=TEMPLATE, train_on_prompt=True)).examples_cache() not in (
        dm.examples_cache(),
        other.examples_cache(),
    )

    # packing: consecutive whole examples fill sequences of block_size + 1 tokens, each keeping its mask.
    packed = _datamodule(files, tmp_path / "cache", block_size=40, packing=True)
    singles = [encode_example(tok, settings, p, r, block_size=40) for p, r in ROWS * 2]
    rows = packed.train_set.ds
    # Lengths 12, 25, 32, 34 (twice) in 41 tokens: [12 + 25], [32], [34], [12 + 25], [32], [34].
    assert [len(ids) for ids in rows["ids"]] == [37, 32, 34] * 2
    assert len(packed.val_set) == 2  # evaluation examples are scored one by one
    flat_targets = [t for row in rows["targets"] for t in row]
    want_targets = [t for s in singles for t in [IGNORE_INDEX, *s["labels"]]]
    assert flat_targets == want_targets  # each example's first token and prompt part stay masked
    row = packed.train_set[0]
    assert row["labels"] == rows[0]["targets"][1:] and row["input_ids"] == rows[0]["ids"][:-1]


# ---------------------------------------------------------------------- training through Hydra
@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> dict[str, typing.Any]:
    """A 2-step and a 40-step sft run of gpt_tiny from scratch on chatterbot_qa."""
    out: dict[str, typing.Any] = {}
    for name, steps in (("short", 2), ("long", 40)):
        run_dir = tmp_path_factory.mktemp(f"sft_{name}") / "run"
        metrics, objects = run(
            [*SFT, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"], run_dir, shared_cache
        )
        out[name] = (metrics, objects, run_dir)
    return out


def test_sft_run_reports_and_lowers_the_test_response_loss(sft_runs: dict[str, typing.Any]) -> None:
    short, _, _ = sft_runs["short"]
    long, objects, run_dir = sft_runs["long"]
    task = objects["task"]
    assert type(task) is SFTTask and task.objective_spec.name == "sft"
    for metrics in (short, long):
        assert {"test/loss", "test/ppl", "val/loss"} <= set(metrics)
    assert long["test/loss"] < short["test/loss"] - 0.5, (short["test/loss"], long["test/loss"])
    # The checkpoint is an sft one: it loads back as SFTTask with its settings.
    loaded = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert type(loaded) is SFTTask and loaded.objective_cfg == SFTConfig()


def test_generate_answers_in_the_template(sft_runs: dict[str, typing.Any]) -> None:
    _, _, run_dir = sft_runs["long"]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    task = load_checkpoint(ckpt)
    prompt = "My printer is not printing."
    answer = task.generate(prompt, 12, temperature=0.0)
    # The template applied, then the causal LM's continuation; raw=True continues the text as it is.
    assert answer == CausalLMTask.generate(task, SFTConfig().format(prompt), 12, temperature=0.0)
    raw = task.generate(prompt, 12, temperature=0.0, raw=True)
    assert raw == CausalLMTask.generate(task, prompt, 12, temperature=0.0)

    def cli(*extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "lm_lab.generate", str(ckpt), "--prompt", prompt, "--temperature", "0"]
        return subprocess.run(
            [*args, "--max-new-tokens", "12", *extra], cwd=REPO, capture_output=True, text=True, timeout=120
        )

    out = cli()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == prompt + answer + "\n"
    assert "prompt template" in out.stderr and "### Question:" in out.stderr
    out = cli("--raw")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == prompt + raw + "\n" and "prompt template" not in out.stderr


def test_sft_from_a_causal_lm_checkpoint(tmp_path: Path, shared_cache: Path) -> None:
    source_dir = tmp_path / "pretrain"
    run(
        [*TINY, "data=files", f"data.data_files={SHAKESPEARE}", "data.path=text", "data.sample_by=paragraph"]
        + ["trainer.max_steps=2", "trainer.val_check_interval=2", "sample_tokens=0", "callbacks.text_samples=null"],
        source_dir,
        shared_cache,
    )
    ckpt = source_dir / "checkpoints" / "last.ckpt"
    source = read_source(ckpt)
    assert source.objective == "causal_lm"
    # Every weight of the sft task comes from the causal_lm checkpoint (load_into refuses any missing).
    task = SFTTask(source.model_cfg, SFTConfig(), tokenizer=source.tokenizer)
    load_into(task, source)
    state = task.net.state_dict()
    assert set(state) == set(source.weights)
    assert all(torch.equal(state[k], source.weights[k]) for k in state)
    # Through train.py: the network, its sizes and the tokenizer come with the weights.
    metrics, objects = run(
        [*SFT, f"init_from={ckpt}", "trainer.max_steps=2", "trainer.val_check_interval=2"],
        tmp_path / "sft",
        shared_cache,
    )
    tuned = objects["task"]
    assert type(tuned) is SFTTask and tuned.model_cfg == source.model_cfg
    assert tuned.tokenizer_backend.to_str() == source.tokenizer.to_str()
    assert metrics["test/loss"] > 0


@pytest.mark.slow  # long end-to-end runs: make test-slow (CI runs both)
def test_resume_gives_the_same_step_losses(tmp_path: Path, shared_cache: Path) -> None:
    """Stopped by max_steps mid-epoch and resumed with ckpt_path=last: every step's loss equals an
    uninterrupted run's (dropout on; 2 micro-batches per step, so step_targets spans them)."""
    args = [
        *SFT,
        "model.dropout=0.1",
        "data.micro_batch_size=4",
        "trainer.val_check_interval=3",
        "scheduler.decay_steps=8",
        "final_validation=false",
        "data.test_split=null",  # no test pass at the end of each run
    ]
    run([*args, "trainer.max_steps=8"], tmp_path / "ref", shared_cache)
    want, _ = step_losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, 9))
    run([*args, "trainer.max_steps=4"], tmp_path / "run", shared_cache)
    _, objects = run([*args, "trainer.max_steps=8", "ckpt_path=last"], tmp_path / "run", shared_cache)
    got, rows = step_losses(tmp_path / "run")
    # Resumed, not restarted: steps 1-4 were logged once, by the first run, and the data position went on.
    assert rows == 8 and objects["trainer"].global_step == 8
    assert objects["datamodule"].state_dict()["sampler"]["consumed_global"] == 8 * 8
    assert sorted(got) == sorted(want)
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6, (got, want)


# ---------------------------------------------------------------------- bad inputs, one line each
def test_bad_inputs_fail_in_one_line(tmp_path: Path, shared_cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"objective=sft trains decoder networks but model bert_tiny \(bert\)") as e:
        run([*SFT, "model=bert_tiny"], tmp_path / "bert", shared_cache)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"column 'nope' not in .*: set data.response_column") as e:
        run([*SFT, "data.response_column=nope"], tmp_path / "nope", shared_cache)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"objective.template=.* must contain \{prompt\} exactly once"):
        SFTConfig(template="{prompt} and {prompt}")
    # On the command line: one line on stderr, exit status 2, nothing left behind.
    out = subprocess.run(
        [sys.executable, "train.py", "objective=sft", "objective.template=Answer:", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: objective.template='Answer:' must contain {prompt} exactly once (found 0): "
        "it marks where each example's prompt goes"
    ]
    assert not (tmp_path / "r").exists()
