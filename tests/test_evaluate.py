"""`python -m lm_lab.evaluate`: sliding-window perplexity against the full-context value and an
independent loop, lm-eval-style multiple choice against log-likelihoods computed here with the
model directly, the masked-LM pass of an encoder, and the command line on a checkpoint and on its
export (same numbers), with one-line errors for bad input."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra

from lm_lab.evaluate import (
    ChoiceRow,
    document_ids,
    encode_pair,
    main,
    prefix_token_id,
    score_choices,
    sliding_window_nll,
    sliding_windows,
)
from lm_lab.export import export
from lm_lab.training.checkpoints import load_checkpoint
from tests.conftest import REPO, SHAKESPEARE, SHARED, TINY, compose_config
from train import train

SHAKES = [f"data.data_files={SHAKESPEARE}", "data.path=text", "data.sample_by=paragraph"]
POLARITY = SHARED / "sentence_polarity"
QUICK = [*TINY, *SHAKES, "trainer.max_steps=3", "trainer.val_check_interval=3", "sample_tokens=0"]


def _train(net: str, run_dir: Path, cache: Path) -> Path:
    cfg = compose_config([*QUICK, f"model={net}_tiny"], run_dir, cache)
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> dict:
    """A 3-step gpt_tiny checkpoint, its export, and the loaded task."""
    root = tmp_path_factory.mktemp("decoder")
    ckpt = _train("gpt", root / "run", shared_cache)
    return {"ckpt": ckpt, "hf": export(ckpt, root / "hf"), "task": load_checkpoint(ckpt)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> dict:
    root = tmp_path_factory.mktemp("encoder")
    ckpt = _train("bert", root / "run", shared_cache)
    return {"ckpt": ckpt, "hf": export(ckpt, root / "hf")}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    text = d / "shakes.txt"
    text.write_text("\n".join(SHAKESPEARE.read_text().splitlines()[:120]) + "\n")
    polarity = [json.loads(line) for line in (POLARITY / "test.jsonl").open()][:24]
    mc = d / "mc.jsonl"
    with mc.open("w") as f:
        for i, r in enumerate(polarity):
            row = (
                {"context": r["text"] + " Sentiment:", "choices": [" negative", " positive"], "label": r["label"]}
                if i % 2
                else {"context": r["text"] + " It was ", "choices": ["awful – avoid", "good"], "label": r["label"]}
            )
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"text": text, "mc": mc}


def _ids(task, text: str) -> list[int]:
    return task.tokenizer_backend.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def _full_context_nll(task, ids: list[int]) -> tuple[float, int]:
    """Every token after the first scored with everything before it, in one forward pass."""
    x = torch.tensor([ids])
    logits = task(x)[0, :-1].float()
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum").double()), len(ids) - 1


# ---------------------------------------------------------------------- perplexity
def test_sliding_window_covering_the_text_is_the_full_context_value(decoder: dict) -> None:
    task = decoder["task"]
    ids = _ids(task, SHAKESPEARE.read_text()[:2000])[:200]
    assert len(ids) == 200
    expected, n = _full_context_nll(task, ids)
    for window, stride in ((200, 200), (256, 64), (256, 256), (200, 7)):
        nll, count = sliding_window_nll(task, ids, window, stride)
        assert count == n == 199
        assert nll == pytest.approx(expected, rel=1e-6)


def test_stride_equal_to_window_is_non_overlapping_chunks(decoder: dict) -> None:
    task = decoder["task"]
    ids = _ids(task, SHAKESPEARE.read_text()[:6000])[:530]
    total, count = 0.0, 0
    for start in range(0, len(ids), 64):  # each chunk read on its own: its first token has no context
        chunk = ids[start : start + 64]
        if len(chunk) >= 2:
            nll, n = _full_context_nll(task, chunk)
            total, count = total + nll, count + n
    nll, n = sliding_window_nll(task, ids, 64, 64, batch_size=3)
    assert n == count == 530 - 9  # 9 chunks (the last of 18 tokens), one unscored token each
    assert nll == pytest.approx(total, rel=1e-6)


@torch.no_grad()
def test_stride_below_window_matches_the_guide_loop(decoder: dict) -> None:
    """The loop of the Hugging Face guide, written out here: each window's targets are the tokens
    the previous window did not reach, the rest of the window is context (labels -100)."""
    task = decoder["task"]
    ids = torch.tensor(_ids(task, SHAKESPEARE.read_text()[:8000])[:700])
    window, stride = 128, 48
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        input_ids = ids[begin:end].unsqueeze(0)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        logits = task(input_ids)
        shift_logits, shift_labels = logits[:, :-1].float(), target_ids[:, 1:]
        nll_sum += float(F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), reduction="sum"))
        n_tokens += int((shift_labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    nll, n = sliding_window_nll(task, ids, window, stride, batch_size=4)
    assert n == n_tokens == 699
    assert nll == pytest.approx(nll_sum, rel=1e-6)
    windows = sliding_windows(700, window, stride)
    assert windows[0] == (0, 128, 1) and windows[1] == (48, 176, 128) and windows[-1][1] == 700


def test_documents_are_packed_as_training_packs_them(decoder: dict) -> None:
    tok = decoder["task"].tokenizer_backend
    eot = tok.token_to_id("<|endoftext|>")
    assert document_ids(tok, ["ab cd", "ef"]) == [
        *_ids(decoder["task"], "ab cd"),
        eot,
        *_ids(decoder["task"], "ef"),
        eot,
    ]


# ---------------------------------------------------------------------- multiple choice
@torch.no_grad()
def _continuation_ll(task, context: str, continuation: str, max_len: int | None = None) -> float:
    """log P(continuation | context): the pair tokenized whole, split at the context's tokens."""
    ctx, whole = _ids(task, context), _ids(task, context + continuation)
    assert whole[: len(ctx)] == ctx
    cont = whole[len(ctx) :]
    inp = whole[-(max_len + 1) :] if max_len else whole
    logp = task(torch.tensor([inp[:-1]]))[0].float().log_softmax(-1)
    return sum(float(logp[len(inp) - 1 - len(cont) + j, t]) for j, t in enumerate(cont))


def test_multiple_choice_matches_log_likelihoods_computed_by_hand(decoder: dict) -> None:
    task = decoder["task"]
    long_context = " ".join(SHAKESPEARE.read_text().split()[:400])  # longer than max_seq_len (256)
    rows = [
        ChoiceRow("First Citizen:", [" Before we proceed", " You are all resolved", " Speak"], 1),
        # A trailing space moves to the choices: scored as "...is" + " good" / " bad".
        ChoiceRow("The review is ", ["good", "bad"], 0),
        ChoiceRow(long_context, [" the end", " citizens"], 1),
        ChoiceRow("Verdict:", [" awful – avoid", " fine"], 0),
    ]
    assert encode_pair(task.tokenizer_backend, "The review is ", "good", prefix_token_id(task))[1] == _ids(
        task, " good"
    )
    assert len(_ids(task, long_context)) > 300
    expected = [
        [_continuation_ll(task, "First Citizen:", c) for c in rows[0].choices],
        [_continuation_ll(task, "The review is", " " + c) for c in rows[1].choices],
        [_continuation_ll(task, long_context, c, max_len=256) for c in rows[2].choices],
        [_continuation_ll(task, "Verdict:", c) for c in rows[3].choices],
    ]
    out = score_choices(task, rows, batch_size=3)
    for got, want in zip(out["loglikelihoods"], expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)

    def hits(norm) -> list[float]:
        return [
            float(max(range(len(r.choices)), key=lambda i: ll[i] / norm(r.choices[i])) == r.label)
            for r, ll in zip(rows, expected, strict=True)
        ]

    for name, norm in (("acc", lambda c: 1), ("acc_norm", len), ("acc_bytes", lambda c: len(c.encode()))):
        values = hits(norm)
        assert out[name] == sum(values) / 4
        assert out[f"{name}_stderr"] == pytest.approx(statistics.stdev(values) / 2)


# ---------------------------------------------------------------------- the command line
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_cli_on_checkpoint_and_export_gives_the_same_numbers(
    decoder: dict, files: dict, tmp_path: Path, capsys
) -> None:
    ckpt, hf = decoder["ckpt"], decoder["hf"]
    ppl = ["perplexity", "--data", str(files["text"]), "--window", "96", "--stride", "40", "--max-tokens", "600"]
    mc = ["multiple-choice", "--data", str(files["mc"]), "--batch-size", "5"]
    for args, name in ((ppl, "perplexity"), (mc, "multiple-choice")):
        assert main([str(ckpt), *args]) == 0
        table = capsys.readouterr().out
        assert main([str(hf), *args]) == 0
        from_ckpt = _json(ckpt.with_name(f"last.eval-{name}.json"))
        from_hf = _json(hf / f"eval-{name}.json")
        assert from_ckpt["task"] == name and from_ckpt["network"] == "gpt" and from_ckpt["objective"] == "causal_lm"
        assert from_ckpt["settings"] == from_hf["settings"]
        assert from_ckpt["metrics"].keys() == from_hf["metrics"].keys()
        for key, value in from_ckpt["metrics"].items():
            assert from_hf["metrics"][key] == pytest.approx(value, rel=1e-6), key
        assert all(key in table for key in from_ckpt["metrics"])
    ppl_metrics = _json(ckpt.with_name("last.eval-perplexity.json"))["metrics"]
    assert ppl_metrics["tokens"] == 600 and ppl_metrics["targets"] == 599
    assert ppl_metrics["ppl"] == pytest.approx(math.exp(ppl_metrics["nll"]))
    ids = document_ids(decoder["task"].tokenizer_backend, [files["text"].read_text()])[:600]
    assert ppl_metrics["nll"] == pytest.approx(sliding_window_nll(decoder["task"], ids, 96, 40)[0] / 599, rel=1e-6)
    mc_metrics = _json(hf / "eval-multiple-choice.json")["metrics"]
    assert mc_metrics["n"] == 24 and 0 <= mc_metrics["acc"] <= 1 and mc_metrics["acc_stderr"] > 0
    # --output elsewhere, and the module run as a user runs it
    out = tmp_path / "sub" / "mc.json"
    r = subprocess.run(
        [sys.executable, "-m", "lm_lab.evaluate", str(ckpt), *mc, "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert _json(out)["metrics"] == _json(ckpt.with_name("last.eval-multiple-choice.json"))["metrics"]
    assert "acc_norm" in r.stdout and not list(out.parent.glob(".*.tmp"))


def test_mlm_on_an_encoder(encoder: dict, files: dict, tmp_path: Path, shared_cache: Path, capsys) -> None:
    args = ["mlm", "--data", str(files["text"]), "--block-size", "32", "--cache-dir", str(shared_cache)]
    assert main([str(encoder["ckpt"]), *args, "--output", str(tmp_path / "a.json")]) == 0
    assert main([str(encoder["hf"]), *args, "--output", str(tmp_path / "b.json"), "--batch-size", "3"]) == 0
    a, b = _json(tmp_path / "a.json"), _json(tmp_path / "b.json")
    m = a["metrics"]
    assert a["network"] == "bert" and a["objective"] == "masked_lm" and a["settings"]["block_size"] == 32
    assert m["pairs"] > 10 and m["masked_tokens"] > m["pairs"]
    assert 0 <= m["mlm_acc"] <= 1 and 0 <= m["nsp_acc"] <= 1 and math.isfinite(m["mlm_loss"]) and m["nsp_loss"] > 0
    assert m["mlm_ppl"] == pytest.approx(math.exp(m["mlm_loss"]))
    # Fixed validation masks: the export (same weights and settings) scores exactly the same tokens.
    assert b["metrics"].keys() == m.keys()
    for key, value in m.items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-6), key
    # Without --block-size a checkpoint is read at the block size it was trained with (TINY: 32).
    assert main([str(encoder["ckpt"]), "mlm", "--data", str(files["text"]), "--cache-dir", str(shared_cache)]) == 0
    assert _json(encoder["ckpt"].with_name("last.eval-mlm.json"))["metrics"] == m
    capsys.readouterr()


# ---------------------------------------------------------------------- one-line errors
BAD_ROWS = {
    "malformed": (
        '{"context": "a", "choices": [" b", " c"], "label": 0}\n{"context": "a", "choices": [\n',
        "line 2: not valid JSON",
    ),
    "label_range": ('{"context": "a", "choices": [" b", " c"], "label": 2}\n', "label 2 is out of range for 2 choices"),
    "one_choice": ('{"context": "a", "choices": [" b"], "label": 0}\n', "'choices' must be a list of at least two"),
}


@pytest.mark.parametrize(
    "case",
    [
        "missing_data",
        "missing_source",
        "encoder_perplexity",
        "decoder_mlm",
        "decoder_classify",
        "window_too_long",
        *BAD_ROWS,
    ],
)
def test_bad_input_is_one_line(case: str, decoder: dict, encoder: dict, files: dict, tmp_path: Path, capsys) -> None:
    dec, enc = str(decoder["ckpt"]), str(encoder["ckpt"])
    text, mc = str(files["text"]), str(files["mc"])
    argv, message = {
        "missing_data": ([dec, "perplexity", "--data", str(tmp_path / "nope.txt")], "nope.txt is not found"),
        "missing_source": ([str(tmp_path / "x.ckpt"), "multiple-choice", "--data", mc], "x.ckpt not found"),
        "encoder_perplexity": ([enc, "perplexity", "--data", text], "perplexity needs a decoder"),
        "decoder_mlm": ([dec, "mlm", "--data", text], "mlm needs an encoder"),
        "decoder_classify": ([dec, "classify", "--data", str(POLARITY / "validation.jsonl")], "not a classifier"),
        "window_too_long": ([dec, "perplexity", "--data", text, "--window", "257"], "--window 257 is longer"),
    }.get(case, (None, None))
    if case in BAD_ROWS:
        rows, message = BAD_ROWS[case]
        bad = tmp_path / "bad.jsonl"
        bad.write_text(rows)
        argv = [dec, "multiple-choice", "--data", str(bad)]
    out = tmp_path / "out.json"
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_classify_reports_the_classifier_metrics_on_a_labelled_file(tmp_path: Path, shared_cache: Path) -> None:
    """A classifier fine-tuned with objective=classification, scored on the polarity test file; the
    accuracy equals the one computed here from the model's own predictions, checkpoint and export alike."""
    from lm_lab.data.labelled import labelled_files

    files = labelled_files(SHARED / "sentence_polarity")
    cfg = compose_config(
        [
            *TINY,
            "objective=classification",
            "model=bert_tiny",
            "data=files",
            f"data.data_files={{train: {files['train']}, validation: {files['validation']}}}",
            "data.vocab_size=1000",
            "data.block_size=48",
            "data.batch_size=8",
            "sample_tokens=0",
        ],
        tmp_path / "run",
        shared_cache,
    )
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    rows = [json.loads(line) for line in Path(files["test"]).read_text().splitlines()][:120]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_checkpoint(ckpt)
    predicted = task.predict([r["text"] for r in rows])
    want = sum(p == str(r["label"]) for p, r in zip(predicted, rows, strict=True)) / len(rows)
    results = []
    for source in (ckpt, export(ckpt, tmp_path / "hf")):
        out = tmp_path / f"{Path(source).name}.json"
        assert main([str(source), "classify", "--data", str(data), "--output", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    for payload in results:
        assert payload["objective"] == "classification" and payload["settings"]["labels"] == ["0", "1"]
        assert payload["metrics"]["n"] == len(rows)
        assert payload["metrics"]["accuracy"] == pytest.approx(want, abs=1e-6)
        assert {"f1", "mcc"} <= payload["metrics"].keys()
