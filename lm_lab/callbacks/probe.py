"""Downstream quality while pretraining runs: after every N validations, a linear probe on the
network's features scores a small labelled set, logged as ``probe/<name>_acc`` next to the loss.

The probe reads the plain network (the registry's backbone inside the task: ``net.bert``,
``net.transformer``, ``net.model``), averages its last hidden states over each text's real tokens,
and fits a logistic regression (standardized features, L2, L-BFGS) on the train rows; the score is
its accuracy on the test rows. The weights are untouched and the run's random state is restored
afterwards, so a probed run trains exactly as an unprobed one.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger("lm_lab")


class DownstreamProbe(L.Callback):
    def __init__(
        self,
        train_file: str,
        test_file: str,
        name: str = "probe",
        text_column: str = "text",
        label_column: str = "label",
        every_n_validations: int = 1,
        max_rows: int = 1000,
        max_length: int = 128,
        l2: float = 1e-3,
    ) -> None:
        if every_n_validations < 1:
            raise ValueError(f"callbacks.probe.every_n_validations={every_n_validations} must be >= 1")
        self.files = {"train": train_file, "test": test_file}
        self.name, self.text_column, self.label_column = name, text_column, label_column
        self.every, self.max_rows, self.max_length, self.l2 = every_n_validations, max_rows, max_length, l2
        self._rows: dict[str, tuple[list[str], torch.Tensor]] | None = None
        self._validations = 0
        self.history: list[tuple[int, float]] = []

    def _load(self) -> dict[str, tuple[list[str], torch.Tensor]]:
        if self._rows is None:
            import datasets

            from lm_lab.data.sources import DataError

            out = {}
            for split, path in self.files.items():
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
                for col in (self.text_column, self.label_column):
                    if col not in ds.column_names:
                        raise DataError(f"callbacks.probe: column {col!r} not in {path} (columns: {ds.column_names})")
                ds = ds.select(range(min(len(ds), self.max_rows)))
                labels = [str(v) for v in ds[self.label_column]]
                out[split] = (ds[self.text_column], labels)
            names = sorted(set(out["train"][1]))
            index = {n: i for i, n in enumerate(names)}
            self._rows = {s: (t, torch.tensor([index.get(v, -1) for v in y])) for s, (t, y) in out.items()}
        return self._rows

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every:
            return
        try:
            acc = self.score(pl_module)
        except Exception as e:  # a probe must never stop pretraining
            log.warning("probe %s failed at step %d: %s", self.name, trainer.global_step, e)
            return
        self.history.append((trainer.global_step, acc))
        pl_module.log(f"probe/{self.name}_acc", acc, sync_dist=False)
        log.info("probe %s at step %d: accuracy %.4f", self.name, trainer.global_step, acc)

    @torch.no_grad()
    def features(self, pl_module: Any, texts: list[str]) -> torch.Tensor:
        """Mean of the backbone's last hidden states over each text's tokens: (N, C)."""
        from lm_lab.data.tokenizer import is_bert_style

        backbone = getattr(pl_module.net, pl_module.network_spec.hf_prefix)
        tok = pl_module.tokenizer_backend
        encoder = pl_module.network_spec.kind == "encoder"
        limit = min(self.max_length, pl_module.model_cfg.max_seq_len)
        out = []
        for start in range(0, len(texts), 32):
            chunk = texts[start : start + 32]
            enc = tok.encode_batch(chunk, add_special_tokens=is_bert_style(tok))
            ids = [(e.ids or [0])[:limit] for e in enc]
            width = max(len(i) for i in ids)
            x = torch.zeros((len(ids), width), dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, i in enumerate(ids):
                x[r, : len(i)] = torch.tensor(i)
                mask[r, : len(i)] = 1
            x, mask = x.to(pl_module.device), mask.to(pl_module.device)
            if encoder:
                h = backbone(x, token_type_ids=torch.zeros_like(x), attention_mask=mask, pooled=False).hidden_states
            else:
                h = backbone(x)
            m = mask.unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
        return torch.cat(out)

    def score(self, pl_module: Any) -> float:
        rows = self._load()
        was_training = pl_module.training
        cpu_state, cuda_state = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        )
        pl_module.eval()
        try:
            train_x = self.features(pl_module, rows["train"][0])
            test_x = self.features(pl_module, rows["test"][0])
        finally:
            pl_module.train(was_training)
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
        train_y, test_y = rows["train"][1], rows["test"][1]
        return fit_and_score(train_x, train_y, test_x, test_y, self.l2)


def fit_and_score(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, l2: float
) -> float:
    """Logistic regression (standardized features, L2 penalty ``l2``, L-BFGS) fit on train; test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    k = int(train_y.max()) + 1
    w = torch.zeros(a.size(1), k, requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, train_y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (b @ w + bias).argmax(1)
    return float((pred == test_y).float().mean())
