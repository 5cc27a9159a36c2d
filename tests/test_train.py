"""train(cfg) end to end through Hydra's compose API, then using the trained model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lm_lab
from tests.conftest import REPO, SHAKESPEARE, TINY, compose_config
from train import train

SHAKES = [f"data.data_files={SHAKESPEARE}", "data.path=text", "data.tokenizer=char"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> dict:
    """One tiny run on Tiny Shakespeare, shared by the tests that use its outputs."""
    from hydra.core.global_hydra import GlobalHydra

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(TINY + SHAKES, run_dir, shared_cache)
    metrics, objects = train(cfg)
    GlobalHydra.instance().clear()
    return {"metrics": metrics, "run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt", **objects}


def test_train_writes_metrics_checkpoints_and_tokenizer(trained: dict) -> None:
    run_dir, metrics = trained["run_dir"], trained["metrics"]
    assert {"val/loss", "val/ppl", "train/loss"} <= set(metrics)
    assert metrics["val/loss"] < 4.3  # below uniform over 67 chars (ln 67 = 4.2) after 6 steps
    assert trained["ckpt"].is_file()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    keys = set().union(*(r.keys() for r in rows))
    assert {"train/loss", "val/loss", "val/ppl", "lr", "tokens_seen"} <= keys
    tokens = [float(r["tokens_seen"]) for r in rows if r.get("tokens_seen")]
    assert tokens[-1] == 6 * 4 * 32  # steps x batch x block
    tok = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    assert tok("ROMEO:")["input_ids"] == trained["task"].tokenizer("ROMEO:")["input_ids"]


def test_checkpoint_loads_weights_only_and_as_module(trained: dict) -> None:
    ckpt = torch.load(trained["ckpt"], weights_only=True)  # plain containers only
    assert ckpt["hyper_parameters"]["model"]["n_layer"] == 2
    task = lm_lab.load_checkpoint(str(trained["ckpt"]))
    assert not task.training and task.tokenizer is not None
    ids = torch.tensor([task.tokenizer("First Citizen")["input_ids"]])
    logits = task(ids)
    assert logits.shape == (1, ids.size(1), task.model_cfg.vocab_size)
    trained_task = trained["task"].eval()
    assert torch.allclose(trained_task(ids), logits, atol=1e-6)


def test_export_matches_transformers_and_generate_cli(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "lm_lab.export", str(trained["ckpt"]), str(out)], check=True, cwd=REPO)
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder (755 with umask 022), not 700
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    task = lm_lab.load_checkpoint(str(trained["ckpt"]))
    text = "KING RICHARD III:\nNow is the winter"
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == task.tokenizer(text)["input_ids"]
    with torch.no_grad():
        assert (hf(ids).logits - task(ids)).abs().max().item() <= 1e-4
    args = ["--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "12"]
    a = subprocess.run(
        [sys.executable, "-m", "lm_lab.generate", str(trained["ckpt"]), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    b = subprocess.run(
        [sys.executable, "-m", "lm_lab.generate", str(out), *args], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert a == b and a.startswith("ROMEO:") and len(a) > len("ROMEO:")
    # HF's own greedy decoding agrees with ours token for token.
    prompt = hf_tok("ROMEO:", return_tensors="pt")["input_ids"]
    ours = task.net.generate(prompt, 12, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_resume_continues_from_checkpoint(trained: dict, compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(*TINY, *SHAKES, "trainer.max_steps=9", f"ckpt_path={trained['ckpt']}")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 9
    assert int(objects["task"].tokens_seen) == 9 * 4 * 32


def test_every_preset_and_experiment_composes_and_instantiates(compose_cfg) -> None:
    import hydra

    from lm_lab.training.precision import resolve_precision

    conf = REPO / "conf"
    combos = [[f"model={p.stem}"] for p in sorted((conf / "model").glob("*.yaml"))]
    combos += [
        [f"data={p.stem}", "data.data_files=x.txt"] if p.stem in ("files", "shakespeare_char") else [f"data={p.stem}"]
        for p in sorted((conf / "data").glob("*.yaml"))
    ]
    combos += [[f"experiment={p.stem}", "data.data_files=x.txt"] for p in sorted((conf / "experiment").glob("*.yaml"))]
    combos += [[f"debug={p.stem}"] for p in sorted((conf / "debug").glob("*.yaml"))]
    combos += [[f"trainer={p.stem}"] for p in sorted((conf / "trainer").glob("*.yaml"))]
    combos += [[f"logger={p.stem}"] for p in sorted((conf / "logger").glob("*.yaml"))]
    combos += [["scheduler=linear"]]
    assert len(combos) > 30
    for overrides in combos:
        cfg = compose_cfg(*overrides)
        for section in ("model", "data", "optimizer", "scheduler"):
            obj = hydra.utils.instantiate(cfg[section], _convert_="all")
            assert type(obj).__name__.endswith("Config"), (overrides, section)
        assert cfg.data.block_size <= cfg.model.max_seq_len or overrides[0].startswith(("model=", "data="))
        for group in ("callbacks", "logger"):
            for node in (cfg.get(group) or {}).values():
                if node is not None and "wandb" not in node._target_:
                    hydra.utils.instantiate(node, _convert_="all")
        if cfg.trainer.accelerator in ("cpu", "auto") and cfg.trainer.get("strategy") == "auto":
            # As train() builds it: lm_lab's precision=auto is resolved first (Lightning has no "auto").
            precision = resolve_precision(cfg.trainer.get("precision"), on_gpu=False)
            hydra.utils.instantiate(cfg.trainer, _convert_="all", precision=precision)


def test_streaming_corpus_trains_end_to_end(compose_cfg, tmp_path: Path) -> None:
    import json

    docs = SHAKESPEARE.read_text().split("\n\n")[:300]
    f = tmp_path / "stream.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    cfg = compose_cfg(
        *TINY,
        "data=files",
        f"data.data_files={f}",
        "data.streaming=true",
        "data.streaming_val_docs=30",
        "data.tokenizer=char",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 6 and metrics["val/loss"] < 4.5


def test_final_metrics_describe_the_final_weights(compose_cfg, tmp_path: Path) -> None:
    """max_steps=7, validation every 5: the final weights (step 7) are validated too, and what is
    reported and returned to sweepers is that validation, equal to an independent evaluation of
    last.ckpt. Steps are counted one way everywhere (optimizer steps completed): metrics.csv,
    checkpoint names (with the validation loss), best.ckpt beside last.ckpt."""
    import lightning as L

    from lm_lab.training.checkpoints import find_checkpoints, resolve_ckpt_path

    run_dir = tmp_path / "run"
    cfg = compose_cfg(*TINY, *SHAKES, "trainer.max_steps=7", "trainer.val_check_interval=5", run_dir=run_dir)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 7
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    fresh = lm_lab.load_checkpoint(str(ckpt))
    evaluator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2)
    (independent,) = evaluator.validate(fresh, datamodule=objects["datamodule"], verbose=False)
    assert abs(metrics["val/loss"] - independent["val/loss"]) < 1e-5

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    val = {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
    assert sorted(val) == [5, 7] and val[7] == pytest.approx(metrics["val/loss"], abs=1e-6)
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == list(range(1, 8))

    best_step = min(val, key=val.get)
    best = run_dir / "checkpoints" / f"step{best_step:06d}-val{val[best_step]:.3f}.ckpt"
    assert best.is_file() and (run_dir / "checkpoints" / "best.ckpt").resolve() == best.resolve()
    assert torch.load(best, weights_only=True)["global_step"] == best_step
    assert find_checkpoints(run_dir)[0].name == "last.ckpt" and resolve_ckpt_path("last", run_dir) == ckpt
    assert all(p.name != "best.ckpt" for p in find_checkpoints(run_dir))


def test_final_val_batches_validates_the_final_weights_on_the_whole_split(
    compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """final_val_batches=1.0: the validations during training score trainer.limit_val_batches (2
    batches, the same blocks each time), and so does the one at the last step, which the best
    checkpoint is chosen with (it once scored the whole split there, and compared that with the
    2-batch values). Then the final weights are scored on the whole validation split, logged after it
    at the last step, reported and returned (nanoGPT's CPU recipe reported one fixed 240-block
    sample's loss, 0.02 above the split's). Checked against independent evaluations of last.ckpt on
    the whole split and on 2 batches."""
    import lightning as L

    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        *TINY, *SHAKES, "trainer.max_steps=6", "trainer.val_check_interval=3", "final_val_batches=1.0", run_dir=run_dir
    )
    with caplog.at_level("INFO", logger="lm_lab"):
        metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 6
    # The validation after fit does not check the token cache's checksums again (a re-read of the corpus).
    assert sum("tokenized corpus" in r.getMessage() for r in caplog.records) == 1
    dm = objects["datamodule"]
    fresh = lm_lab.load_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"))

    def evaluate(limit: int | float) -> float:
        ev = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=limit)
        (out,) = ev.validate(fresh, datamodule=dm, verbose=False)
        return out["val/loss"]

    whole, two = evaluate(1.0), evaluate(2)
    assert abs(whole - two) > 1e-4  # the two estimators differ here, so the test can tell them apart
    assert metrics["val/loss"] == pytest.approx(whole, abs=1e-5)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    assert [s for s, _ in val] == [3, 6, 6]  # the curve's points, then the whole split at the last step
    assert val[1][1] == pytest.approx(two, abs=1e-5) and val[2][1] == pytest.approx(whole, abs=1e-5)
    scores = {Path(p).name: float(v) for p, v in objects["trainer"].checkpoint_callback.best_k_models.items()}
    (at_6,) = [v for name, v in scores.items() if name.startswith("step000006")]
    assert at_6 == pytest.approx(two, abs=1e-5)  # the best is chosen among 2-batch values only


def test_short_run_warns_that_warmup_covers_it(caplog: pytest.LogCaptureFixture) -> None:
    from lm_lab.training.optim import SchedulerConfig
    from train import _check_warmup

    with caplog.at_level("WARNING", logger="lm_lab"):
        _check_warmup(SchedulerConfig(warmup_steps=60), 20)
        _check_warmup(SchedulerConfig(warmup_steps=60), 600)
    (record,) = caplog.records
    assert "scheduler.warmup_steps=60 with trainer.max_steps=20" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_logger_presets_write_metrics_csv_and_debug_fdr_has_none(compose_cfg) -> None:
    """The README's claims: metrics.csv with every logger choice but `none`; debug=fdr logs nowhere."""
    for choice in ("default", "wandb", "tensorboard", "csv"):
        assert "csv" in compose_cfg(f"logger={choice}").logger, choice
    assert not compose_cfg("debug=fdr").logger


def test_train_metrics_reach_the_loggers_every_log_every_n_steps_with_the_per_step_values(
    compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The task hands its train metrics to Lightning only on the steps Lightning writes (a cost cut):
    the CSV rows at steps 3 and 6 hold the same values as a run that logs every step, and the
    progress lines (every 2 steps here) show each step's own loss, not the last logged one."""
    from hydra.core.global_hydra import GlobalHydra

    common = [*TINY, *SHAKES, "trainer.max_steps=6", "trainer.val_check_interval=6", "sample_tokens=0"]
    every = compose_cfg(*common, "trainer.log_every_n_steps=1", run_dir=tmp_path / "every")
    train(every)
    GlobalHydra.instance().clear()
    sparse = compose_cfg(
        *common, "trainer.log_every_n_steps=3", "callbacks.progress.every_n_steps=2", run_dir=tmp_path / "sparse"
    )
    with caplog.at_level("INFO", logger="lm_lab"):
        train(sparse)

    def rows(run: Path) -> dict[int, dict[str, str]]:
        with open(run / "metrics.csv") as fh:
            return {int(r["step"]): r for r in csv.DictReader(fh) if r.get("train/loss")}

    dense, thin = rows(tmp_path / "every"), rows(tmp_path / "sparse")
    assert sorted(dense) == [1, 2, 3, 4, 5, 6] and sorted(thin) == [3, 6]
    for step in (3, 6):
        for key in ("train/loss", "lr", "tokens_seen"):
            assert float(thin[step][key]) == pytest.approx(float(dense[step][key]), rel=1e-6), (step, key)
    shown = {
        int(m.split("step ")[1].split("/")[0]): m for m in caplog.messages if m.startswith("step ") and "loss" in m
    }
    for step in (2, 4):  # steps whose metrics were never handed to Lightning
        loss = float(shown[step].split("loss ")[1].split(" ")[0])
        assert loss == pytest.approx(float(dense[step]["train/loss"]), abs=1e-4), shown[step]


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "true"])
def test_a_bad_final_val_batches_is_one_line_before_training(value: str, compose_cfg, tmp_path: Path) -> None:
    from lm_lab.schema import ConfigError

    run_dir = tmp_path / "run"
    cfg = compose_cfg(*TINY, *SHAKES, "trainer.max_steps=2", f"final_val_batches={value}", run_dir=run_dir)
    with pytest.raises(ConfigError, match=r"final_val_batches=.* must be a number of validation batches"):
        train(cfg)
    assert not (run_dir / "checkpoints").exists()
