"""One training loop for every model of the project, with resume files, a time limit and checkpoints
(evaluation.py ranks and selects; checkpoints.py writes, reads and checks the files).

`fit` trains any model given a loss function of (model, batch): Adam, an
evaluation every `eval_step` epochs, early stopping on the validation metric,
and the best (or the last) weights kept. Its state is saved atomically after
every epoch, so a killed run resumes where it stopped and ends with the same
weights as an uninterrupted one; a finished run leaves one final checkpoint.

Checkpoints hold tensors and plain data only and load with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from checkpoints import check_meta, load_checkpoint, lock_file, resume_file, save_checkpoint
from core.distributed import (
    all_gather, all_reduce_sum, barrier, broadcast_parameters, data_parallel, rank_alone, sum_gradients,
)
from core.errors import PAUSED_EXIT_CODE, TrainingPaused  # noqa: F401 (PAUSED_EXIT_CODE: the exit code of a pause, for callers)
from core.schema import ConfigError, above, at_least, check_ranges
from data import SequenceBatch, SequenceLoader
from data.files import exclusive_lock
from evaluation import Evaluation, Selection, autocast, cpu_copy, metric_key
from model.metrics import KS

log = logging.getLogger(__name__)

# A training pauses at the first epoch end past this many minutes of its process (an environment
# variable, not a setting: it changes when a run stops, never what it computes); the same command
# continues it from its resume file. For sessions with a clock (`TAESAR_TIME_LIMIT=55`).
TIME_LIMIT_VARIABLE = "TAESAR_TIME_LIMIT"
_PROCESS_STARTED = time.monotonic()


def time_limit_minutes() -> float | None:
    """The process's time limit in minutes (`TAESAR_TIME_LIMIT`), None without one."""
    value = os.environ.get(TIME_LIMIT_VARIABLE, "").strip()
    if not value:
        return None
    try:
        minutes = float(value)
    except ValueError:
        raise ConfigError(f"environment variable {TIME_LIMIT_VARIABLE}={value!r}: expected minutes (a number >= 0)") \
            from None
    if not minutes >= 0:
        raise ConfigError(f"environment variable {TIME_LIMIT_VARIABLE}={value!r}: expected minutes (a number >= 0)")
    return minutes


def _past_time_limit(world) -> bool:
    """Whether the time limit has passed; under torchrun, whether it has on any rank (all pause alike)."""
    limit = time_limit_minutes()
    past = limit is not None and time.monotonic() - _PROCESS_STARTED >= 60 * limit
    if world:
        flag = torch.tensor(float(past))
        all_reduce_sum(flag)
        past = bool(flag > 0)
    return past

LossFn = Callable[[nn.Module, SequenceBatch], torch.Tensor]


@dataclass
class TrainConfig:
    """One training's settings: a section `trainer.base`, `trainer.expert` or `trainer.finetune` of the
    config (config/trainer/*.yaml), plus the evaluation protocol shared by every stage."""

    epochs: int = field(metadata=at_least(1))  # (int) maximum number of epochs
    learning_rate: float = field(metadata=above(0))  # (float) Adam step size
    batch_size: int = field(default=128, metadata=at_least(1))  # (int) training rows per batch
    weight_decay: float = field(default=0.0, metadata=at_least(0))  # (float) Adam L2 penalty
    # (int) evaluations without improvement before stopping; 0: never stop early
    stopping_step: int = field(default=10, metadata=at_least(0))
    eval_step: int = field(default=1, metadata=at_least(1))  # (int) evaluate every this many epochs (and after the last)
    keep: Literal["best", "last"] = "best"  # (str) weights kept at the end: best (on validation) or last
    # (int) epochs of linear learning-rate warm-up (from 1e-5 of the rate), without validation
    warmup_epochs: int = field(default=0, metadata=at_least(0))
    clip_grad_norm: float | None = field(default=None, metadata=above(0))  # (float) gradient-norm clip, None: off
    enable_amp: bool = False  # (bool) bfloat16 autocast on CUDA; ignored on CPU
    # The evaluation protocol: top-level keys of the config, the same for every training.
    valid_metric: str = "NDCG@10"  # (str) model-selection metric
    topk: tuple[int, ...] = KS  # (list) cut-offs of HR, NDCG and MRR

    # Fields of the config's trainer sections (the rest come from the top level).
    SECTION_EXCLUDES = ("valid_metric", "topk")

    def __post_init__(self):
        self.topk = tuple(int(k) for k in self.topk)
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool):
            raise ConfigError(f"config key 'epochs' must be an integer, got {self.epochs!r}")
        check_ranges(self)
        if self.keep not in ("best", "last"):
            raise ConfigError(f"config key 'keep' must be best or last, got {self.keep!r}")
        if not self.topk or min(self.topk) < 1:
            raise ConfigError(f"config key 'topk' must list positive cut-offs, got {list(self.topk)}")
        key = metric_key(self.valid_metric)
        if int(key.split("@")[1]) not in self.topk:
            raise ConfigError(f"config key 'valid_metric' ({self.valid_metric}) needs its cut-off in topk "
                              f"{list(self.topk)}")

    @property
    def valid_key(self) -> str:
        return metric_key(self.valid_metric)


# Wall time of the earlier pieces of every training this process resumed (a paused or killed run's
# epochs before its resume file was picked up): what a run record adds to its own wall time, so that a
# run made in pieces records all of them. The resume file carries it; the checkpoint holds no timings.
_RESUMED_SECONDS = [0.0]


def resumed_seconds() -> float:
    """Seconds the earlier pieces of the trainings resumed in this process ran (their epochs, evaluation
    included); read before and after a stage to learn what its resumed trainings had run before."""
    return _RESUMED_SECONDS[0]


@dataclass
class FitResult:
    # Of the kept weights; with one Evaluation per domain (`valid` a dict), keyed by domain.
    valid_metrics: dict
    epochs_run: int
    best_epoch: int | dict  # epoch (0-based) of the kept weights, -1 when kept without validation
    history: list[dict] = field(default_factory=list)


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Learning-rate multiplier of epoch `epoch` (0-based): linear from 1e-5 to 1 over the warm-up."""
    if epoch >= warmup_epochs:
        return 1.0
    return 1e-5 + (1 - 1e-5) * epoch / warmup_epochs


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train: SequenceLoader,
    config: TrainConfig,
    *,
    checkpoint: Path,
    meta: dict,
    valid: Evaluation | dict[str, Evaluation] | None = None,
    select_on: str = "each",
    resume: bool = True,
    logger=None,
    log_prefix: str = "",
    progress: bool = True,
    device: torch.device | None = None,
) -> FitResult:
    """Train `model` in place and write its final checkpoint to `checkpoint`.

    `meta` (plain data: model arguments, dataset, role) is stored in every
    checkpoint. With `resume`, an unfinished run's state (`checkpoint` +
    `.resume`) is picked up; a finished checkpoint is never overwritten here:
    callers decide whether to skip or redo a stage.

    `valid` is one Evaluation, or one per domain for a model trained once for all domains. Then
    `select_on="each"` keeps, for every domain, the weights of its own best epoch (training stops
    when no domain has improved for `stopping_step` evaluations) and the checkpoint holds them by
    domain (`domain_state_dicts`); `select_on="mean"` selects one epoch on the mean over domains.

    While it trains, the process that writes (rank 0) holds the checkpoint's lock
    (`.NAME.lock` beside it): a second job of the same settings stops at once with `BusyError`
    instead of interleaving its epochs with the first one's in the resume file.
    """
    world = data_parallel()
    writes = world is None or world.is_main
    lock = exclusive_lock(lock_file(checkpoint), wait=False, what=f"another job is training {checkpoint.name} now; "
                                                                  "run this one again once it is done to reuse it")
    with lock if writes else contextlib.nullcontext():
        return _fit(model, loss_fn, train, config, checkpoint=checkpoint, meta=meta, valid=valid,
                    select_on=select_on, resume=resume, logger=logger, log_prefix=log_prefix, progress=progress,
                    device=device, world=world)


def _fit(model, loss_fn, train, config, *, checkpoint, meta, valid, select_on, resume, logger, log_prefix, progress,
         device, world) -> FitResult:
    if select_on not in ("each", "mean"):
        raise ConfigError(f"config key 'select_on' must be each or mean, got {select_on!r}")
    device = device or next(model.parameters()).device
    resume_path = resume_file(checkpoint)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    selection = Selection(valid, select_on, config.valid_key)
    state = {"epoch": 0, "bad_evals": 0, "history": [], "best": selection.empty()}
    elapsed = 0.0  # wall time of this training's epochs, earlier pieces included (resume file only)
    prefix = f"{log_prefix}: " if log_prefix else ""
    if resume and resume_path.is_file():
        saved = load_checkpoint(resume_path)
        check_meta(saved["meta"], meta, resume_path)
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["trainer"]
        elapsed = float(saved.get("elapsed_seconds", 0.0))
        _RESUMED_SECONDS[0] += elapsed
        restored = _restore_rng(saved["rng"], world)
        log.info("%sresuming from %s after epoch %d", prefix, resume_path, state["epoch"] - 1)  # epochs log 0-based
    else:
        restored = False
    if world:
        # Every rank starts from rank 0's weights; dropout draws differ by rank (a resumed run goes on
        # with each rank's own saved stream).
        broadcast_parameters(model)
        if not restored:
            torch.manual_seed(torch.initial_seed() + world.rank)
    key_prefix = f"{log_prefix}/" if log_prefix else ""
    epochs = tqdm(range(state["epoch"], config.epochs), desc=f"{log_prefix or 'training'} epochs",
                  initial=state["epoch"], total=config.epochs, disable=not progress)
    for epoch in epochs:
        train.set_epoch(epoch)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * warmup_factor(epoch, config.warmup_epochs)
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for batch in tqdm(train, desc=f"epoch {epoch}", leave=False, disable=not progress):
            optimizer.zero_grad(set_to_none=True)
            loss = backward_global_batch(model, loss_fn, batch, world, device, config.enable_amp)
            if config.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
            loss_sum += loss.detach()
        # The history goes into the checkpoint, so it holds no timings: same data, settings and seed
        # give a byte-identical checkpoint, and its fingerprint says whether later outputs are stale.
        if world:
            all_reduce_sum(loss_sum)
        record = {"epoch": epoch, "train_loss": loss_sum.item() / max(len(train), 1)}
        seconds = time.perf_counter() - started

        stop = False
        last_epoch = epoch + 1 == config.epochs
        # no validation during the warm-up: its epochs neither count as bad nor are kept
        due = (epoch + 1) % config.eval_step == 0 or last_epoch
        if valid is not None and epoch >= config.warmup_epochs and due:
            metrics = selection.evaluate(model, config, device)
            record["valid"] = metrics
            improved = selection.update(state["best"], epoch, metrics, model)
            state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
            stop = config.stopping_step > 0 and state["bad_evals"] >= config.stopping_step
            log.info("%sepoch %d: loss %.4f, valid %s, %.1fs", prefix, epoch, record["train_loss"],
                     selection.describe(metrics, state["best"]), seconds)
        else:
            log.info("%sepoch %d: loss %.4f, %.1fs", prefix, epoch, record["train_loss"], seconds)
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if logger is not None:
            logger.log({**_flat(record, key_prefix), f"{key_prefix}train/seconds": seconds})
        rng = _rng_states(world)  # every rank's generators (a collective call under torchrun)
        elapsed += time.perf_counter() - started
        if world is None or world.is_main:  # rank 0 alone writes; the others wait for the file
            _save_resume_state(resume_path, model, optimizer, state, meta, rng, elapsed)
        barrier(world)
        if stop:
            log.info("%sstopping early: no %s improvement in %d evaluations", prefix, config.valid_key,
                     config.stopping_step)
            break
        if epoch + 1 < config.epochs and _past_time_limit(world):
            raise TrainingPaused(f"{prefix}paused after epoch {epoch} of at most {config.epochs}: the time limit "
                                 f"{TIME_LIMIT_VARIABLE}={time_limit_minutes():g} minutes has passed; run the same "
                                 f"command again to continue from {resume_path}")

    payload, kept_metrics, kept_epoch = selection.kept(state, model, config.keep)
    if world is None or world.is_main:
        save_checkpoint(checkpoint, {**payload, "meta": meta, "epochs_run": state["epoch"], "best_epoch": kept_epoch,
                                     "valid_metrics": kept_metrics, "history": state["history"]})
        resume_path.unlink(missing_ok=True)
    barrier(world)
    return FitResult(kept_metrics, state["epoch"], kept_epoch, state["history"])


def backward_global_batch(model: nn.Module, loss_fn: LossFn, batch: SequenceBatch, world, device,
                          enable_amp: bool = False) -> torch.Tensor:
    """The loss of the global batch `batch` (detached; under torchrun this rank's part of it), with its
    gradient in the parameters' `.grad`, summed over the ranks.

    Under torchrun each rank takes its contiguous share of the rows. A row-mean loss is weighted by
    that share; a model whose loss reduces over the ranks itself (`loss_reduces_over_ranks`,
    core/distributed.py) gives its part of the global loss. Either way the summed gradients are
    the global batch's, as one process computes them. A batch with fewer rows than ranks is rank 0's
    alone."""
    alone, weight = contextlib.nullcontext(), 1.0
    if world:
        rows = len(batch.users)
        share = world.shard(rows) if rows >= world.size else range(rows if world.is_main else 0)
        alone = rank_alone() if rows < world.size else alone
        if not getattr(model, "loss_reduces_over_ranks", False):
            weight = len(share) / rows
        batch = batch.rows(share.start, share.stop)
    batch = batch.to(device)
    if len(batch.users):
        with autocast(device, enable_amp), alone:
            loss = loss_fn(model, batch)
        (loss * weight if world else loss).backward()
    else:
        loss = torch.zeros((), device=device)
    if world:
        sum_gradients(model)
    return loss.detach() * weight


# --------------------------------------------------------------------------- resume state


def _rng_states(world) -> dict:
    """This process's generator states (`cpu`, `cuda`); under torchrun also `ranks`, every rank's, in
    rank order, so that a resumed run goes on with each rank's own stream of dropout and negatives."""
    own = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if world is None:
        return own
    return {**own, "ranks": all_gather(world, own)}


def _restore_rng(saved: dict, world) -> bool:
    """Put back the generator states a resume file saved; returns whether this rank's own were there.

    A resume file of another number of processes holds no state of this rank: the run goes on with
    a fresh stream per rank (the weights, optimiser and epoch are still restored), as said in the log."""
    if world is None:
        if len(saved.get("ranks") or []) > 1:
            log.warning("the resume file holds the random state of %d processes, this run is one: it goes on with "
                        "rank 0's stream, so it is not the same as an uninterrupted run", len(saved["ranks"]))
        own = saved
    else:
        ranks = saved.get("ranks") or []
        if len(ranks) != world.size:
            log.warning("the resume file holds the random state of %d process(es), this run has %d: each rank "
                        "draws a fresh stream from here, so the run is not the same as an uninterrupted one",
                        len(ranks) or 1, world.size)
            return False
        own = ranks[world.rank]
    torch.set_rng_state(own["cpu"])
    if torch.cuda.is_available() and own["cuda"]:
        torch.cuda.set_rng_state_all(own["cuda"])
    return True


def _save_resume_state(path: Path, model, optimizer, state: dict, meta: dict, rng: dict, elapsed: float) -> None:
    save_checkpoint(path, {
        "state_dict": cpu_copy(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "trainer": state,
        "rng": rng,
        "meta": meta,
        "elapsed_seconds": elapsed,
    })


def _flat(record: dict, prefix: str) -> dict:
    flat = {f"{prefix}train/loss": record["train_loss"], f"{prefix}epoch": record["epoch"]}
    for key, value in record.get("valid", {}).items():
        flat[f"{prefix}valid/{key}"] = value
    return flat
