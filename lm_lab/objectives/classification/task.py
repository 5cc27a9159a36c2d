"""Sequence classification and regression: a head on any network's plain forward.

Encoders read the pooled [CLS] output, decoders the last real token (``lm_lab.models.heads``). Cross
entropy over labels (or mean squared error for regression); validation and test report accuracy,
F1 (binary: of the second label; several labels: macro), Matthews correlation, or Pearson and
Spearman for regression, through torchmetrics. Exports as ``transformers``' ``*ForSequenceClassification``
with ``id2label`` / ``label2id`` from the label set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm_lab.models.heads import SequenceClassifier
from lm_lab.objectives.base import StepOutput
from lm_lab.objectives.classification.settings import ClassificationConfig
from lm_lab.objectives.supervised import HeadTask


class ClassificationTask(HeadTask):
    settings_class = ClassificationConfig
    head_kind = "sequence_classification"

    def build_net(self) -> nn.Module:
        spec, cfg = self.network_spec, self.model_cfg
        encoder = spec.kind == "encoder"
        backbone = spec.build_backbone(cfg)
        if encoder is False and hasattr(backbone, "pooler"):
            backbone.pooler = None
        return SequenceClassifier(
            backbone,
            spec.hf_prefix,
            self.layout,
            cfg.n_embd,
            self.objective_cfg.num_labels,
            getattr(cfg, "dropout", 0.0),
            encoder=encoder,
        )

    @property
    def regression(self) -> bool:
        return self.objective_cfg.problem_type == "regression"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, num_labels) (regression: (B, 1))."""
        return self.net(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> StepOutput:
        logits = self.net(
            batch["input_ids"], attention_mask=batch.get("attention_mask"), token_type_ids=batch.get("token_type_ids")
        )
        labels = batch["labels"]
        scored = labels != -100  # evaluation padding slots carry -100
        n = scored.sum()
        if self.regression:
            pred = logits.squeeze(-1).float()
            total = F.mse_loss(pred[scored], labels[scored].float(), reduction="sum")
            predictions = (pred[scored], labels[scored].float())
        else:
            total = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            predictions = (logits[scored].argmax(-1), labels[scored])  # class indices: every metric reads them
        loss = self.token_mean(total, n, batch)
        metrics = {"loss": (total / n.clamp(min=1), n)}
        return StepOutput(loss, metrics, predictions if stage != "train" else None)

    def eval_metrics(self) -> dict[str, Any]:
        import torchmetrics

        if self.regression:
            return {"pearson": torchmetrics.PearsonCorrCoef(), "spearman": torchmetrics.SpearmanCorrCoef()}
        k = self.objective_cfg.num_labels
        if k == 2:
            return {
                "acc": torchmetrics.classification.MulticlassAccuracy(2, average="micro"),
                "f1": torchmetrics.classification.BinaryF1Score(),
                "mcc": torchmetrics.classification.MulticlassMatthewsCorrCoef(2),
            }
        return {
            "acc": torchmetrics.classification.MulticlassAccuracy(k, average="micro"),
            "f1": torchmetrics.classification.MulticlassF1Score(k, average="macro"),
            "mcc": torchmetrics.classification.MulticlassMatthewsCorrCoef(k),
        }

    @torch.no_grad()
    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[Any]:
        """Labels (or numbers, for regression) for ``texts`` with the run's tokenizer."""
        from lm_lab.data.tokenizer import eot_id, is_bert_style

        tok = self.tokenizer_backend
        was_training = self.training
        self.eval()
        out: list[Any] = []
        for i, text in enumerate(texts):
            pair = pairs[i] if pairs is not None else None
            if is_bert_style(tok):
                enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
                ids, types = enc.ids, enc.type_ids
            else:
                ids = tok.encode(text, add_special_tokens=False).ids
                if pair is not None:
                    ids = ids + [eot_id(tok)] + tok.encode(pair, add_special_tokens=False).ids
                types = None
            ids = ids[: self.model_cfg.max_seq_len]
            x = torch.tensor([ids], device=self.device)
            t = torch.tensor([types[: len(ids)]], device=self.device) if types is not None else None
            logits = self.net(x, token_type_ids=t)[0]
            out.append(float(logits[0]) if self.regression else self.objective_cfg.labels[int(logits.argmax())])
        if was_training:
            self.train()
        return out

    # ------------------------------------------------------------------ Hugging Face
    def hf_labels(self, config: dict[str, Any]) -> None:
        if self.regression:
            config.update(num_labels=1, problem_type="regression")
        else:
            super().hf_labels(config)
            config["problem_type"] = "single_label_classification"
        if self.network_spec.kind == "decoder":
            from lm_lab.data.tokenizer import eot_id

            pad = eot_id(self.tokenizer_backend) if self.tokenizer_backend is not None else None
            config["pad_token_id"] = 0 if pad is None else pad  # the padding the last-token pooling skips

    @classmethod
    def settings_from_hf(cls, hf_config: dict[str, Any]) -> ClassificationConfig:
        if hf_config.get("problem_type") == "regression" or hf_config.get("num_labels") == 1:
            return ClassificationConfig(problem_type="regression")
        return dataclasses.replace(super().settings_from_hf(hf_config), problem_type="single_label")
