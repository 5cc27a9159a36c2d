"""Token classification: a tag per word (part of speech, BIO entity tags) from a head on every hidden
state of any network's plain forward (``lm_lab.models.heads.TokenClassifier``).

Cross entropy over the labelled sub-tokens (each word's first, or all with
``objective.label_all_subtokens``), every labelled sub-token of an optimizer step weighing the same.
Validation and test report word-level tag accuracy (``acc``, at each word's first sub-token) and, for a
BIO tag set, entity-level ``precision`` / ``recall`` / ``f1`` exactly as ``seqeval`` computes them
(CoNLL's conlleval rules), from the word-level tag sequences of every row of every rank. Exports as
``transformers``' ``*ForTokenClassification`` with ``id2label`` / ``label2id`` from the tag set.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lm_lab.models.heads import TokenClassifier
from lm_lab.objectives.base import StepOutput
from lm_lab.objectives.supervised import HeadTask
from lm_lab.objectives.token_classification.settings import TokenClassificationConfig

Score = Literal["precision", "recall", "f1"]


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 of BIO tag sequences, by ``seqeval`` (its default,
    conlleval-compatible mode: an ``I-X`` after ``O`` or another type starts an entity; 0 where undefined)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "f1": float(f1_score(gold, predicted, zero_division=0)),
    }


class EntityScore(Metric):
    """An entity-level score (``seqeval``) over whole tag sequences, as a torchmetrics ``Metric``.

    ``update(preds, target)`` takes (B, T) tag indices with -100 in ``target`` where nothing is
    scored: each row's scored positions, in order, are one sequence (a row with none, e.g. an
    evaluation padding slot, is skipped). The states are concatenated over ranks when computed (the
    rows' order does not change a micro-averaged score), so every rank reports the global value.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, labels: list[str], score: Score = "f1", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labels, self.score = list(labels), score
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        scored = target != -100
        self.preds.append(preds[scored].long())
        self.target.append(target[scored].long())
        self.lengths.append(scored.sum(-1).long().reshape(-1))

    def sequences(self) -> tuple[list[list[str]], list[list[str]]]:
        """(gold, predicted) tag sequences of every row updated so far (on every rank, once synced)."""
        # Lists of tensors before a sync, one tensor after it (a rank without rows adds an empty float one).
        if isinstance(self.lengths, list) and not self.lengths:
            return [], []
        names = self.labels
        lengths = dim_zero_cat(self.lengths).long().tolist()
        pred, gold = dim_zero_cat(self.preds).long().tolist(), dim_zero_cat(self.target).long().tolist()
        gold_rows, pred_rows, k = [], [], 0
        for n in lengths:
            if n:
                gold_rows.append([names[i] for i in gold[k : k + n]])
                pred_rows.append([names[i] for i in pred[k : k + n]])
            k += n
        return gold_rows, pred_rows

    def compute(self) -> torch.Tensor:
        gold, predicted = self.sequences()
        return torch.tensor(entity_scores(gold, predicted)[self.score] if gold else 0.0)


class TokenClassificationTask(HeadTask):
    settings_class = TokenClassificationConfig
    head_kind = "token_classification"

    def build_net(self) -> nn.Module:
        spec, cfg = self.network_spec, self.model_cfg
        encoder = spec.kind == "encoder"
        # HF's BertForTokenClassification has no pooler: neither does ours (a pretraining checkpoint's
        # pooler weights are then listed as unused by init_from).
        backbone = spec.build_backbone(cfg, add_pooling_layer=False) if encoder else spec.build_backbone(cfg)
        return TokenClassifier(
            backbone,
            spec.hf_prefix,
            self.layout,
            cfg.n_embd,
            self.objective_cfg.num_labels,
            getattr(cfg, "dropout", 0.0),
            encoder=encoder,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, num_labels)."""
        return self.net(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> StepOutput:
        logits = self.net(
            batch["input_ids"], attention_mask=batch.get("attention_mask"), token_type_ids=batch.get("token_type_ids")
        )
        labels = batch["labels"]
        labelled = labels != -100  # first sub-tokens (or all, label_all_subtokens); not specials, padding
        n = labelled.sum()
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        loss = self.token_mean(total, n, batch)
        metrics = {"loss": (total / n.clamp(min=1), n)}
        if stage == "train":
            return StepOutput(loss, metrics)
        # Word-level predictions: each word's first sub-token, in order (-100 elsewhere).
        starts = batch.get("word_starts")
        scored = labelled if starts is None else labelled & starts.bool()
        return StepOutput(loss, metrics, (logits.argmax(-1), torch.where(scored, labels, -100)))

    def eval_metrics(self) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy

        o = self.objective_cfg
        metrics: dict[str, Any] = {"acc": MulticlassAccuracy(o.num_labels, average="micro", ignore_index=-100)}
        if o.bio:
            for score in ("precision", "recall", "f1"):
                metrics[score] = EntityScore(o.labels, score)
        return metrics

    @torch.no_grad()
    def predict(self, words_list: list[list[str]]) -> list[list[str | None]]:
        """A tag per word of each row of ``words_list`` with the run's tokenizer (None for a word
        with no sub-token, or past ``model.max_seq_len`` sub-tokens)."""
        from lm_lab.objectives.token_classification.data import encode_words, first_subtokens

        was_training = self.training
        self.eval()
        labels = self.objective_cfg.labels
        out: list[list[str | None]] = []
        for words, enc in zip(
            words_list, encode_words(self.tokenizer_backend, words_list, self.model_cfg.max_seq_len), strict=True
        ):
            x = torch.tensor([enc.ids], device=self.device)
            t = torch.tensor([enc.type_ids], device=self.device) if enc.type_ids is not None else None
            best = self.net(x, token_type_ids=t)[0].argmax(-1).tolist()
            tags: list[str | None] = [None] * len(words)
            for pos, w in first_subtokens(enc.word_ids):
                tags[w] = labels[best[pos]]
            out.append(tags)
        if was_training:
            self.train()
        return out
