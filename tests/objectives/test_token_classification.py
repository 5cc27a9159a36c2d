"""objective=token_classification: word -> sub-token label alignment (WordPiece and byte-level BPE),
entity-level F1 against hand-computed BIO cases, real runs through Hydra on the WSJ POS sample (BERT
from scratch and from a pretraining checkpoint, GPT on BIO tags), export equal to transformers'
*ForTokenClassification, exact resume, and one-line errors for bad data."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from lm_lab.data.options import DataConfig
from lm_lab.data.sources import DataError
from lm_lab.export import export
from lm_lab.objectives.token_classification.data import (
    TokenClassificationDataModule,
    align_labels,
    encode_words,
)
from lm_lab.objectives.token_classification.settings import TokenClassificationConfig, is_bio
from lm_lab.objectives.token_classification.task import EntityScore, TokenClassificationTask, entity_scores
from lm_lab.training.checkpoints import load_checkpoint, load_export_dir
from lm_lab.training.pretrained import load_into, read_source
from tests.conftest import REPO, SHAKESPEARE, SHARED, compose_config
from train import train

WSJ = SHARED / "wsj_pos"
COMMON = [
    "objective=token_classification",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "data=files",
    "data.batch_size=8",
    "data.block_size=64",
    "data.vocab_size=600",
    "scheduler.warmup_steps=2",
    "sample_tokens=0",
    "callbacks.text_samples=null",
]


def files_arg(directory: Path) -> str:
    return (
        f"data.data_files={{train: '{directory}/train.jsonl', validation: '{directory}/validation.jsonl', "
        f"test: '{directory}/test.jsonl'}}"
    )


WSJ_ARGS = [*COMMON, files_arg(WSJ), "data.text_column=tokens", "data.label_column=tags"]
STEPS = 6  # the BERT runs: validation (and a checkpoint) at step 3 and 6
BERT = [
    *WSJ_ARGS,
    "model=bert_tiny",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=3",
    f"scheduler.decay_steps={STEPS}",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]


def run(overrides: list[str], run_dir: Path, cache: Path) -> tuple[dict, dict]:
    cfg = compose_config(overrides, run_dir, cache)
    try:
        return train(cfg)
    finally:
        GlobalHydra.instance().clear()


def logged(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def step_losses(run_dir: Path) -> tuple[dict[int, float], int]:
    """train/loss per step (the last row of each step wins: a resumed run appends to metrics.csv)
    and the number of train/loss rows."""
    rows = [r for r in logged(run_dir) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}, len(rows)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------- tokenizers written by hand
def wordpiece(words: list[str]) -> Tokenizer:
    """A BERT-style WordPiece tokenizer (BERT's normalizer, pre-tokenizer and [CLS]/[SEP] template)
    with exactly this vocabulary, so every split is known in advance."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


WP = wordpiece(["jim", "##bo", "live", "##s", "in", "new", "york", "##shire", ".", "smith", "ran"])
ROWS = [
    {"words": ["Jimbo", "lives", "in", "New", "Yorkshire", "."], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC", "O"]},
    {"words": ["Jim", "Smith", "ran"], "tags": ["B-PER", "I-PER", "O"]},
]
# [CLS] jim ##bo live ##s in new york ##shire . [SEP]; tags sorted: B-LOC 0, B-PER 1, I-LOC 2, I-PER 3, O 4
FIRST = [-100, 1, -100, 4, -100, 4, 0, 2, -100, 4, -100]
ALL = [-100, 1, 3, 4, 4, 4, 0, 2, 2, 4, -100]  # jim ##bo: B-PER I-PER; york ##shire: I-LOC I-LOC


def wp_datamodule(
    tmp_path: Path, objective: TokenClassificationConfig, **data: object
) -> TokenClassificationDataModule:
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", ROWS)
    cfg = DataConfig(
        path=None,
        data_files={s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation", "test")},
        text_column="words",
        label_column="tags",
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
        **data,
    )
    dm = TokenClassificationDataModule(cfg, objective)
    dm.connect(tokenizer=WP)
    dm.complete_settings(dm.objective_cfg)
    dm.setup("fit")
    return dm


def test_wordpiece_labels_each_words_first_subtoken(tmp_path: Path) -> None:
    enc = encode_words(WP, [ROWS[0]["words"]], 64)[0]
    assert [WP.id_to_token(i) for i in enc.ids] == [
        "[CLS]", "jim", "##bo", "live", "##s", "in", "new", "york", "##shire", ".", "[SEP]",
    ]  # fmt: skip
    assert enc.word_ids == [None, 0, 0, 1, 1, 2, 3, 4, 4, 5, None]

    dm = wp_datamodule(tmp_path, TokenClassificationConfig())
    assert dm.objective_cfg.labels == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"] and dm.objective_cfg.bio
    batch = dm.collate(dm.train_set)
    assert batch["labels"][0].tolist() == FIRST
    # Row 2 ([CLS] jim smith ran [SEP]) is padded with -100 (labels) and [PAD] (ids).
    assert batch["labels"][1].tolist() == [-100, 1, 3, 4, -100] + [-100] * 6
    assert batch["input_ids"][1, 5:].tolist() == [0] * 6 and batch["attention_mask"][1].sum() == 5
    assert batch["word_starts"][0].tolist() == [x != -100 for x in FIRST]
    assert batch["token_type_ids"].abs().sum() == 0


def test_wordpiece_label_all_subtokens_and_truncation(tmp_path: Path) -> None:
    dm = wp_datamodule(tmp_path / "all", TokenClassificationConfig(label_all_subtokens=True))
    batch = dm.collate(dm.train_set)
    assert batch["labels"][0].tolist() == ALL
    # Evaluation still reads each word's first sub-token only.
    assert batch["word_starts"][0].tolist() == [x != -100 for x in FIRST]
    # Cut at data.block_size=6: [CLS] jim ##bo live ##s [SEP]; the later words are not scored.
    dm = wp_datamodule(tmp_path / "cut", TokenClassificationConfig(), block_size=6)
    assert dm.train_set[0]["input_ids"] == [2, 5, 6, 7, 8, 3]
    assert dm.train_set[0]["labels"] == [-100, 1, -100, 4, -100, -100]


def test_bpe_words_are_pieces_of_the_running_text() -> None:
    # A byte-level BPE with a hand-written vocabulary: "The" | "Ġdog" "s" | "Ġran" | "Ġ" "."
    chars = ["T", "h", "e", "Ġ", "d", "o", "g", "s", "r", "a", "n", "."]
    merges = [("T", "h"), ("Th", "e"), ("Ġ", "d"), ("Ġd", "o"), ("Ġdo", "g"), ("Ġ", "r"), ("Ġr", "a"), ("Ġra", "n")]
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *chars, *("".join(m) for m in merges)])}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = ["The", "dogs", "ran", "."]
    enc = encode_words(tok, [words, []], 64)
    assert [tok.id_to_token(i) for i in enc[0].ids] == ["The", "Ġdog", "s", "Ġran", "Ġ", "."]
    assert enc[0].ids == tok.encode("The dogs ran .").ids  # the words as running text, no specials
    assert enc[0].word_ids == [0, 1, 1, 2, 3, 3] and enc[0].type_ids is None
    labels, starts = align_labels(enc[0].word_ids, [7, 8, 9, 10])
    assert labels == [7, 8, -100, 9, 10, -100]
    assert starts == [True, True, False, True, True, False]
    labels, _ = align_labels(enc[0].word_ids, [0, 1, 2, 3], continuation=[0, 2, 2, 3])
    assert labels == [0, 1, 2, 2, 3, 3]
    assert enc[1].ids == [0] and enc[1].word_ids == [None]  # an empty row: one unlabelled stand-in
    assert encode_words(tok, [words], 3)[0].ids == enc[0].ids[:3]


# ---------------------------------------------------------------------- metrics
GOLD = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["O", "B-ORG", "O"]]
PRED = [["B-PER", "O", "O", "I-LOC", "I-LOC"], ["O", "B-ORG", "B-ORG"]]
# Gold entities: PER(0-1), LOC(3-4), ORG(1) = 3. Predicted (conlleval: I-LOC after O starts one):
# PER(0), LOC(3-4), ORG(1), ORG(2) = 4. Correct: LOC(3-4), ORG(1) = 2.
# Precision 2/4, recall 2/3, F1 = 2PR / (P + R) = 4/7.
WANT = {"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7}


def test_entity_scores_hand_computed() -> None:
    assert entity_scores(GOLD, PRED) == pytest.approx(WANT)
    assert entity_scores(GOLD, GOLD) == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0})
    assert entity_scores([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert is_bio(["O", "B-PER", "I-PER"]) and not is_bio(["NN", "O"]) and not is_bio(["O"])


def test_entity_score_metric_reads_rows_of_scored_positions() -> None:
    from torchmetrics.classification import MulticlassAccuracy

    labels = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-PER", "O"]
    ix = {t: i for i, t in enumerate(labels)}
    metrics = {s: EntityScore(labels, s) for s in ("precision", "recall", "f1")}
    acc = MulticlassAccuracy(len(labels), average="micro", ignore_index=-100)
    # Two batches: sub-token positions that are not scored (-100; their predictions are noise), and
    # an evaluation padding row scored nowhere.
    x = -100
    gold_0 = torch.tensor([[x, ix["B-PER"], x, ix["I-PER"], ix["O"], ix["B-LOC"], ix["I-LOC"], x], [x] * 8])
    pred_0 = torch.tensor([[5, ix["B-PER"], 3, ix["O"], ix["O"], ix["I-LOC"], ix["I-LOC"], 1], [2] * 8])
    gold_1 = torch.tensor([[x, ix["O"], ix["B-ORG"], ix["O"], x]])
    pred_1 = torch.tensor([[0, ix["O"], ix["B-ORG"], ix["B-ORG"], 4]])
    for p, g in ((pred_0, gold_0), (pred_1, gold_1)):
        acc.update(p, g)
        for m in metrics.values():
            m.update(p, g)
    assert metrics["f1"].sequences() == (GOLD, PRED)
    assert {s: float(m.compute()) for s, m in metrics.items()} == pytest.approx(WANT)
    assert float(acc.compute()) == pytest.approx(5 / 8)  # words tagged right / words


# Each rank scores other rows (rank 1 also an evaluation padding row); compute() gathers them all.
SYNC_WORKER = """
import json, sys, torch, torch.distributed as dist
from lm_lab.objectives.token_classification.task import EntityScore
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
labels = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-PER", "O"]
rows = json.loads(sys.argv[4])[rank]
metric = EntityScore(labels, "f1")
for gold, pred in rows:
    g = torch.tensor([[labels.index(t) for t in gold] or [-100]])
    p = torch.tensor([[labels.index(t) for t in pred] or [0]])
    metric.update(p, g)
value = float(metric.compute())
with metric.sync_context():  # compute() synced and restored the local rows; sequences() reads the synced ones
    gathered = metric.sequences()
json.dump({"f1": value, "rows": gathered}, open(out, "w"))
dist.destroy_process_group()
"""


def test_entity_score_gathers_every_ranks_rows(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    rows = [[[GOLD[0], PRED[0]]], [[GOLD[1], PRED[1]], [[], []]]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SYNC_WORKER, str(r), port, str(tmp_path / f"{r}.json"), json.dumps(rows)],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"{r}.json").read_text())
        assert got["f1"] == pytest.approx(WANT["f1"])
        pairs = sorted((tuple(g), tuple(p)) for g, p in zip(*got["rows"], strict=True))
        assert pairs == sorted((tuple(g), tuple(p)) for g, p in zip(GOLD, PRED, strict=True))


# ---------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """last.ckpt of a few steps of BERT pretraining (MLM + NSP) on Tiny Shakespeare."""
    run_dir = tmp_path_factory.mktemp("bert_mlm") / "run"
    run(
        [
            "model=bert_tiny",
            "logger=csv",
            "data=files",
            f"data.data_files={SHAKESPEARE}",
            "data.path=text",
            "data.sample_by=paragraph",
            "data.vocab_size=600",
            "data.block_size=32",
            "data.batch_size=8",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "scheduler.warmup_steps=1",
            "sample_tokens=0",
            "callbacks.text_samples=null",
        ],
        run_dir,
        shared_cache,
    )
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def scratch_bert(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> tuple[Path, dict]:
    """An uninterrupted run of bert_tiny from random init on wsj_pos (dropout on): (run dir, metrics)."""
    run_dir = tmp_path_factory.mktemp("bert_scratch") / "run"
    metrics, _ = run(BERT, run_dir, shared_cache)
    return run_dir, metrics


@pytest.fixture(scope="module")
def bio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BIO set made from the WSJ sample: runs of NNP/NNPS are NAME entities, runs of CD are NUM."""
    out = tmp_path_factory.mktemp("wsj_bio")
    for split, n in (("train", 160), ("validation", 40), ("test", 40)):
        rows = [json.loads(line) for line in (WSJ / f"{split}.jsonl").read_text().splitlines()[:n]]
        for r in rows:
            kinds = ["NAME" if t in ("NNP", "NNPS") else "NUM" if t == "CD" else "" for t in r["tags"]]
            r["tags"] = ["O" if not k else ("I-" if i and kinds[i - 1] == k else "B-") + k for i, k in enumerate(kinds)]
        write_jsonl(out / f"{split}.jsonl", rows)
    return out


@pytest.fixture(scope="module")
def gpt_bio(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, bio_dir: Path) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("gpt_bio") / "run"
    args = [*COMMON, files_arg(bio_dir), "data.text_column=tokens", "data.label_column=tags", "model=gpt_tiny"]
    metrics, _ = run([*args, "trainer.max_steps=4", "trainer.val_check_interval=2"], run_dir, shared_cache)
    return run_dir, metrics


def test_bert_from_scratch_logs_accuracy(scratch_bert: tuple[Path, dict]) -> None:
    run_dir, metrics = scratch_bert
    for name in ("val/acc", "test/acc", "val/loss", "test/loss"):
        assert metrics[name] >= 0.0 and torch.isfinite(torch.tensor(metrics[name])), name
    assert metrics["val/acc"] <= 1 and "val/f1" not in metrics  # POS tags: no entity scores
    rows = logged(run_dir)
    assert [float(r["step"]) for r in rows if r.get("val/acc")] == [3.0, 6.0]
    assert any(r.get("test/acc") for r in rows)
    task = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(task, TokenClassificationTask) and len(task.objective_cfg.labels) == 44
    words = ["The", "company", "said", "it", "expects", "higher", "earnings", "."]
    tags = task.predict([words])[0]
    assert len(tags) == len(words) and set(tags) <= set(task.objective_cfg.labels)


def test_init_from_a_pretraining_checkpoint(
    pretrained_bert: Path, tmp_path: Path, shared_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The loading itself: the encoder from the source; the head new; pooler and MLM/NSP heads unused.
    source = read_source(pretrained_bert)
    task = TokenClassificationTask(source.model_cfg, TokenClassificationConfig(labels=["NN", "VB"]))
    with caplog.at_level(logging.INFO, logger="lm_lab"):
        load_into(task, source)
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("initialised"))
    new, unused = message.split("; new (randomly initialised): ")[1].split("; unused from the source: ")
    assert new == "classifier.bias, classifier.weight"
    unused_keys = unused.split(", ")
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(unused_keys)
    assert all(k.startswith(("cls.", "bert.pooler.")) for k in unused_keys)
    state = task.net.state_dict()
    assert not any(k.startswith("bert.pooler") for k in state)
    for k, v in state.items():
        if not k.startswith("classifier."):
            assert torch.equal(v, source.weights[k]), k

    # The whole run, with the source's network and tokenizer.
    metrics, objects = run([*BERT, f"init_from={pretrained_bert}"], tmp_path / "run", shared_cache)
    assert {"val/acc", "test/acc"} <= metrics.keys()
    assert objects["datamodule"].tokenizer.to_str() == source.tokenizer.to_str()


def test_bert_export_equals_transformers(scratch_bert: tuple[Path, dict], tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    ckpt = scratch_bert[0] / "checkpoints" / "last.ckpt"
    task = load_checkpoint(ckpt)
    out = export(ckpt, tmp_path / "hf")
    hf = AutoModelForTokenClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "BertForTokenClassification"
    labels = task.objective_cfg.labels
    assert hf.config.id2label == dict(enumerate(labels)) and hf.config.label2id == {t: i for i, t in enumerate(labels)}
    enc = task.tokenizer(["The market fell sharply .", "Prices rose"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = task(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        theirs = hf(**enc).logits
    real = enc["attention_mask"].bool()
    assert (theirs - ours)[real].abs().max().item() <= 1e-4
    back = load_export_dir(out)
    assert isinstance(back, TokenClassificationTask) and back.objective_cfg.labels == labels
    words = [["Stocks", "fell", "."], ["He", "bought", "100", "shares"]]
    assert back.predict(words) == task.predict(words)


def test_gpt_on_bio_tags_reports_entity_scores_and_exports(gpt_bio: tuple[Path, dict], tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    run_dir, metrics = gpt_bio
    for stage in ("val", "test"):
        for name in ("acc", "precision", "recall", "f1"):
            assert 0.0 <= metrics[f"{stage}/{name}"] <= 1.0, (stage, name)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    task = load_checkpoint(ckpt)
    assert task.objective_cfg.labels == ["B-NAME", "B-NUM", "I-NAME", "I-NUM", "O"]
    out = export(ckpt, tmp_path / "hf")
    hf = AutoModelForTokenClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "GPT2ForTokenClassification"
    assert hf.config.id2label == dict(enumerate(task.objective_cfg.labels))
    ids = torch.tensor([encode_words(task.tokenizer_backend, [["Mr.", "Vinken", "is", "61", "."]], 64)[0].ids])
    with torch.no_grad():
        assert (hf(ids).logits - task(ids)).abs().max().item() <= 1e-4
    words = [["Pierre", "Vinken", ",", "61", "years", "old"]]
    assert load_export_dir(out).predict(words) == task.predict(words)


@pytest.mark.slow  # long end-to-end runs: make test-slow (CI runs both)
def test_resume_mid_run_equals_uninterrupted(
    scratch_bert: tuple[Path, dict], tmp_path: Path, shared_cache: Path
) -> None:
    want, _ = step_losses(scratch_bert[0])
    assert sorted(want) == list(range(1, STEPS + 1))
    run_dir = tmp_path / "run"
    run([*BERT, "trainer.max_steps=3"], run_dir, shared_cache)  # stops after step 3 (last.ckpt)
    assert step_losses(run_dir) == ({s: want[s] for s in (1, 2, 3)}, 3)
    run([*BERT, "ckpt_path=last"], run_dir, shared_cache)
    got, n = step_losses(run_dir)
    assert sorted(got) == sorted(want) and n == STEPS  # steps 4-6 appended: resumed, not restarted
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6, (got, want)


# ---------------------------------------------------------------------- bad data: one line each
def bad_dir(tmp_path: Path, test_rows: list[dict], train_rows: list[dict] | None = None) -> Path:
    """``test_rows`` as the test split; good training and validation rows, or ``train_rows`` for both."""
    good = [{"tokens": ["a", "b"], "tags": ["X", "Y"]}] * 4
    write_jsonl(tmp_path / "train.jsonl", train_rows or good)
    write_jsonl(tmp_path / "validation.jsonl", good if train_rows is None else train_rows)
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    return tmp_path


def dm_of(directory: Path, **data: object) -> TokenClassificationDataModule:
    cfg = DataConfig(
        path=None,
        data_files={s: str(directory / f"{s}.jsonl") for s in ("train", "validation", "test")},
        **{"text_column": "tokens", "label_column": "tags", "batch_size": 2, **data},
    )
    dm = TokenClassificationDataModule(cfg, TokenClassificationConfig())
    dm.connect(tokenizer=WP)
    return dm


@pytest.mark.parametrize(
    "rows,data,message",
    [
        (
            [{"tokens": ["a", "b"], "tags": ["X", "Y"]}, {"tokens": ["a", "b", "c"], "tags": ["X", "Y"]}],
            {},
            "row 1 of the test split has 3 words ('tokens') but 2 tags ('tags'): every word needs exactly one tag",
        ),
        (
            [{"tokens": ["a", "b"], "tags": ["X", "Z"]}],
            {},
            "the test split has tag(s) Z outside the tag set (2 tags: X, Y): fix the data or list every tag in "
            "objective.labels",
        ),
        ([{"tokens": ["a"], "tags": ["X"]}], {"label_column": "ner"}, "column 'ner' not in"),
        (
            [{"tokens": "a b", "tags": ["X", "Y"]}] * 4,  # text, not words, in every split
            {},
            "[train] holds string, not lists of words: set the data.*_column keys to the right columns",
        ),
    ],
    ids=["length_mismatch", "unknown_tag", "label_column_missing", "text_not_words"],
)
def test_bad_data_is_one_line(tmp_path: Path, rows: list[dict], data: dict, message: str) -> None:
    everywhere = isinstance(rows[0]["tokens"], str)  # datasets reads all splits with one schema
    dm = dm_of(bad_dir(tmp_path, rows, rows if everywhere else None), **data)
    with pytest.raises(DataError) as err:
        dm.complete_settings(dm.objective_cfg)
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_bad_data_on_the_command_line(tmp_path: Path, shared_cache: Path) -> None:
    rows = [{"tokens": ["a", "b"], "tags": ["X"]}] + [{"tokens": ["a", "b"], "tags": ["X", "Y"]}] * 3
    d = bad_dir(tmp_path / "data", [{"tokens": ["a"], "tags": ["X"]}], train_rows=rows)
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "model=bert_tiny",
            "objective=token_classification",
            "data=files",
            files_arg(d),
            "data.text_column=tokens",
            "data.label_column=tags",
            f"hydra.run.dir={tmp_path / 'r'}",
            f"paths.cache_dir={shared_cache}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: row 0 of the training split has 2 words ('tokens') but 1 tags ('tags'): every word needs exactly one tag"
    ]
