"""Evaluate a trained model (a checkpoint or an exported Hugging Face directory) on a file.

    python -m lm_lab.evaluate SOURCE perplexity      --data FILE [--text-column text] [--window N]
                                                     [--stride S] [--max-tokens M]
    python -m lm_lab.evaluate SOURCE multiple-choice --data FILE.jsonl
    python -m lm_lab.evaluate SOURCE mlm             --data FILE [--text-column text] [--block-size N]
                                                     [--sample-by paragraph]
    python -m lm_lab.evaluate SOURCE classify        --data FILE.jsonl [--text-column text]
                                                     [--label-column label] [--text-pair-column COL]

(options of every task: ``--batch-size``, ``--device``, ``--output PATH``). Each prints a table and
writes the numbers as JSON beside the checkpoint (``<ckpt stem>.eval-<task>.json``) or inside the
exported directory (``eval-<task>.json``), atomically.

* ``perplexity`` (decoders): sliding-window perplexity over the whole tokenized file, as the
  Hugging Face guide "Perplexity of fixed-length models" computes it. Windows of ``window`` tokens
  start every ``stride`` tokens; a window's targets are its tokens the previous window did not
  reach (a window that does not overlap the previous one, such as the first, cannot score its first
  token). ``nll`` is the mean over all targets, ``ppl = exp(nll)``. Documents (a ``.txt`` file is
  one, a ``.jsonl`` row is one) are tokenized as training packs them: each followed by the
  end-of-text token.
* ``multiple-choice`` (decoders): rows ``{"context", "choices", "label"}``; each choice is scored
  by the summed log-likelihood of its tokens after the context, exactly as lm-evaluation-harness
  scores ``loglikelihood`` requests (trailing spaces of the context move to the continuation; the
  pair is encoded whole and split at the context's length; the input is cut from the left to the
  model's ``max_seq_len``). ``acc``: the best summed log-likelihood is the label; ``acc_norm``: the
  best log-likelihood per character of the choice (lm-eval's ``acc_norm``); standard errors are the
  sample standard deviation over sqrt(n), as lm-eval reports them.
* ``mlm`` (encoders): masked-token loss and accuracy (and next-sentence accuracy under a pair
  head), with the masked-LM objective's own data pipeline and its fixed validation masks.
* ``classify`` (classifiers of ``objective=classification``): accuracy, F1 and MCC, or Pearson and
  Spearman correlations for a regression head.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lm_lab.errors import CheckpointError, DataError
from lm_lab.schema import ConfigError
from lm_lab.training.console import run_command

TASKS = ("perplexity", "multiple-choice", "mlm", "classify")


# ---------------------------------------------------------------------- reading data files
def _check_file(path: Path, suffixes: Sequence[str]) -> Path:
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not found"
        raise DataError(f"data file {path} is {what}: pass --data a {' or '.join(suffixes)} file")
    if path.suffix.lower() not in suffixes:
        raise DataError(f"data file {path} is not a {' or '.join(suffixes)} file: convert it or pass another --data")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a ``DataError``."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}, line {n}: not valid JSON ({e.msg}): write one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}, line {n}: a JSON {type(row).__name__}, not an object: write one object per line"
                    )
                yield n, row
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None


def read_documents(path: Path, text_column: str = "text") -> list[str]:
    """The documents of a ``.txt`` file (the whole file) or of a ``.jsonl`` file (``text_column`` of each row)."""
    _check_file(path, (".txt", ".jsonl"))
    if path.suffix.lower() == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(f"data file {path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None
    docs = []
    for n, row in read_jsonl(path):
        text = row.get(text_column)
        if not isinstance(text, str):
            found = "no such key" if text_column not in row else f"a {type(text).__name__}"
            raise DataError(
                f"{path}, line {n}: {text_column!r} is {found}, not text (keys: {sorted(row)}): set --text-column"
            )
        docs.append(text)
    if not docs:
        raise DataError(f"data file {path} has no rows")
    return docs


@dataclasses.dataclass
class ChoiceRow:
    context: str
    choices: list[str]
    label: int
    where: str = "a row"  # file and line, for messages


def read_choices(path: Path) -> list[ChoiceRow]:
    """Rows ``{"context": str, "choices": [str, ...], "label": int}``, each checked (one line per fault)."""
    _check_file(path, (".jsonl",))
    rows = []
    for n, row in read_jsonl(path):
        context, choices, label = row.get("context"), row.get("choices"), row.get("label")
        where = f"{path}, line {n}"
        if not isinstance(context, str):
            raise DataError(f"{where}: 'context' must be a string (keys: {sorted(row)})")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{where}: 'label' must be an integer, the index of the right choice (got {label!r})")
        if not 0 <= label < len(choices):
            raise DataError(
                f"{where}: label {label} is out of range for {len(choices)} choices (0 to {len(choices) - 1})"
            )
        rows.append(ChoiceRow(context, choices, label, where))
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


# ---------------------------------------------------------------------- loading the model
def load_for(source: Path, task: str) -> Any:
    """The task (eval mode) of ``source`` if it can be evaluated with ``task``, else a one-line error."""
    from lm_lab.training.checkpoints import load_task

    if not source.exists():
        raise CheckpointError(f"{source} not found: pass a .ckpt file or a directory written by lm_lab.export")
    model = load_task(source, able_to="forward", hint="")
    what = f"{source} holds a {model.network} model trained with objective={model.objective_spec.name}"
    if task in ("perplexity", "multiple-choice") and not callable(getattr(model, "generate", None)):
        raise CheckpointError(
            f"{what}, not a language model that predicts the next token: {task} needs a decoder (GPT-2, Llama) "
            "trained with objective=causal_lm; use `mlm` for an encoder (BERT)"
        )
    if task == "mlm" and not callable(getattr(model, "fill_mask", None)):
        raise CheckpointError(
            f"{what}, not a masked language model: mlm needs an encoder (BERT) trained with objective=masked_lm; "
            "use `perplexity` or `multiple-choice` for a decoder"
        )
    if task == "classify" and not hasattr(model.objective_cfg, "labels"):
        raise CheckpointError(
            f"{what}, not a classifier: classify needs a model fine-tuned with objective=classification; "
            "use `perplexity`/`multiple-choice` for a decoder or `mlm` for an encoder"
        )
    return model


def _forward_logits(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Token ids (B, T) -> next-token logits (B, T, V) of a decoder task."""
    return lambda ids: model(ids)


# ---------------------------------------------------------------------- perplexity
def document_ids(tokenizer: Any, documents: Sequence[str]) -> list[int]:
    """The token ids of ``documents`` as training packs them: each document followed by end-of-text."""
    from lm_lab.data.tokenizer import eot_id

    eot = eot_id(tokenizer)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        ids.extend(enc.ids)
        if eot is not None:
            ids.append(eot)
    return ids


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` of each window over ``n_tokens`` tokens: the window reads
    ``[begin, end)`` and scores the tokens ``[first_target, end)``, those the previous window did not
    reach; a window that does not overlap its predecessor cannot score its own first token."""
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(f"need --window >= 2 and 1 <= --stride <= --window (got window {window}, stride {stride})")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def sliding_window_nll(
    forward: Callable[[torch.Tensor], torch.Tensor],
    ids: Sequence[int] | torch.Tensor,
    window: int,
    stride: int,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> tuple[float, int]:
    """(summed negative log-likelihood, number of targets) of ``ids`` scored window by window."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    windows = sliding_windows(len(ids), window, stride)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:  # only the last window may be shorter: batches of equal-length windows
        by_length.setdefault(w[1] - w[0], []).append(w)
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            part = group[i : i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in part]).to(device)
            logits = forward(x)[:, :-1].float()
            nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(
                len(part), length - 1
            )
            for row, (b, e, first) in enumerate(part):
                # Position j of the window predicts token b + j + 1.
                total += nll[row, first - b - 1 :].double().sum().cpu()
                count += e - first
    return float(total), count


def run_perplexity(model: Any, args: argparse.Namespace, docs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    max_len = int(model.model_cfg.max_seq_len)
    window = args.window if args.window is not None else max_len
    stride = args.stride if args.stride is not None else window
    sliding_windows(0, window, stride)  # checks the pair before the text is tokenized
    if window > max_len:
        raise ConfigError(
            f"--window {window} is longer than the model reads (max_seq_len {max_len}): use at most {max_len}"
        )
    ids = document_ids(model.tokenizer_backend, docs)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise DataError(f"{args.data} holds {len(ids)} token(s): perplexity needs at least 2")
    nll, n = sliding_window_nll(
        _forward_logits(model), ids, window, stride, batch_size=args.batch_size, device=args.device
    )
    mean = nll / n
    settings = {"window": window, "stride": stride, "max_tokens": args.max_tokens, "text_column": args.text_column}
    metrics = {"tokens": len(ids), "targets": n, "nll": mean, "ppl": math.exp(min(mean, 700.0))}
    return settings, metrics


# ---------------------------------------------------------------------- multiple choice (lm-eval's loglikelihood)
def encode_pair(tokenizer: Any, context: str, continuation: str, prefix_id: int | None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness (``TemplateLM.loglikelihood`` with
    ``HFLM``) makes them for a decoder: trailing whitespace of the context moves to the front of the
    continuation; context + continuation is encoded whole and the continuation is what follows the
    context's own encoding. An empty context becomes the prefix token (BOS, else EOS)."""
    prefix_text = tokenizer.id_to_token(prefix_id) if prefix_id is not None else None

    def encode(text: str, special: bool = True) -> list[int]:
        # HFLM.tok_encode: the tokenizer's own special tokens, unless the text starts with the prefix token.
        if prefix_text and text.startswith(prefix_text):
            special = False
        return tokenizer.encode(text, add_special_tokens=special).ids

    if context == "":
        if prefix_id is None:
            raise DataError("an empty context needs a BOS or end-of-text token, which this tokenizer does not have")
        ids = encode(continuation, special=False)
        if ids and ids[0] == prefix_id:
            return ids[:1], ids[1:]
        return [prefix_id], ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        raise DataError("a context holds only whitespace: give it text, or make it empty")
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


def prefix_token_id(model: Any) -> int | None:
    """lm-eval's prefix token: the tokenizer's BOS, else its EOS (lm_lab's end-of-text token)."""
    hf = model.tokenizer
    if hf is None:
        return None
    return hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id


@torch.no_grad()
def loglikelihoods(
    forward: Callable[[torch.Tensor], torch.Tensor],
    requests: Sequence[tuple[list[int], list[int]]],
    max_len: int,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[float]:
    """The summed log-probability of each continuation given its context (lm-eval's rule: the model
    reads the last ``max_len`` tokens of context + continuation, less the final token)."""
    inputs = []
    for context, continuation in requests:
        if not continuation or len(continuation) > max_len:
            raise ValueError(f"continuations must be 1 to {max_len} tokens long, not {len(continuation)}")
        inputs.append((context + continuation)[-(max_len + 1) :][:-1])
    out = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        width = len(inputs[part[0]])
        # Right padding: a causal model's positions before the padding never see it.
        x = torch.zeros(len(part), width, dtype=torch.long)
        for row, i in enumerate(part):
            x[row, : len(inputs[i])] = torch.tensor(inputs[i])
        logits = forward(x.to(device))
        for row, i in enumerate(part):
            n_in, cont = len(inputs[i]), requests[i][1]
            scores = logits[row, n_in - len(cont) : n_in].float().log_softmax(-1)  # only the continuation's rows
            target = torch.tensor(cont, device=scores.device).unsqueeze(-1)
            out[i] = float(scores.gather(-1, target).sum())
    return out


def _argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first on a tie (``numpy.argmax``, as lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's standard error of a mean: the sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def score_choices(model: Any, rows: Sequence[ChoiceRow], *, batch_size: int = 8, device: Any = "cpu") -> dict[str, Any]:
    """acc / acc_norm (and their standard errors) of ``rows``, and each row's log-likelihoods."""
    tok = model.tokenizer_backend
    prefix = prefix_token_id(model)
    max_len = int(model.model_cfg.max_seq_len)
    requests, owner = [], []
    for r, row in enumerate(rows):
        for choice in row.choices:
            try:
                context, continuation = encode_pair(tok, row.context, choice, prefix)
            except DataError as e:
                raise DataError(f"{row.where}: {e}") from None
            if not continuation or len(continuation) > max_len:
                raise DataError(
                    f"{row.where}: choice {choice!r} is {len(continuation)} tokens after its context: "
                    f"a choice must be 1 to {max_len} tokens (the model's max_seq_len)"
                )
            requests.append((context, continuation))
            owner.append(r)
    lls = loglikelihoods(_forward_logits(model), requests, max_len, batch_size=batch_size, device=device)
    per_row: list[list[float]] = [[] for _ in rows]
    for r, ll in zip(owner, lls, strict=True):
        per_row[r].append(ll)
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for row, scores in zip(rows, per_row, strict=True):
        # lm-eval: acc_norm divides by the choice's length in characters, acc_bytes in UTF-8 bytes
        # (the choice as given, without a target delimiter).
        chars = [s / len(c) for s, c in zip(scores, row.choices, strict=True)]
        utf8 = [s / len(c.encode("utf-8")) for s, c in zip(scores, row.choices, strict=True)]
        for name, values in (("acc", scores), ("acc_norm", chars), ("acc_bytes", utf8)):
            hits[name].append(float(_argmax(values) == row.label))
    out: dict[str, Any] = {"n": len(rows)}
    for name, values in hits.items():
        out[name] = sum(values) / len(values)
        out[f"{name}_stderr"] = mean_stderr(values)
    out["loglikelihoods"] = per_row
    return out


def run_multiple_choice(
    model: Any, args: argparse.Namespace, rows: list[ChoiceRow]
) -> tuple[dict[str, Any], dict[str, Any]]:
    result = score_choices(model, rows, batch_size=args.batch_size, device=args.device)
    result.pop("loglikelihoods")
    return {"max_seq_len": int(model.model_cfg.max_seq_len)}, result


# ---------------------------------------------------------------------- masked LM
def _trained_block_size(source: Path) -> int | None:
    """The data.block_size a checkpoint was trained with (None for an exported directory)."""
    if source.is_dir():
        return None
    from lm_lab.training.checkpoints import data_state, read_checkpoint

    saved = data_state(read_checkpoint(source)).get("data") or {}
    return saved.get("block_size")


def run_mlm(model: Any, args: argparse.Namespace, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The masked-LM objective's validation pass over ``args.data``: its DataModule builds the
    sentence pairs and masks them with the fixed validation seed; its ``_step`` computes the losses."""
    import datasets

    from lm_lab.data.options import DataConfig
    from lm_lab.objectives.masked_lm.data import MaskedLMDataModule

    max_len = int(model.model_cfg.max_seq_len)
    block = args.block_size if args.block_size is not None else (_trained_block_size(args.source) or max_len)
    if block > max_len:
        raise ConfigError(f"--block-size {block} is longer than the model reads (max_seq_len {max_len})")
    sample_by = args.sample_by or ("paragraph" if path.suffix.lower() == ".txt" else "document")
    files = {"train": str(path), "validation": str(path)}  # the file is the validation split (train: unused)
    cfg = DataConfig(
        path=None,
        data_files=files,
        text_column=args.text_column,
        sample_by=sample_by,
        block_size=block,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )
    settings = dataclasses.replace(model.objective_cfg, dupe_factor=1)
    dm = MaskedLMDataModule(cfg, settings, seed=0)
    # Setup wants one training batch: ask for batches of one, then score in batches of --batch-size.
    dm.connect(tokenizer=model.tokenizer_backend, micro_batch_size=1)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the table is the output; building the pairs is not news
    try:
        dm.prepare_data()
        dm.setup("validate")
    finally:
        if bars:
            datasets.enable_progress_bars()
    dm.connect(micro_batch_size=args.batch_size)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    with torch.no_grad():
        for batch in dm.val_dataloader():
            batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model._step(batch, "val")
            for name, (mean, weight) in out.metrics.items():
                w = float(weight)
                sums[name] = sums.get(name, 0.0) + float(mean) * w
                weights[name] = weights.get(name, 0.0) + w
    metrics: dict[str, Any] = {"pairs": len(dm.val_set), "masked_tokens": int(weights.get("mlm_loss", 0))}
    for name in ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"):
        if weights.get(name):
            metrics[name] = sums[name] / weights[name]
    metrics["mlm_ppl"] = math.exp(min(metrics["mlm_loss"], 700.0))
    run_settings = {
        "block_size": block,
        "sample_by": sample_by,
        "text_column": args.text_column,
        "pair_objective": settings.pair_objective,
        "mlm_probability": settings.mlm_probability,
    }
    return run_settings, metrics


# ---------------------------------------------------------------------- classification
def _label_index(value: Any, labels: Sequence[Any], where: str) -> int:
    names = [str(label) for label in labels]
    if str(value) in names:
        return names.index(str(value))
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise DataError(f"{where}: label {value!r} is not one of the model's labels {list(labels)}")


def _is_regression(settings: Any) -> bool:
    return getattr(settings, "problem_type", None) == "regression" or not getattr(settings, "labels", None)


def classification_metrics(preds: torch.Tensor, target: torch.Tensor, num_labels: int) -> dict[str, float]:
    """accuracy, F1 (binary: of label 1; else macro) and MCC of predicted label indices."""
    from torchmetrics.classification import (
        BinaryF1Score,
        MulticlassAccuracy,
        MulticlassF1Score,
        MulticlassMatthewsCorrCoef,
    )

    acc = MulticlassAccuracy(num_classes=num_labels, average="micro")(preds, target)
    f1 = (
        BinaryF1Score()(preds, target)
        if num_labels == 2
        else MulticlassF1Score(num_classes=num_labels, average="macro")(preds, target)
    )
    mcc = MulticlassMatthewsCorrCoef(num_classes=num_labels)(preds, target)
    return {"accuracy": float(acc), "f1": float(f1), "mcc": float(mcc)}


def regression_metrics(preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

    return {
        "pearson": float(PearsonCorrCoef()(preds, target)),
        "spearman": float(SpearmanCorrCoef()(preds, target)),
        "mse": float(MeanSquaredError()(preds, target)),
    }


@dataclasses.dataclass
class LabelledRow:
    where: str  # file and line, for messages
    text: str
    pair: str | None
    label: Any


def read_labelled(path: Path, text_column: str, label_column: str, pair_column: str | None) -> list[LabelledRow]:
    """Rows of a labelled ``.jsonl`` file: text (and text pair) columns and a label, each checked."""
    _check_file(path, (".jsonl",))
    rows = []
    for n, row in read_jsonl(path):
        where = f"{path}, line {n}"
        for col in (text_column, pair_column):
            if col is not None and not isinstance(row.get(col), str):
                raise DataError(
                    f"{where}: {col!r} must be text (keys: {sorted(row)}): set --text-column/--text-pair-column"
                )
        if row.get(label_column) is None:
            raise DataError(f"{where}: no {label_column!r} (keys: {sorted(row)}): set --label-column")
        rows.append(LabelledRow(where, row[text_column], row[pair_column] if pair_column else None, row[label_column]))
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def run_classify(
    model: Any, args: argparse.Namespace, rows: list[LabelledRow]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A classifier (``forward(input_ids, attention_mask, token_type_ids) -> logits (B, num_labels)``,
    settings with ``labels``) on a labelled ``.jsonl`` file."""
    from tokenizers import Tokenizer

    settings = model.objective_cfg
    labels = list(getattr(settings, "labels", None) or [])
    regression = _is_regression(settings)
    targets: list[Any] = []
    for row in rows:
        if not regression:
            targets.append(_label_index(row.label, labels, row.where))
        elif isinstance(row.label, bool) or not isinstance(row.label, (int, float)):
            raise DataError(f"{row.where}: label {row.label!r} is not a number (the model is a regression head)")
        else:
            targets.append(float(row.label))
    texts = [r.text for r in rows]
    pairs = [r.pair for r in rows]
    tok = Tokenizer.from_str(model.tokenizer_backend.to_str())
    tok.enable_truncation(max_length=int(model.model_cfg.max_seq_len))
    pad_id = tok.token_to_id("[PAD]")
    pad_id = pad_id if pad_id is not None else int(getattr(model.model_cfg, "pad_token_id", 0) or 0)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(texts), args.batch_size):
            encs = [
                tok.encode(t, p) if p is not None else tok.encode(t)
                for t, p in zip(
                    texts[start : start + args.batch_size], pairs[start : start + args.batch_size], strict=True
                )
            ]
            width = max(len(e.ids) for e in encs)
            ids = torch.full((len(encs), width), pad_id, dtype=torch.long)
            types = torch.zeros_like(ids)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(encs):
                ids[i, : len(e.ids)] = torch.tensor(e.ids)
                types[i, : len(e.ids)] = torch.tensor(e.type_ids)
                mask[i, : len(e.ids)] = 1
            logits = model(
                input_ids=ids.to(args.device), attention_mask=mask.to(args.device), token_type_ids=types.to(args.device)
            )
            outputs.append(logits.float().cpu())
    logits = torch.cat(outputs)
    if regression:
        metrics = regression_metrics(logits.view(-1), torch.tensor(targets))
    else:
        metrics = classification_metrics(logits.argmax(-1), torch.tensor(targets), max(len(labels), logits.size(-1)))
    run_settings = {
        "text_column": args.text_column,
        "text_pair_column": args.text_pair_column,
        "label_column": args.label_column,
        "labels": labels,
        "regression": regression,
    }
    return run_settings, {"n": len(texts), **metrics}


# ---------------------------------------------------------------------- output
# task -> (read and check the data without the model, evaluate the model on it)
TASK_STEPS: dict[str, tuple[Callable[[argparse.Namespace], Any], Callable[..., tuple[dict, dict]]]] = {
    "perplexity": (lambda a: read_documents(a.data, a.text_column), run_perplexity),
    "multiple-choice": (lambda a: read_choices(a.data), run_multiple_choice),
    "mlm": (lambda a: _check_file(a.data, (".txt", ".jsonl")), run_mlm),
    "classify": (lambda a: read_labelled(a.data, a.text_column, a.label_column, a.text_pair_column), run_classify),
}


def default_output(source: Path, task: str) -> Path:
    """``<ckpt stem>.eval-<task>.json`` beside a checkpoint, ``eval-<task>.json`` inside an exported directory."""
    if source.is_dir():
        return source / f"eval-{task}.json"
    return source.with_name(f"{source.stem}.eval-{task}.json")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to a temporary sibling, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0o022)  # read it by setting it, then put it back
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes the file private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_table(metrics: dict[str, Any]) -> str:
    lines = [f"{'metric':<16} value"]
    for name, value in metrics.items():
        if isinstance(value, float):
            shown = f"{value:.6g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.4f}"
        else:
            shown = "n/a" if value is None else str(value)
        lines.append(f"{name:<16} {shown}")
    return "\n".join(lines)


def evaluate(source: str | Path, task: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``task`` on ``source``; returns the JSON payload (also written to ``args.output`` or the default place)."""
    source = Path(source)
    args.source = source
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if getattr(args, "max_tokens", None) is not None and args.max_tokens < 2:
        raise ConfigError("--max-tokens must be >= 2")
    read, run = TASK_STEPS[task]
    data = read(args)  # a bad file fails before the model is loaded
    model = load_for(source, task).to(args.device)
    settings, metrics = run(model, args, data)
    payload = {
        "task": task,
        "source": str(source.resolve()),
        "data": str(args.data.resolve()),
        "network": model.network,
        "objective": model.objective_spec.name,
        "settings": settings,
        "metrics": metrics,
    }
    out = Path(args.output) if args.output else default_output(source, task)
    try:
        write_json_atomic(out, payload)
    except OSError as e:
        raise ConfigError(f"cannot write {out} ({e.strerror or e}): pass --output a writable path") from None
    payload["output"] = str(out)
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lm_lab.evaluate",
        description="Evaluate a checkpoint or an exported directory: perplexity, multiple-choice, mlm, classify.",
    )
    p.add_argument("source", help="a .ckpt file or a directory written by lm_lab.export")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, required=True, help="the file to evaluate on")
    common.add_argument("--batch-size", type=int, default=8)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--output", help="the JSON file to write (default: beside the checkpoint)")
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    ppl = sub.add_parser("perplexity", parents=[common], help="sliding-window perplexity of a decoder")
    ppl.add_argument("--text-column", default="text", help="the text of a .jsonl row")
    ppl.add_argument("--window", type=int, default=None, help="tokens a window reads (default: max_seq_len)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --window)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first M tokens of the file")
    sub.add_parser(
        "multiple-choice",
        parents=[common],
        help='lm-eval-style multiple choice: .jsonl rows {"context", "choices", "label"}',
    )
    mlm = sub.add_parser("mlm", parents=[common], help="masked-LM (and next-sentence) accuracy of an encoder")
    mlm.add_argument("--text-column", default="text")
    mlm.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's data.block_size")
    mlm.add_argument(
        "--sample-by",
        choices=("document", "paragraph", "line"),
        default=None,
        help="what a document is (default: paragraph for .txt, a row for .jsonl)",
    )
    mlm.add_argument("--cache-dir", default=os.environ.get("LM_LAB_CACHE", ".cache/lm_lab"))
    cls = sub.add_parser("classify", parents=[common], help="accuracy/F1/MCC (or correlations) of a classifier")
    cls.add_argument("--text-column", default="text")
    cls.add_argument("--text-pair-column", default=None)
    cls.add_argument("--label-column", default="label")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lm_lab.errors import USER_ERRORS

    try:
        payload = evaluate(args.source, args.task, args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.task} of {args.source} on {args.data}")
    print(format_table(payload["metrics"]))
    print(f"written: {payload['output']}")
    return 0


def cli() -> None:
    """The ``lm-lab-*`` console script and ``python -m``: ``main()`` as the whole process."""
    run_command(main)


if __name__ == "__main__":
    cli()
