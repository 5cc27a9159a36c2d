"""Masked language modelling + a sentence-pair objective (BERT): MLM CE + NSP (or SOP) CE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lm_lab.models.bert.heads import BertOutput
from lm_lab.objectives.base import LMTask, StepOutput
from lm_lab.objectives.masked_lm.masking import IGNORE_INDEX
from lm_lab.objectives.masked_lm.settings import MaskedLMConfig
from lm_lab.schema import ConfigError


class MaskedLMTask(LMTask):
    """BERT pretraining. Batches come from ``MLMCollator``: ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels`` (-100 except at masked positions) and, under nsp/sop,
    ``next_sentence_label``. The sentence-pair loss is logged as ``nsp_loss``/``nsp_acc`` for
    both nsp and sop (same head, same labels: 1 = random/swapped B).

    Trains the registry's ``lm`` module of an encoder: the plain network plus its pretraining heads
    (``BertForPreTraining``: ``forward(ids, types, mask, mlm_positions=, pair_logits=)``).
    """

    settings_class = MaskedLMConfig
    ppl_source = "mlm_loss"  # val/ppl = exp(masked-token cross-entropy)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pair_objective = self.objective_cfg.pair_objective
        tokenizer = self.tokenizer_backend
        pad = tokenizer.token_to_id("[PAD]") if tokenizer is not None else None
        if pad is not None and pad != self.model_cfg.pad_token_id:
            raise ConfigError(
                f"the tokenizer's [PAD] id is {pad} but model.pad_token_id={self.model_cfg.pad_token_id}: "
                f"set model.pad_token_id={pad}"
            )
        if self.pair_objective == "none":
            # No sentence-pair loss: the pooler and NSP head are never called and not trained (kept
            # only so that the weights keep BertForPreTraining's layout). DDP refuses parameters
            # that feed no loss, so they must not require gradients.
            for p in (*self.net.bert.pooler.parameters(), *self.net.cls.seq_relationship.parameters()):
                p.requires_grad_(False)
        # Masked and real tokens trained on, summed on the device (no host read per step); the
        # Throughput callback reads ``flops_per_token`` once per window.
        self._mlm_counts: torch.Tensor | None = None
        self._seq_len = 0

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> BertOutput:
        """Token ids (B, T) -> ``BertOutput``: mlm_logits (B, T, V), nsp_logits (B, 2), hidden_states."""
        return self.net(input_ids, token_type_ids, attention_mask)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> StepOutput:
        labels = batch["labels"]
        positions = labels != IGNORE_INDEX  # (B, T): the ~15% of tokens the MLM head must predict
        nsp_labels = batch.get("next_sentence_label")
        out = self.net(
            batch["input_ids"],
            batch.get("token_type_ids"),
            batch.get("attention_mask"),
            mlm_positions=positions,
            pair_logits=nsp_labels is not None,
        )
        targets = labels[positions]  # (N,), aligned with out.mlm_logits (N, V)
        n_mlm = positions.sum()
        # Sum / max(N, 1) rather than mean: a batch without masked tokens gives 0, not NaN.
        mlm_total = F.cross_entropy(out.mlm_logits.float(), targets, reduction="sum")
        mlm_loss = mlm_total / n_mlm.clamp(min=1)
        metrics = {"mlm_loss": (mlm_loss, n_mlm)}
        # Masked tokens weigh the same across the whole optimizer step (their count varies per
        # micro-batch); sentence pairs already do (every micro-batch holds the same number).
        loss = self.token_mean(mlm_total, n_mlm, batch)
        if nsp_labels is not None:
            scored = nsp_labels != IGNORE_INDEX  # evaluation padding slots have no label
            n_nsp = scored.sum()
            nsp_loss = F.cross_entropy(
                out.nsp_logits.float(), nsp_labels, ignore_index=IGNORE_INDEX, reduction="sum"
            ) / n_nsp.clamp(min=1)
            loss = loss + nsp_loss
            metrics["nsp_loss"] = (nsp_loss, n_nsp)
        if stage == "val":
            hits = (out.mlm_logits.argmax(-1) == targets).sum()
            metrics["mlm_acc"] = (hits / n_mlm.clamp(min=1), n_mlm)
            if nsp_labels is not None:
                nsp_hits = ((out.nsp_logits.argmax(-1) == nsp_labels) & scored).sum()
                metrics["nsp_acc"] = (nsp_hits / n_nsp.clamp(min=1), n_nsp)
        elif stage == "train":
            mask = batch.get("attention_mask")
            real = mask.sum() if mask is not None else torch.tensor(labels.numel(), device=labels.device)
            counts = torch.stack([n_mlm.long(), real.long(), torch.tensor(labels.size(0), device=labels.device)])
            self._mlm_counts = counts if self._mlm_counts is None else self._mlm_counts + counts
            self._seq_len = labels.size(1)
        return StepOutput(loss, metrics)

    def combine(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss`` = masked-token mean MLM loss + pair mean NSP loss, each aggregated on its own."""
        loss = means["mlm_loss"] + means["nsp_loss"] if "nsp_loss" in means else means["mlm_loss"]
        return {"loss": loss, **means}

    @property
    def flops_per_token(self) -> float | None:
        """Training FLOPs per real token over the batches trained so far (None before the first);
        reads the device counters (one host sync: the Throughput callback calls it once per window)."""
        if self._mlm_counts is None:
            return None
        masked, real, sequences = self._mlm_counts.tolist()
        return self.estimate_flops_per_token(self._seq_len, masked / max(real, 1), sequences / max(real, 1))

    def estimate_flops_per_token(self, seq_len: int, mlm_fraction: float, sequence_fraction: float = 0.0) -> float:
        """Training FLOPs per real token, as computed: 6 x (multiply-adds) = forward 2 + backward 4.

        PaLM's 6N + 12·L·H·Q·T with N the encoder's weight matrices (q, k, v, o and the two FFN
        matrices per layer) and T = ``seq_len``; plus the MLM head (transform d x d and the tied
        decoder d x V) on the ``mlm_fraction`` of tokens it runs on, and, with a sentence-pair
        objective, the pooler (d x d) and NSP classifier (d x 2) once per sequence
        (``sequence_fraction`` = sequences per real token). Biases, LayerNorms and embedding lookups are left out (PaLM's count).
        """
        c = self.model_cfg
        d = c.n_embd
        per_layer = 4 * d * d + 2 * d * c.d_ff + 2 * seq_len * d  # q k v o, FFN, QK^T and AV
        head = (d * d + d * c.vocab_size) * mlm_fraction  # transform + tied decoder
        pair = (d * d + 2 * d) * sequence_fraction if self.pair_objective != "none" else 0.0
        return 6.0 * (c.n_layer * per_layer + head + pair)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-``top_k`` (token, probability) for every ``[MASK]`` in ``text``, in order."""
        tok = self.tokenizer_backend
        if tok is None:
            raise ValueError("this model has no tokenizer: load it with lm_lab.training.checkpoints.load_checkpoint")
        mask_id = tok.token_to_id("[MASK]")
        enc = tok.encode(text)  # the post-processor adds [CLS] ... [SEP]
        ids = torch.tensor([enc.ids], device=self.device)
        if ids.size(1) > self.model_cfg.max_seq_len:
            raise ValueError(
                f"the text is {ids.size(1)} tokens long; the model reads at most "
                f"{self.model_cfg.max_seq_len}: shorten it"
            )
        positions = ids == (mask_id if mask_id is not None else -1)
        if not bool(positions.any()):
            raise ValueError(
                "the text has no [MASK] token: write [MASK] where a word should be predicted, "
                "e.g. 'The [MASK] sat on the mat.'"
            )
        was_training = self.training
        self.eval()
        types = torch.tensor([enc.type_ids], device=self.device)
        logits = self.net(ids, types, mlm_positions=positions).mlm_logits  # (n_masks, V)
        if was_training:
            self.train()
        probs, best = logits.float().softmax(-1).topk(min(top_k, logits.size(-1)), dim=-1)
        return [
            [(tok.id_to_token(int(i)), float(p)) for p, i in zip(pr, bi, strict=True)]
            for pr, bi in zip(probs, best, strict=True)
        ]
