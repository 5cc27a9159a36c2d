"""Networks apart from objectives: every valid (network, objective) pair trains through Hydra, a
network defined in this file (outside lm_lab) trains with causal_lm, impossible pairs fail in one
line, and every network exports to the matching transformers class and back."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from torch import nn

from lm_lab import registry
from lm_lab.data.labelled import labelled_files
from lm_lab.errors import CheckpointError
from lm_lab.export import export
from lm_lab.schema import RESUME_FREE, ConfigBase, ConfigError
from lm_lab.training.checkpoints import check_resume, load_checkpoint, load_export_dir
from tests.conftest import REPO, SHAKESPEARE, SHARED, TINY, compose_config
from train import moved_key_error, train

SHAKES = [f"data.data_files={SHAKESPEARE}", "data.path=text", "data.sample_by=paragraph"]
QUICK = [*TINY, *SHAKES, "trainer.max_steps=3", "trainer.val_check_interval=3", "sample_tokens=0"]


def _labelled(name: str, *extra: str) -> list[str]:
    files = labelled_files(SHARED / name)
    return [
        "data=files",
        "data.path=null",
        "data.data_files={" + ", ".join(f"{k}: {v}" for k, v in files.items()) + "}",
        *extra,
    ]


# The data each objective trains on here (every registered objective must have an entry).
OBJECTIVE_DATA = {
    "causal_lm": [],
    "masked_lm": [],
    "classification": _labelled("sentence_polarity", "data.block_size=48"),
    "token_classification": _labelled(
        "wsj_pos", "data.text_column=tokens", "data.label_column=tags", "data.block_size=64"
    ),
    "sft": _labelled("chatterbot_qa", "data.block_size=64"),
}
# One CPU preset per registered network: <network>_tiny.
PAIRS = [
    (net, obj)
    for net, spec in sorted(registry.NETWORKS.items())
    for obj, ospec in sorted(registry.OBJECTIVES.items())
    if spec.kind in ospec.kinds
]


def run(overrides: list[str], run_dir: Path, cache: Path) -> tuple[dict, dict]:
    cfg = compose_config(overrides, run_dir, cache)
    try:
        return train(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> typing.Callable[[str, str], Path]:
    """trained(network, objective) -> last.ckpt of a 3-step run of <network>_tiny (run once per pair)."""
    done: dict[tuple[str, str], Path] = {}

    def get(net: str, obj: str) -> Path:
        if (net, obj) not in done:
            run_dir = tmp_path_factory.mktemp(f"{net}_{obj}")
            data = OBJECTIVE_DATA[obj]
            metrics, objects = run([*QUICK, *data, f"model={net}_tiny", f"objective={obj}"], run_dir, shared_cache)
            task = objects["task"]
            assert task.network == net and task.objective_spec.name == obj
            assert metrics["val/loss"] > 0 and torch.isfinite(torch.tensor(metrics["val/loss"]))
            done[net, obj] = run_dir / "checkpoints" / "last.ckpt"
        return done[net, obj]

    return get


def test_every_objective_is_trained_here() -> None:
    assert set(registry.OBJECTIVES) <= set(OBJECTIVE_DATA), "add the new objective's data to OBJECTIVE_DATA"


def test_every_network_has_a_tiny_preset_and_a_default_objective() -> None:
    for name, spec in registry.NETWORKS.items():
        if not isinstance(spec.config, str) or not spec.config.startswith("lm_lab."):
            continue  # registered by a test
        preset = OmegaConf.load(REPO / "conf" / "model" / f"{name}_tiny.yaml")
        assert preset["_target_"].rsplit(".", 1)[-1] == spec.config_class().__name__
        assert spec.objective in registry.OBJECTIVES
        assert spec.kind in registry.objective(spec.objective).kinds


@pytest.mark.parametrize("net,obj", PAIRS)
def test_every_valid_pair_trains_and_reloads(net: str, obj: str, trained) -> None:
    ckpt = trained(net, obj)
    task = load_checkpoint(ckpt)
    assert task.network == net and task.objective_spec.name == obj
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hp["network"] == net and hp["objective"] == obj


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model=llama_tiny", "objective=masked_lm"],
            r"objective=masked_lm trains encoder networks but model llama_tiny \(llama\) is a decoder: use objective=causal_lm",
        ),
        (["model=gpt_tiny", "objective=masked_lm"], r"model gpt_tiny \(gpt\) is a decoder"),
        (
            ["model=bert_tiny", "objective=causal_lm"],
            r"objective=causal_lm trains decoder networks but model bert_tiny \(bert\) is an encoder: use objective=masked_lm \(also",
        ),
    ],
)
def test_invalid_combination_fails_at_start_up(
    overrides: list[str], message: str, tmp_path: Path, shared_cache: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        run([*QUICK, *overrides], tmp_path / "run", shared_cache)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_invalid_combination_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "model=llama_tiny", "objective=masked_lm", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: objective=masked_lm trains encoder networks but model llama_tiny (llama) is a decoder: "
        "use objective=causal_lm (also for decoders: classification, sft, token_classification), or a bert model"
    ]
    assert not (tmp_path / "r").exists()


def test_moved_keys_name_their_new_place(tmp_path: Path) -> None:
    assert moved_key_error(["model=bert_tiny", "data.mlm_probability=0.2"]) == (
        "data.mlm_probability has moved: use objective.mlm_probability=0.2 (with a BERT model or objective=masked_lm)"
    )
    assert moved_key_error(["data.block_size=64", "model.n_layer=2"]) is None
    out = subprocess.run(
        [sys.executable, "train.py", "model=bert_tiny", "data.pair_objective=sop", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "use objective.pair_objective=sop" in out.stderr


# ---------------------------------------------------------------------- export round trips
@pytest.mark.parametrize("net", ["gpt", "llama"])
def test_decoder_export_loads_in_transformers_and_generates_the_same(net: str, trained, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    task = load_checkpoint(trained(net, "causal_lm"))
    out = export(trained(net, "causal_lm"), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    expected = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[net]
    assert type(hf).__name__ == expected
    ids = torch.tensor([task.tokenizer("First Citizen: we proceed")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - task(ids)).abs().max().item() <= 1e-4
    back = load_export_dir(out)
    a = task.generate("First", 12, temperature=0.0)
    assert back.generate("First", 12, temperature=0.0) == a and len(a) > 0


def test_encoder_export_loads_in_transformers_and_fills_the_same(trained, tmp_path: Path) -> None:
    from transformers import BertForPreTraining

    ckpt = trained("bert", "masked_lm")
    task = load_checkpoint(ckpt)
    out = export(ckpt, tmp_path / "hf")
    hf = BertForPreTraining.from_pretrained(str(out)).eval()
    enc = task.tokenizer("The king is [MASK] here.", return_tensors="pt")
    with torch.no_grad():
        ours = task(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        theirs = hf(**enc)
    assert (theirs.prediction_logits - ours.mlm_logits).abs().max().item() <= 1e-4
    assert (theirs.seq_relationship_logits - ours.nsp_logits).abs().max().item() <= 1e-4
    assert load_export_dir(out).fill_mask("The [MASK] is here.") == task.fill_mask("The [MASK] is here.")


# ---------------------------------------------------------------------- a network from outside lm_lab
@dataclasses.dataclass
class ToyConfig(ConfigBase):
    """A decoder that lm_lab has never heard of: embeddings, one causal attention layer, a head."""

    _section: typing.ClassVar[str] = "model"
    network: typing.ClassVar[str] = "toy_decoder"
    vocab_size: int | None = None
    n_embd: int = 32
    max_seq_len: int = 64
    width: int = 2
    dropout: float = dataclasses.field(default=0.0, metadata=RESUME_FREE)


class ToyDecoder(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, cfg.width * cfg.n_embd), nn.GELU(), nn.Linear(cfg.width * cfg.n_embd, cfg.n_embd)
        )
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return self.head(x + self.mlp(x))


def test_a_network_defined_outside_lm_lab_trains_with_causal_lm(tmp_path: Path, shared_cache: Path) -> None:
    registry.register_network(registry.NetworkSpec(name="toy_decoder", config=ToyConfig, kind="decoder", lm=ToyDecoder))
    try:
        cfg = compose_config([*QUICK, "model=gpt_tiny", "data.tokenizer=char"], tmp_path / "run", shared_cache)
        with open_dict(cfg):  # objective: auto -> the network's default (causal_lm, for a decoder)
            cfg.model = OmegaConf.create({"_target_": f"{__name__}.ToyConfig", "n_embd": 32, "width": 2})
            cfg.objective = OmegaConf.create({})
        try:
            metrics, objects = train(cfg)
        finally:
            GlobalHydra.instance().clear()
        task = objects["task"]
        assert type(task.net) is ToyDecoder and task.objective_spec.name == "causal_lm"
        assert task.model_cfg.vocab_size == task.tokenizer_backend.get_vocab_size()  # bound late, from the tokenizer
        assert metrics["val/loss"] < 5.0  # 67 characters: uniform is ln(67) = 4.2
        ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
        loaded = load_checkpoint(ckpt)
        ids = torch.tensor([[5, 9, 11, 3]])
        with torch.no_grad():
            assert torch.equal(loaded(ids), task.eval()(ids))
        assert len(loaded.generate("ROMEO", 5, temperature=0.0)) > 0
        # Resume checks come from the dataclass fields: a field lm_lab never heard of is compared too,
        # and one marked RESUME_FREE may change.
        obj, data = objects["task"].objective_cfg, objects["datamodule"].cfg
        trained_cfg = task.model_cfg
        check_resume(ckpt, dataclasses.replace(trained_cfg, dropout=0.1), obj, data, 1337)
        with pytest.raises(CheckpointError, match=r"model\.width=3 \(checkpoint: 2\)"):
            check_resume(ckpt, dataclasses.replace(trained_cfg, width=3), obj, data, 1337)
    finally:
        registry.NETWORKS.pop("toy_decoder", None)
