"""The one place that knows which networks and objectives exist and which combinations work.

A **network** (``lm_lab/models/<name>/``) is plain PyTorch: a config dataclass naming itself with the
class variable ``network``, the module an objective trains, and the Hugging Face mapping. An
**objective** (``lm_lab/objectives/<name>/``) is the recipe: its settings dataclass (class variable
``objective``), the LightningModule that computes the loss, and the DataModule that feeds it.
``train.py``, export, generate, fill-mask, ``load_checkpoint`` and the resume checks look both up
here; nothing else dispatches on a model's name.

Entries name their classes as ``"module:attribute"`` strings, imported on first use, so importing
the registry costs nothing (a run that trains GPT never imports BERT's code) and an entry may also
give the class itself (a network defined outside ``lm_lab``, see ``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from lm_lab.schema import ConfigError

Kind = Literal["decoder", "encoder"]


def _resolve(ref: Any) -> Any:
    """A class or module given as itself or as ``"package.module:attribute"`` / ``"package.module"``."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


@dataclass(frozen=True)
class NetworkSpec:
    """A network family.

    ``config``: its config dataclass (with ``network: ClassVar[str] = name``).
    ``kind``: ``decoder`` (causal attention, next-token logits) or ``encoder`` (bidirectional).
    ``lm``: the module pretraining objectives train, built as ``lm(config)``: for a decoder the network
    with its tied LM head (``forward(ids) -> logits``, ``hidden_states(ids)``); for an encoder the
    network with its pretraining heads (BERT's ``BertForPreTraining``).
    ``backbone``: builds the plain network (hidden states and, for encoders, a pooled output) that
    task heads sit on (``lm_lab.models.heads``); ``hf_prefix`` is its attribute in HF's task classes.
    ``hf``: the module with ``hf_config_dict(cfg)``, ``hf_state_dict(module)``,
    ``load_hf_state_dict(module, sd)`` and ``config_from_hf(dict)``; ``hf_model_type`` is the
    ``model_type`` of the ``config.json`` it writes and reads. ``None``: no Hugging Face counterpart.
    ``block``: the class of its repeated transformer block, the unit that sharding (``trainer=fsdp``)
    and activation checkpointing wrap; ``None``: neither is available for this network.
    """

    name: str
    config: Any
    kind: Kind
    lm: Any
    backbone: Any = None
    hf_prefix: str = ""
    hf: Any = None
    hf_model_type: str | None = None
    default_objective: str | None = None
    block: Any = None

    def build_backbone(self, cfg: Any, **kwargs: Any) -> Any:
        """The plain network task heads read (``hf_prefix``: its attribute name in HF's task classes)."""
        if self.backbone is None:
            raise ConfigError(f"network {self.name} has no plain backbone registered: it cannot carry a task head")
        return _resolve(self.backbone)(cfg, **kwargs)

    def config_class(self) -> type:
        return _resolve(self.config)

    def build(self, cfg: Any) -> Any:
        """The module the pretraining objectives train."""
        return _resolve(self.lm)(cfg)

    def block_class(self) -> type:
        """The transformer block class (``block``): the sharding and activation-checkpointing unit."""
        if self.block is None:
            raise ConfigError(
                f"network {self.name} names no transformer block class (NetworkSpec.block): it cannot be sharded "
                "or use activation checkpointing; register it with block='module:Class'"
            )
        return _resolve(self.block)

    def hf_module(self) -> Any:
        if self.hf is None:
            raise ConfigError(f"network {self.name} has no Hugging Face mapping: it cannot be exported or imported")
        return _resolve(self.hf)

    @property
    def objective(self) -> str:
        return self.default_objective or ("causal_lm" if self.kind == "decoder" else "masked_lm")


@dataclass(frozen=True)
class ObjectiveSpec:
    """A training recipe: settings dataclass, LightningModule and DataModule, and the network kinds it trains."""

    name: str
    config: Any
    task: Any
    datamodule: Any
    kinds: tuple[Kind, ...]
    summary: str = ""
    # The suffix of the transformers class an export of this objective is (e.g. "ForSequenceClassification");
    # None: the network's own pretraining class.
    hf_architecture: str | None = None

    def config_class(self) -> type:
        return _resolve(self.config)

    def task_class(self) -> type:
        return _resolve(self.task)

    def datamodule_class(self) -> type:
        return _resolve(self.datamodule)


NETWORKS: dict[str, NetworkSpec] = {}
OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_network(spec: NetworkSpec) -> NetworkSpec:
    """Add (or replace) a network family."""
    NETWORKS[spec.name] = spec
    return spec


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add (or replace) an objective."""
    OBJECTIVES[spec.name] = spec
    return spec


# ---------------------------------------------------------------------- built-in entries
register_network(
    NetworkSpec(
        name="gpt",
        config="lm_lab.models.gpt.model:GPTConfig",
        kind="decoder",
        lm="lm_lab.models.gpt.model:GPT",
        backbone="lm_lab.models.gpt.model:backbone",
        hf_prefix="transformer",
        hf="lm_lab.models.gpt.hf",
        hf_model_type="gpt2",
        block="lm_lab.models.gpt.model:Block",
    )
)
register_network(
    NetworkSpec(
        name="llama",
        config="lm_lab.models.llama.model:LlamaConfig",
        kind="decoder",
        lm="lm_lab.models.llama.model:Llama",
        backbone="lm_lab.models.llama.model:backbone",
        hf_prefix="model",
        hf="lm_lab.models.llama.hf",
        hf_model_type="llama",
        block="lm_lab.models.llama.model:DecoderLayer",
    )
)
register_network(
    NetworkSpec(
        name="bert",
        config="lm_lab.models.bert.model:BertConfig",
        kind="encoder",
        lm="lm_lab.models.bert.heads:BertForPreTraining",
        backbone="lm_lab.models.bert.model:Bert",
        hf_prefix="bert",
        hf="lm_lab.models.bert.hf",
        hf_model_type="bert",
        block="lm_lab.models.bert.model:BertLayer",
    )
)
register_objective(
    ObjectiveSpec(
        name="causal_lm",
        config="lm_lab.objectives.causal_lm.settings:CausalLMConfig",
        task="lm_lab.objectives.causal_lm.task:CausalLMTask",
        datamodule="lm_lab.objectives.causal_lm.data:CausalLMDataModule",
        kinds=("decoder",),
        summary="next-token prediction on packed blocks",
    )
)
register_objective(
    ObjectiveSpec(
        name="masked_lm",
        config="lm_lab.objectives.masked_lm.settings:MaskedLMConfig",
        task="lm_lab.objectives.masked_lm.task:MaskedLMTask",
        datamodule="lm_lab.objectives.masked_lm.data:MaskedLMDataModule",
        kinds=("encoder",),
        summary="masked-token prediction (+ next-sentence / sentence-order prediction) on sentence pairs",
    )
)

register_objective(
    ObjectiveSpec(
        name="classification",
        config="lm_lab.objectives.classification.settings:ClassificationConfig",
        task="lm_lab.objectives.classification.task:ClassificationTask",
        datamodule="lm_lab.objectives.classification.data:ClassificationDataModule",
        kinds=("encoder", "decoder"),
        summary="a label (or a number) per text or text pair: [CLS] pooled (encoders), last token (decoders)",
        hf_architecture="ForSequenceClassification",
    )
)
register_objective(
    ObjectiveSpec(
        name="token_classification",
        config="lm_lab.objectives.token_classification.settings:TokenClassificationConfig",
        task="lm_lab.objectives.token_classification.task:TokenClassificationTask",
        datamodule="lm_lab.objectives.token_classification.data:TokenClassificationDataModule",
        kinds=("encoder", "decoder"),
        summary="a tag per word (part of speech, BIO entities) at each word's first sub-token",
        hf_architecture="ForTokenClassification",
    )
)
register_objective(
    ObjectiveSpec(
        name="sft",
        config="lm_lab.objectives.sft.settings:SFTConfig",
        task="lm_lab.objectives.sft.task:SFTTask",
        datamodule="lm_lab.objectives.sft.data:SFTDataModule",
        kinds=("decoder",),
        summary="instruction fine-tuning on prompt/response pairs in a prompt template (loss on the responses)",
    )
)


# ---------------------------------------------------------------------- lookups
def network(name: str) -> NetworkSpec:
    try:
        return NETWORKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown network {name!r}: registered networks are {', '.join(sorted(NETWORKS))} "
            "(add one with lm_lab.registry.register_network)"
        ) from None


def objective(name: str) -> ObjectiveSpec:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(
            f"unknown objective {name!r}: use objective= one of {', '.join(sorted(OBJECTIVES))}"
        ) from None


def network_of(model_cfg: Any) -> NetworkSpec:
    """The entry of a model config instance (or class), by its ``network`` class variable."""
    name = getattr(model_cfg, "network", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"model config {type(model_cfg).__name__} does not name its network: give the class "
            "`network: ClassVar[str] = '<name>'` and register it with lm_lab.registry.register_network"
        )
    spec = network(name)
    return spec


def objective_of(objective_cfg: Any) -> ObjectiveSpec:
    return objective(getattr(objective_cfg, "objective", ""))


def network_for_hf(model_type: str) -> NetworkSpec:
    """The entry whose Hugging Face ``model_type`` is ``model_type`` (an exported directory's config.json)."""
    for spec in NETWORKS.values():
        if spec.hf_model_type == model_type:
            return spec
    known = sorted(s.hf_model_type for s in NETWORKS.values() if s.hf_model_type)
    raise ConfigError(f"no lm_lab network reads Hugging Face model_type {model_type!r}: supported: {', '.join(known)}")


def objective_for_hf(architecture: str, network_spec: NetworkSpec) -> ObjectiveSpec:
    """The objective an exported directory was trained with, from its config.json ``architectures``."""
    for spec in OBJECTIVES.values():
        if spec.hf_architecture and architecture.endswith(spec.hf_architecture):
            return spec
    return objective(network_spec.objective)


def default_objective_config(model_cfg: Any) -> Any:
    """The settings of the objective a network trains with by default (decoders: causal_lm, encoders: masked_lm)."""
    return objective(network_of(model_cfg).objective).config_class()()


def check_combination(
    model_cfg: Any, objective_cfg: Any, model_name: str | None = None
) -> tuple[NetworkSpec, ObjectiveSpec]:
    """Refuse (one line) an objective that cannot train this network, e.g. masked LM on a causal decoder."""
    net, obj = network_of(model_cfg), objective_of(objective_cfg)
    if net.kind not in obj.kinds:
        others = sorted(n for n, o in OBJECTIVES.items() if net.kind in o.kinds and n != net.objective)
        nets = sorted(n for n, s in NETWORKS.items() if s.kind in obj.kinds)
        shown = f"model {model_name} ({net.name})" if model_name else f"the {net.name} network"
        also = f" (also for {net.kind}s: {', '.join(others)})" if others else ""
        raise ConfigError(
            f"objective={obj.name} trains {' or '.join(obj.kinds)} networks but {shown} is {_a(net.kind)}: "
            f"use objective={net.objective}{also}, or a {'/'.join(nets)} model"
        )
    return net, obj


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def describe() -> str:
    """A table of what is registered (``python -m lm_lab.registry``)."""
    lines = ["networks:"]
    for name, s in sorted(NETWORKS.items()):
        hf = f", Hugging Face {s.hf_model_type}" if s.hf_model_type else ""
        lines.append(f"  {name:<22} {s.kind}, default objective {s.objective}{hf}")
    lines.append("objectives:")
    for name, o in sorted(OBJECTIVES.items()):
        lines.append(f"  {name:<22} {'/'.join(o.kinds)}: {o.summary}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
