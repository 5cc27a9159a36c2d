"""What the objectives with a task head on labelled data share (classification, token
classification): the labelled splits and their loaders, and the head on the network's plain
forward with its ``transformers`` export."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from lm_lab.data.datamodule import TextDataModule
from lm_lab.data.labelled import LabelledSplits, load_labelled
from lm_lab.data.sources import DataError
from lm_lab.data.tokenizer import eot_id
from lm_lab.objectives.base import LMTask

log = logging.getLogger("lm_lab")


@dataclasses.dataclass
class CorpusKey:
    """What the tokenizer cache and the resume checks read of a corpus: its fingerprint."""

    fingerprint: str


class LabelledDataModule(TextDataModule):
    """Train / validation / test splits of labelled rows (``lm_lab.data.labelled``), encoded by the
    subclass into ``train_set`` / ``val_set`` / ``test_set`` (lists of row dicts) and batched by its
    ``collate``; the loaders keep the exact-resume machinery of ``TextDataModule``."""

    default_tokenizer = "bpe"
    follows_network = True  # data.tokenizer=auto: WordPiece for an encoder trained from scratch

    def __init__(self, cfg: Any, objective: Any, *, seed: int = 0) -> None:
        super().__init__(cfg, objective, seed=seed)
        self._splits: LabelledSplits | None = None
        self.train_set: list[dict[str, Any]] | None = None
        self.val_set: list[dict[str, Any]] | None = None
        self.test_set: list[dict[str, Any]] | None = None

    @property
    def columns(self) -> dict[str, str]:
        """{column: kind} the objective reads (kinds of ``lm_lab.data.labelled``)."""
        raise NotImplementedError

    @property
    def splits(self) -> LabelledSplits:
        if self._splits is None:
            self._splits = load_labelled(self.cfg, self.columns, seed=self.seed)
            log.info("labelled data: %s", self._splits.description)
        return self._splits

    def corpus_fingerprint(self) -> str | None:
        return self._splits.fingerprint if self._splits is not None else None

    @property
    def corpus(self) -> Any:  # the tokenizer cache keys on the corpus fingerprint
        return CorpusKey(self.splits.fingerprint)

    def _named_splits(self) -> list[tuple[str, Any]]:
        s = self.splits
        named = (("training", s.train), ("validation", s.validation), ("test", s.test))
        return [(n, d) for n, d in named if d is not None]

    def has_test(self) -> bool:
        return self.splits.test is not None

    def prepare_data(self) -> None:
        self.splits  # noqa: B018  (loads and checks the files once, before the Trainer's setup)

    def check_batch(self) -> None:
        assert self.train_set is not None
        if len(self.train_set) < self.global_batch_size():
            raise DataError(
                f"the training split has {len(self.train_set)} rows, fewer than one batch of "
                f"{self.global_batch_size()} (data.batch_size): use a smaller data.batch_size"
            )

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.token_to_id("[PAD]")
        if pad is None:
            pad = eot_id(tok)
        return 0 if pad is None else pad

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        sampler = self._make_train_sampler(len(self.train_set))
        return self._loader(self.train_set, sampler=sampler, collate_fn=self.collate, step_group=self.accumulate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, seed=1234, collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataError("there is no test split: name one in data.data_files (test: file)")
        return self._eval_loader(self.test_set, seed=1234, collate_fn=self.collate)


class HeadTask(LMTask):
    """A task head on the registry's plain backbone (``lm_lab.models.heads``), in the layout of the
    network's ``transformers`` class for ``head_kind``; ``objective.freeze_backbone`` trains the head only."""

    head_kind = ""
    ppl_source = ""  # no perplexity

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.objective_cfg.freeze_backbone:  # a linear probe: only the head learns
            for p in self.net.backbone.parameters():
                p.requires_grad_(False)

    @property
    def layout(self) -> Any:
        return self.network_spec.hf_module().HF_HEADS[self.head_kind]

    def head_parameter_names(self) -> list[str]:
        return [f"{self.layout.name}.{n}" for n, _ in self.net.head.named_parameters()]

    def hf_labels(self, config: dict[str, Any]) -> None:
        """Add the label settings to an export's config.json (default: ``id2label``/``label2id``)."""
        labels = self.objective_cfg.labels
        config.update(
            id2label={i: name for i, name in enumerate(labels)}, label2id={name: i for i, name in enumerate(labels)}
        )

    def hf_files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        mapping = self.network_spec.hf_module()
        config = mapping.hf_config_dict(self.model_cfg)
        config["architectures"] = [self.layout.hf_class]
        self.hf_labels(config)
        return config, mapping.to_hf_weights(self.net.state_dict(), self.model_cfg)

    @classmethod
    def settings_from_hf(cls, hf_config: dict[str, Any]) -> Any:
        id2label = hf_config.get("id2label") or {}
        return cls.settings_class(labels=[id2label[k] for k in sorted(id2label, key=int)])

    def load_hf_weights(self, weights: dict[str, Any]) -> None:
        mapping = self.network_spec.hf_module()
        self.net.load_state_dict(mapping.from_hf_weights(weights, self.model_cfg), strict=True)
