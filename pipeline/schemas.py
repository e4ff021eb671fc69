"""The schema of every stage's configuration: one dataclass per config file or section, checked at
start-up by `core.schema.from_config` (an unknown key, a wrong type or a value out of range names the
key). `pipeline.settings` composes the configs and checks each stage's against its class here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from core.errors import ConfigError
from core.schema import above, at_least, from_config

TRAIN_TYPES = ("sim", "full", "new")  # Stage III's training rows (docs/method.md), in the tables' order


@dataclass(kw_only=True)
class DomainFile:
    name: str  # display name
    file: str  # raw file in raw_dir


@dataclass(kw_only=True)
class DatasetSettings:
    """config/dataset/*.yaml."""

    name: str
    source: Literal["files", "acdt", "synthetic"]
    raw_dir: str
    domains: Optional[list[DomainFile]]
    user_core: int = field(metadata=at_least(1))
    item_core: int = field(metadata=at_least(1))
    max_seq_len: int = field(metadata=at_least(1))
    generator: Optional[dict] = None  # source synthetic: the keys of dataset.synthetic.SyntheticConfig

    def __post_init__(self):
        if self.source == "synthetic":
            from dataset.synthetic import SyntheticConfig

            from_config(SyntheticConfig, self.generator or {}, "dataset.generator.")
        elif self.generator is not None:
            raise ConfigError(f"config key 'dataset.generator' is only read with dataset.source=synthetic, "
                              f"not {self.source}")
        if self.source != "synthetic" and not self.domains:
            raise ConfigError(f"config key 'dataset.domains' must list the domains of dataset {self.name}")


@dataclass(kw_only=True)
class TrainerSections:
    """config/trainer/*.yaml, one section per training of the pipeline."""

    base: dict  # Stage I, the base model M
    expert: dict  # Stage I, each domain expert E_d
    finetune: dict  # Stage III, the backbone


@dataclass(kw_only=True)
class ExpertSettings:
    init: Literal["base", "scratch"]
    loss: Literal["dsp", "next_item"]


@dataclass(kw_only=True)
class DecodingSettings:
    weights: Literal["elementwise", "position"]
    source_experts: bool
    global_test: bool
    local_scores: bool
    reference_shift: bool
    batch_size: int = field(metadata=at_least(1))
    memory_gb: float = field(metadata=above(0))


@dataclass(kw_only=True)
class LoggerSettings:
    mode: Literal["offline", "online", "disabled"]
    project: str
    entity: Optional[str]


@dataclass(kw_only=True)
class RunSettings:
    """The keys of every training run, Taesar's stages and the cross-domain baselines alike."""

    dataset: DatasetSettings
    logger: LoggerSettings
    gpu_id: int
    seed: int = field(metadata=at_least(0))
    data_path: str
    checkpoint_dir: str
    run_dir: Optional[str]
    topk: list[int]
    valid_metric: str
    eval_batch_size: int = field(metadata=at_least(1))
    MAX_ITEM_LIST_LENGTH: int = field(metadata=at_least(2))
    resume: bool
    overwrite: bool
    progress: bool


@dataclass(kw_only=True)
class PipelineSettings(RunSettings):
    """config/overall.yaml: the keys every stage shares."""

    decoder: dict  # the Taesar decoder, checked as model.decoder.SASRecConfig
    trainer: TrainerSections
    expert: ExpertSettings
    decoding: DecodingSettings
    stage: Literal["run", "dec", "tun"]
    regenerated_dir: str
    domains: Optional[int] = field(metadata=at_least(2))
    target_dom: Optional[str]
    # The official top-level training keys: null unless given (see OFFICIAL_KEYS).
    epochs: Optional[int] = field(metadata=at_least(1))
    train_batch_size: Optional[int] = field(metadata=at_least(1))
    learning_rate: Optional[float] = field(metadata=above(0))
    weight_decay: Optional[float] = field(metadata=at_least(0))
    stopping_step: Optional[int] = field(metadata=at_least(0))
    eval_step: Optional[int] = field(metadata=at_least(1))


@dataclass(kw_only=True)
class FinetuneSettings(PipelineSettings):
    """config/finetune.yaml: the shared keys and the backbone's."""

    model_name: str
    model: dict  # checked by backbones.registry.check_backbone_params
    train_type: Literal[TRAIN_TYPES]
    eval_history: Literal["target_only", "mixed"]
    new_inter_path: Optional[str]


@dataclass(kw_only=True)
class PrepareSettings:
    """config/prepare.yaml."""

    dataset: DatasetSettings
    data_path: str
    overwrite: bool
    progress: bool


@dataclass(kw_only=True)
class BaselineTrainer:
    baseline: dict  # the cross-domain baseline's training (config/trainer/<model>.yaml)


@dataclass(kw_only=True)
class BaselineSettings(RunSettings):
    """config/baseline.yaml: the cross-domain baselines (cdsr_baseline/train.py)."""

    model: dict  # checked by cdsr_baseline.models.resolve_fidelity
    trainer: BaselineTrainer
    baseline_fidelity: Literal["official", "corrected"]
    select_on: Literal["each", "mean"]
    recompute_activations: bool = False  # memory only: the same values (part of no key)


SCHEMAS = {"pretrain": PipelineSettings, "decoding": PipelineSettings, "finetune": FinetuneSettings}
