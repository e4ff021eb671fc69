"""Every file the pipeline keeps: where it lives, what it was made from, and when it may be reused.

    DATA_PATH/NAME/                        prepared data (python -m dataset.prepare): the contract files
                                           and manifest.json, with the digests of the raw and prepared files
    CHECKPOINT_DIR/NAME/
        MODEL-h{H}-l{L}-KEY/               Stage I, base model M: MODEL-NAME-SEED.full.ckpt
            VARIANT-KEY/                   Stage I, the experts: MODEL-NAME-SEED.dom{d}.ckpt
        finetune/MODEL-TYPE-DOM-KEY/       Stage III: MODEL-NAME-SEED.tune.ckpt
    REGENERATED_DIR/NAME/VARIANT-KEY/      Stage II: NAME.SEED.dom{d}.train.inter, with .summary.json,
                                           .mapping.json and .manifest.json beside it
    the run's output folder                config.yaml, metrics.json, wandb/ (pipeline/runs.py)

KEY is eight hex digits of the settings that produced the artifact, spelled out in the folder's
`settings.json`, so runs with other settings never share a folder and a later stage finds an
earlier one's output from its own config. The prepared data is keyed by its preparation settings
and raw content (dataset/prepare.py); re-preparing it never touches the other artifacts.

Settings say where an artifact goes; fingerprints say whether it is still good. Every artifact
records the digests of the files it was made from (a checkpoint in `meta["inputs"]`, a
regenerated file in its manifest), and a stage refuses to reuse or read one whose inputs changed
since, naming the artifact and the input; `overwrite=true` replaces that artifact alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.schema import ConfigError, describe_differences
from data import PreparedDataset, SequenceRows
from data.files import format_inter, write_text_atomic
from data.fingerprints import StaleArtifactError, check_inputs, file_digest, fingerprint
from data.paths import project_path
from dataset.prepare import preparation_settings
from pipeline.settings import OFFICIAL_STAGE, decoder_params, expert_variant, train_config, variant_name

log = logging.getLogger(__name__)
SETTINGS_FILE = "settings.json"


def settings_key(settings: dict) -> str:
    """Eight hex digits that name a folder of outputs made with `settings`."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _dump(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def write_settings(folder: Path, settings: dict) -> None:
    """`folder/settings.json`, written only when it does not already say this: a run that changes
    nothing writes nothing, so a finished store can be archived or shared read-only."""
    path, text = folder / SETTINGS_FILE, _dump(settings)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def other_settings(folder: Path, settings: dict, limit: int = 3) -> str:
    """What the sibling folders of a missing artifact were made with, as differences to `settings`:
    the hint that tells a user which override they left out."""
    lines = []
    for sibling in sorted(folder.parent.glob("*/" + SETTINGS_FILE)) if folder.parent.is_dir() else []:
        if sibling.parent == folder:
            continue
        theirs = json.loads(sibling.read_text(encoding="utf-8"))
        lines.append(f"{sibling.parent} ({describe_differences(settings, theirs) or 'same settings'})")
    if not lines:
        return ""
    shown = "; ".join(lines[:limit]) + (f"; and {len(lines) - limit} more" if len(lines) > limit else "")
    return f". Beside it, made with other settings (this run's value -> theirs): {shown}"


# --------------------------------------------------------------------------- prepared data


ALL_DOMAINS = "all"  # decoding.py target_dom=all: every target domain in one pass


def open_dataset(cfg: DictConfig) -> PreparedDataset:
    """The configured prepared dataset (`dataset.prepare.prepare_dataset` makes it), with `domains`
    and `target_dom` checked against it (`all` is decoding.py's)."""
    dataset = PreparedDataset(project_path(cfg.data_path), cfg.dataset.name)
    n = dataset.domains.n_domains
    if cfg.get("domains") is not None and int(cfg.domains) != n:
        raise ConfigError(f"config key 'domains' is {cfg.domains} but dataset {dataset.name} has {n} domains")
    if cfg.get("target_dom") is not None and not (cfg.target_dom == ALL_DOMAINS and cfg.get("stage") == OFFICIAL_STAGE["decoding"]):
        try:
            dataset.domains.index(cfg.target_dom)
        except ValueError as error:
            raise ConfigError(f"config key 'target_dom': {error}") from None
    return dataset


def _dataset_settings(cfg: DictConfig) -> dict:
    return preparation_settings(cfg.dataset)


def _training(cfg: DictConfig, section: str) -> dict:
    """A trainer section as it keys an artifact: everything that changes the weights."""
    return {k: v for k, v in asdict(train_config(cfg, section)).items() if k != "topk"}


# --------------------------------------------------------------------------- Stage I


@dataclass(frozen=True)
class Stage1Paths:
    """Where the Stage I checkpoints of one configuration live (see the module docstring)."""

    base_dir: Path
    expert_dir: Path
    stem: str  # MODEL-NAME-SEED
    base_settings: dict
    expert_settings: dict

    @property
    def base(self) -> Path:
        return self.base_dir / f"{self.stem}.full.ckpt"

    def expert(self, dom: str) -> Path:
        return self.expert_dir / f"{self.stem}.{dom}.ckpt"

    def role(self, role: str) -> Path:
        """`full` (the base model) or `dom{d}` (an expert)."""
        return self.base if role == "full" else self.expert(role)


def stage1_paths(cfg: DictConfig) -> Stage1Paths:
    decoder = decoder_params(cfg.decoder)
    base_settings = {
        "dataset": _dataset_settings(cfg),
        "decoder": decoder,
        "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH,
        "training": _training(cfg, "base"),
    }
    expert_settings = {"base": settings_key(base_settings), "expert": OmegaConf.to_container(cfg.expert),
                       "training": _training(cfg, "expert")}
    model = cfg.decoder.name
    base_dir = project_path(cfg.checkpoint_dir) / cfg.dataset.name / (
        f"{model}-h{decoder['hidden_size']}-l{decoder['n_layers']}-{settings_key(base_settings)}"
    )
    expert_dir = base_dir / f"{expert_variant(cfg)}-{settings_key(expert_settings)}"
    return Stage1Paths(base_dir, expert_dir, f"{model}-{cfg.dataset.name}-{cfg.seed}", base_settings, expert_settings)


def checkpoint_meta(dataset: PreparedDataset, model_config, role: str, inputs: dict) -> dict:
    """What a Stage I checkpoint must agree with to be used: dataset, vocabulary, domain ranges, model,
    role, and the fingerprints of the files it was trained from."""
    return {
        "dataset": dataset.name,
        "n_items": dataset.domains.n_items,
        "domain_starts": list(dataset.domains.starts),
        "model_args": asdict(model_config),
        "role": role,
        "inputs": inputs,
    }


def stage1_inputs(cfg: DictConfig, dataset: PreparedDataset, paths: Stage1Paths, role: str) -> dict:
    """The files a Stage I model is trained from: its training and validation splits, the
    vocabulary, and, for an expert adapted from M, M's checkpoint."""
    if role == "full":
        splits = ["item", "full.train", "full.valid"]
    else:
        splits = ["item", "full.train" if cfg.expert.loss == "dsp" else f"{role}.train", f"{role}.valid"]
    inputs = {split: dataset.fingerprint(split) for split in splits}
    if role != "full" and cfg.expert.init == "base":
        inputs["checkpoint full"] = fingerprint(paths.base)
    return inputs


def stage1_checkpoints(cfg: DictConfig, dataset: PreparedDataset, paths: Stage1Paths | None = None
                       ) -> dict[str, Path]:
    """M and every expert of this configuration by role (`full`, `dom1`, ...); stops with what to run
    when one is missing. `paths`: `stage1_paths(cfg)`, when the caller has it already."""
    paths = paths or stage1_paths(cfg)
    checkpoints = {role: paths.role(role) for role in ["full", *dataset.domains.names]}
    for role, path in checkpoints.items():
        if not path.is_file():
            folder = paths.base_dir if role == "full" else paths.expert_dir
            settings = paths.base_settings if role == "full" else paths.expert_settings
            raise FileNotFoundError(
                f"{path}: Stage I checkpoint not found; run `python pretrain.py` with the same dataset, seed, "
                f"decoder.*, trainer.base.*, trainer.expert.* and expert.* settings first (this run: "
                f"dataset={cfg.dataset.name} seed={cfg.seed}, {variant_name(cfg)})"
                + other_settings(folder, settings)
            )
    return checkpoints


# --------------------------------------------------------------------------- Stage II


@dataclass(frozen=True)
class Regenerated:
    """The regenerated training file of one target domain and the records beside it."""

    folder: Path
    stem: str  # NAME.SEED.dom{d}.train
    settings: dict | None = None  # what produced it; None for a file named by its path

    @classmethod
    def of_file(cls, path: Path) -> "Regenerated":
        """The records beside a regenerated training file given by its path (`new_inter_path`, say)."""
        path = Path(path)
        return cls(path.parent, path.name.removesuffix(".inter"))

    @property
    def inter(self) -> Path:
        return self.folder / f"{self.stem}.inter"

    @property
    def summary(self) -> Path:
        return self.folder / f"{self.stem}.summary.json"

    @property
    def mapping(self) -> Path:
        return self.folder / f"{self.stem}.mapping.json"

    @property
    def manifest(self) -> Path:
        return self.folder / f"{self.stem}.manifest.json"

    @property
    def lock(self) -> Path:
        """Held while decoding writes into this folder for this seed (every target domain's file); it
        lies beside the folder, so a decoding refused before it writes leaves no folder behind."""
        return self.folder.parent / f".{self.folder.name}.{self.stem.rsplit('.', 2)[0]}.decoding.lock"

    def read_manifest(self) -> dict:
        if not self.manifest.is_file():
            raise StaleArtifactError(f"{self.inter}: its manifest {self.manifest} is missing, so what made it is "
                                     "unknown; decode again with overwrite=true")
        return json.loads(self.manifest.read_text(encoding="utf-8"))

    def check(self, inputs: dict) -> dict:
        """The manifest, after checking that the file is the one decoded and was made from `inputs`."""
        manifest = self.read_manifest()
        if manifest.get("output", {}).get("sha256") != file_digest(self.inter):
            raise StaleArtifactError(f"{self.inter}: changed after decoding (its digest is not the one in "
                                     f"{self.manifest}); decode again with overwrite=true")
        check_inputs(self.inter, manifest.get("inputs", {}), inputs)
        return manifest

    def write(self, rows: SequenceRows, report: dict, mapping: dict, manifest: dict) -> Path:
        """Write the training file, its report, the mapping and the manifest; returns the training file.

        The training file comes last, each file atomically: a later stage never finds a training
        file without the record of how it was made (an old record beside a new file fails its check).
        """
        write_settings(self.folder, self.settings)
        write_text_atomic(self.summary, _dump(report))
        write_text_atomic(self.mapping, _dump({str(s): {str(t): c for t, c in targets.items()}
                                               for s, targets in mapping.items()}))
        text = format_inter(rows)
        output = {"path": str(self.inter), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        write_text_atomic(self.manifest, _dump({**manifest, "output": output}))
        write_text_atomic(self.inter, text)
        return self.inter


def regenerated(cfg: DictConfig, target_dom: str | None = None, stage1: Stage1Paths | None = None) -> Regenerated:
    """Where decoding writes the regenerated file of `target_dom` (default: cfg.target_dom) for this
    configuration: keyed by the Stage I checkpoints it decodes with and the decoding options (not the
    batch size or the memory budget, which only change speed). `stage1`: `stage1_paths(cfg)`, when
    the caller has it already."""
    target_dom = target_dom or cfg.target_dom
    stage1 = stage1 or stage1_paths(cfg)
    decoding = {k: v for k, v in OmegaConf.to_container(cfg.decoding, resolve=True).items()
                if k not in ("batch_size", "memory_gb")}
    # Stage I's settings in full (not its folder's name), so that settings.json says what they were.
    settings = {"stage1": {"base": stage1.base_settings, "expert": stage1.expert_settings},
                "decoding": decoding, "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH}
    folder = project_path(cfg.regenerated_dir) / cfg.dataset.name / f"{variant_name(cfg)}-{settings_key(settings)}"
    return Regenerated(folder, f"{cfg.dataset.name}.{cfg.seed}.{target_dom}.train", settings)


def decoding_inputs(cfg: DictConfig, dataset: PreparedDataset, target_dom: str,
                    checkpoints: dict[str, Path] | None = None) -> dict:
    """The files a regenerated file is made from: the rows decoded and kept, the vocabulary and the
    Stage I checkpoints (`checkpoints`, when the caller has located them: `stage1_checkpoints`)."""
    inputs = {split: dataset.fingerprint(split) for split in ("item", "full.train", f"{target_dom}.train")}
    for role, path in (checkpoints or stage1_checkpoints(cfg, dataset)).items():
        inputs[f"checkpoint {role}"] = fingerprint(path)
    return inputs


def missing_regenerated(cfg: DictConfig, output: Regenerated, hint: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{output.inter}: regenerated training file not found; run `{hint}` first (decoding with the same "
        f"Stage I and decoding settings as this run, {variant_name(cfg)})" + other_settings(output.folder,
                                                                                            output.settings)
    )


# --------------------------------------------------------------------------- cross-domain baselines


def baseline_checkpoint(cfg: DictConfig) -> tuple[Path, dict]:
    """`CHECKPOINT_DIR/NAME/baseline/MODEL-KEY/MODEL-NAME-SEED.ckpt` of a cross-domain baseline, and its
    settings (the model's keys with their quirks resolved, the training, the selection)."""
    settings = {"dataset": _dataset_settings(cfg), "model": OmegaConf.to_container(cfg.model, resolve=True),
                "training": _training(cfg, "baseline"), "select_on": cfg.select_on,
                "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH}
    folder = project_path(cfg.checkpoint_dir) / cfg.dataset.name / "baseline" / (
        f"{cfg.model.name}-{settings_key(settings)}")
    return folder / f"{cfg.model.name}-{cfg.dataset.name}-{cfg.seed}.ckpt", settings


def baseline_inputs(dataset: PreparedDataset) -> dict:
    """What a cross-domain baseline is trained and selected from: the mixed training and validation
    rows, each domain's validation users, the users' whole sequences (negatives) and the vocabulary."""
    splits = ["item", "full.train", "full.valid", "full.test", *(f"{d}.valid" for d in dataset.domains.names)]
    return {split: dataset.fingerprint(split) for split in splits}


# --------------------------------------------------------------------------- Stage III


def training_source(cfg: DictConfig) -> str:
    """What names a Stage III run's training rows in its checkpoint's key: the split (`sim`, `full`),
    the regenerated file's folder (`new`), or the path given as `new_inter_path`."""
    if cfg.train_type == "sim":
        return f"{cfg.target_dom}.train"
    if cfg.train_type == "full":
        return "full.train"
    if cfg.get("new_inter_path"):
        return str(project_path(cfg.new_inter_path))
    return regenerated(cfg).folder.name


def finetune_checkpoint(cfg: DictConfig, source: str) -> tuple[Path, dict]:
    """The Stage III checkpoint of this configuration and its settings; `source` names the training
    rows (a split of the prepared data, or the regenerated file's folder)."""
    settings = {"dataset": _dataset_settings(cfg), "model_name": cfg.model_name,
                "model": OmegaConf.to_container(cfg.model, resolve=True), "train_type": cfg.train_type,
                "target_dom": cfg.target_dom, "source": source, "training": _training(cfg, "finetune"),
                "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH}
    if cfg.get("eval_history", "target_only") != "target_only":  # another selection; the default keeps its keys
        settings["eval_history"] = cfg.eval_history
    folder = (project_path(cfg.checkpoint_dir) / cfg.dataset.name / "finetune"
              / f"{cfg.model_name}-{cfg.train_type}-{cfg.target_dom}-{settings_key(settings)}")
    return folder / f"{cfg.model_name}-{cfg.dataset.name}-{cfg.seed}.tune.ckpt", settings


