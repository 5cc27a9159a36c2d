"""objective=classification: labels from the data, heads on BERT / GPT-2 / Llama, init_from an lm_lab
checkpoint or an exported Hugging Face directory, export equal to transformers, exact resume,
one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from lm_lab.data.labelled import labelled_files
from lm_lab.data.options import DataConfig
from lm_lab.errors import CheckpointError, DataError
from lm_lab.export import export
from lm_lab.objectives.classification.data import ClassificationDataModule
from lm_lab.objectives.classification.settings import ClassificationConfig
from lm_lab.schema import ConfigError
from lm_lab.training.checkpoints import load_checkpoint, load_export_dir
from tests.conftest import SHARED, TINY, compose_config, step_losses
from train import train

POLARITY = SHARED / "sentence_polarity"
FILES = labelled_files(POLARITY)
DATA = [
    "data=files",
    f"data.data_files={{train: {FILES['train']}, validation: {FILES['validation']}, test: {FILES['test']}}}",
]
QUICK = [*TINY, *DATA, "objective=classification", "data.block_size=48", "data.batch_size=8", "sample_tokens=0"]


def run(overrides: list[str], run_dir: Path, cache: Path) -> tuple[dict, dict]:
    cfg = compose_config(overrides, run_dir, cache)
    try:
        return train(cfg)
    finally:
        GlobalHydra.instance().clear()


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------- labels
def test_label_set_string_labels_and_regression(tmp_path: Path) -> None:
    rows = [{"text": f"text {i}", "label": ["neg", "pos", "neutral"][i % 3]} for i in range(30)]
    cfg = DataConfig(path=None, data_files={"train": jsonl(tmp_path / "t.jsonl", rows)}, val_fraction=0.2)
    dm = ClassificationDataModule(cfg, ClassificationConfig())
    done = dm.complete_settings(dm.objective_cfg)
    assert done.problem_type == "single_label" and done.labels == ["neg", "neutral", "pos"]
    assert done.num_labels == 3
    scores = [{"text": f"t {i}", "label": i / 7} for i in range(20)]
    cfg = DataConfig(path=None, data_files={"train": jsonl(tmp_path / "r.jsonl", scores)})
    done = ClassificationDataModule(cfg).complete_settings(ClassificationConfig())
    assert done.problem_type == "regression" and done.num_labels == 1 and done.labels is None


def test_labels_outside_the_set_and_bad_columns_are_one_line(tmp_path: Path) -> None:
    train_rows = [{"text": f"a {i}", "label": i % 2} for i in range(10)]
    test_rows = [{"text": "b", "label": 7}]
    files = {"train": jsonl(tmp_path / "train.jsonl", train_rows), "test": jsonl(tmp_path / "test.jsonl", test_rows)}
    dm = ClassificationDataModule(DataConfig(path=None, data_files=files))
    with pytest.raises(DataError, match=r"the test split has label\(s\) 7 outside the label set \['0', '1'\]"):
        dm.complete_settings(ClassificationConfig())
    dm = ClassificationDataModule(DataConfig(path=None, data_files=files, label_column="nope"))
    with pytest.raises(DataError, match=r"column 'nope' not in .*: set data.label_column"):
        dm.complete_settings(ClassificationConfig())
    numbers = [{"text": i, "label": 0} for i in range(10)]
    dm = ClassificationDataModule(DataConfig(path=None, data_files={"train": jsonl(tmp_path / "n.jsonl", numbers)}))
    with pytest.raises(DataError, match=r"column 'text' of .* holds int64, not text"):
        dm.complete_settings(ClassificationConfig())
    (tmp_path / "empty.jsonl").write_text("")
    dm = ClassificationDataModule(
        DataConfig(path=None, data_files={"train": files["train"], "validation": str(tmp_path / "empty.jsonl")})
    )
    with pytest.raises((DataError, Exception)) as e:
        dm.complete_settings(ClassificationConfig())
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="lists a label twice"):
        ClassificationConfig(labels=["a", "a"])


# ---------------------------------------------------------------------- training, init_from, export
@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """A tiny BERT pretrained (a few steps) on the polarity sentences' own text."""
    run_dir = tmp_path_factory.mktemp("bert_mlm")
    run(
        [
            *TINY,
            "model=bert_tiny",
            f"data.data_files={FILES['train']}",
            "data.path=json",
            "data.vocab_size=1000",
            "data.block_size=64",
            "data.batch_size=8",
            "objective.pair_objective=sop",
            "sample_tokens=0",
        ],
        run_dir,
        shared_cache,
    )
    return run_dir / "checkpoints" / "last.ckpt"


def test_bert_from_scratch_reports_val_and_test_metrics(tmp_path: Path, shared_cache: Path) -> None:
    metrics, objects = run([*QUICK, "model=bert_tiny", "data.vocab_size=1000"], tmp_path / "run", shared_cache)
    assert {"val/acc", "val/f1", "val/mcc", "test/acc", "test/f1", "test/mcc", "test/loss"} <= metrics.keys()
    assert 0.0 <= metrics["test/acc"] <= 1.0
    task = objects["task"]
    assert task.objective_cfg.labels == ["0", "1"] and task.net.classifier.out_features == 2
    assert objects["datamodule"].tokenizer.token_to_id("[CLS]") is not None  # WordPiece for an encoder
    hp = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["objective"] == "classification" and hp["objective_settings"]["labels"] == ["0", "1"]


def test_init_from_an_lm_lab_checkpoint_and_from_its_export(
    pretrained_bert: Path, tmp_path: Path, shared_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    source = load_checkpoint(pretrained_bert)
    with caplog.at_level(logging.INFO, logger="lm_lab"):
        _, objects = run([*QUICK, f"init_from={pretrained_bert}", "trainer.max_steps=2"], tmp_path / "a", shared_cache)
    task = objects["task"]
    assert task.network == "bert" and type(task.model_cfg) is type(
        source.model_cfg
    )  # the network came with the weights
    note = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("initialised"))
    assert "new (randomly initialised): classifier.bias, classifier.weight" in note
    assert "unused from the source: cls.predictions.bias" in note
    # Before training, the encoder is the pretrained one: compare on a fresh init (2 steps moved it).
    hf_dir = export(pretrained_bert, tmp_path / "bert_hf")
    _, objects = run(
        [*QUICK, f"init_from={hf_dir}", "trainer.max_steps=1", "optimizer.lr=1e-9"], tmp_path / "b", shared_cache
    )
    enc = objects["task"].net.bert.embeddings.word_embeddings.weight
    assert torch.allclose(enc, source.net.bert.embeddings.word_embeddings.weight, atol=1e-6)
    assert objects["datamodule"].tokenizer.to_str() == source.tokenizer_backend.to_str()


def test_an_incompatible_source_is_refused_in_one_line(
    pretrained_bert: Path, tmp_path: Path, shared_cache: Path
) -> None:
    with pytest.raises(
        ConfigError, match=r"objective=causal_lm trains decoder networks but model from init_from=.* is an encoder"
    ):
        run([*TINY, "objective=causal_lm", f"init_from={pretrained_bert}"], tmp_path / "r", shared_cache)
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="no lm_lab network reads Hugging Face model_type 't5'"):
        run([*QUICK, f"init_from={bad}"], tmp_path / "s", shared_cache)


@pytest.mark.parametrize("model", ["bert_tiny", "gpt_tiny", "llama_tiny"])
def test_export_equals_transformers_sequence_classification(model: str, tmp_path: Path, shared_cache: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    run([*QUICK, f"model={model}", "data.vocab_size=1000", "trainer.max_steps=3"], tmp_path / "run", shared_cache)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    task = load_checkpoint(ckpt)
    out = export(ckpt, tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__.endswith("ForSequenceClassification") and hf.config.id2label == {0: "0", 1: "1"}
    tok = task.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(["a gripping , funny film .", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = task(enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc.get("token_type_ids"))
        assert (hf(**enc).logits - ours).abs().max().item() <= 1e-4
    back = load_export_dir(out)
    texts = ["a gripping , funny film .", "dull and long ."]
    assert back.objective_cfg.labels == ["0", "1"] and back.predict(texts) == task.predict(texts)


def test_linear_probe_trains_the_head_only(pretrained_bert: Path, tmp_path: Path, shared_cache: Path) -> None:
    source = load_checkpoint(pretrained_bert)
    _, objects = run(
        [*QUICK, f"init_from={pretrained_bert}", "objective.freeze_backbone=true", "trainer.max_steps=3"],
        tmp_path / "run",
        shared_cache,
    )
    task = objects["task"]
    trainable = {n for n, p in task.net.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    assert torch.equal(
        task.net.bert.encoder.layer[0].output.dense.weight, source.net.bert.encoder.layer[0].output.dense.weight
    )


@pytest.mark.slow  # long end-to-end runs: make test-slow (CI runs both)
def test_fine_tuning_resumes_exactly_even_after_a_shorter_first_budget(
    pretrained_bert: Path, tmp_path: Path, shared_cache: Path
) -> None:
    common = [
        *QUICK,
        f"init_from={pretrained_bert}",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    run([*common, "trainer.max_steps=8"], tmp_path / "full", shared_cache)
    want = step_losses(tmp_path / "full")[0]
    run([*common, "trainer.max_steps=3"], tmp_path / "cut", shared_cache)
    run([*common, "trainer.max_steps=8", "ckpt_path=last"], tmp_path / "cut", shared_cache)
    got = step_losses(tmp_path / "cut")[0]
    assert sorted(got) == sorted(want) == list(range(1, 9))
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) < 1e-6, diffs


GLUE = [
    "glue_cola",
    "glue_sst2",
    "glue_mrpc",
    "glue_stsb",
    "glue_qqp",
    "glue_mnli",
    "glue_qnli",
    "glue_rte",
    "rotten_tomatoes",
]


def test_hub_presets_compose_and_fail_offline_in_one_line(tmp_path: Path, shared_cache: Path) -> None:
    import subprocess
    import sys

    from hydra.utils import instantiate

    from tests.conftest import REPO

    for name in GLUE:
        cfg = compose_config(["objective=classification", f"data={name}"], tmp_path / name, shared_cache)
        data = instantiate(cfg.data)
        GlobalHydra.instance().clear()
        assert (
            data.path in ("nyu-mll/glue", "cornell-movie-review-data/rotten_tomatoes") and data.label_column == "label"
        )
        assert (data.text_pair_column is None) == (name in ("glue_cola", "glue_sst2", "rotten_tomatoes"))
    for name in ("glue_mrpc", "rotten_tomatoes"):
        out = subprocess.run(
            [sys.executable, "train.py", "objective=classification", f"data={name}", f"hydra.run.dir={tmp_path / 'r'}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        )
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "Hub is unreachable" in out.stderr and not (tmp_path / "r").exists()
