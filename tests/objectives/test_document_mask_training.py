"""``model.document_mask`` through train(cfg): the objective numbers the documents of each packed block
from the tokenizer's end-of-text token (the separator the packing wrote) and the network keeps
attention inside them; the setting is part of the model, so a resume that changes it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_lab.models.layers import document_ids
from tests.conftest import SHAKESPEARE, TINY
from train import train

# Tiny Shakespeare by paragraph: each speech is a document, so a 32-token block holds several.
DOCS = [f"data.data_files={SHAKESPEARE}", "data.path=text", "data.tokenizer=char", "data.sample_by=paragraph"]
MASKED = ["model.document_mask=true", "model.document_positions=true"]


@pytest.mark.slow
def test_document_masked_run_and_resume_check(compose_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics, objects = train(compose_cfg(*TINY, *DOCS, *MASKED, "trainer.max_steps=4", run_dir=run_dir))
    task, dm = objects["task"], objects["datamodule"]
    assert metrics["val/loss"] < 4.3  # below uniform over the ~65 characters after 4 steps

    # The task's logits for a packed validation block are those of each document alone.
    ids = next(iter(dm.val_dataloader()))["input_ids"][:1]
    task.eval()
    with torch.no_grad():
        packed = task(ids)[0]
        doc = document_ids(ids, task.eos_id)[0]
        assert int(doc.max()) >= 2, "the block should hold several documents"
        for d in range(int(doc.max()) + 1):
            span = (doc == d).nonzero().flatten()
            s, e = int(span[0]), int(span[-1]) + 1
            torch.testing.assert_close(packed[s:e], task.net(ids[:, s:e])[0], atol=1e-5, rtol=0)

    # Changing the attention pattern on resume changes the model: refused in one line.
    with pytest.raises(Exception, match="document_mask") as err:
        train(compose_cfg(*TINY, *DOCS, "ckpt_path=last", run_dir=run_dir))
    assert "\n" not in str(err.value)
