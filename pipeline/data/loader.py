"""Training data: shards -> this rank's :class:`ContrastiveBatch` for every step, built in DataLoader workers.

`TrainData` owns the split (train / held-out validation per dataset, by query text), the homogeneous schedule and
the number of hard negatives per dataset (``loss.hard_negatives[type]``, capped by the widest negative list the
dataset has).
`StepBatches` is a map-style dataset indexed by step: item s is rank r's slice of global batch s of the epoch, with
tokens copied out of the memory map; a DataLoader iterates it from any step on, so resuming mid-epoch is one
sampler offset. Workers open the shards themselves (memory maps are not shipped between processes).
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.batch import ContrastiveBatch
from pipeline.config import DataConfig, LossConfig
from pipeline.resilience.preemption import DataWorkerInit
from pipeline.data.sampler import HomogeneousSchedule, batch_count, rank_share, sample_negatives, split_validation
from pipeline.data.shard_format import CORPUS, MANIFEST, QUERIES, SCORES_FILE, ShardError, tables_sha256
from pipeline.data.shards import ShardDataset, ShardReader, identical_rows, read_manifest


@dataclass(frozen=True)
class DataPlan:
    """What the data side decided: picklable, shipped to DataLoader workers."""

    shards: str
    datasets: tuple[str, ...]
    n_neg: dict[str, int]
    seed: int
    per_device_batch: int
    world_size: int
    teacher_scores: bool = False  # batches carry the teacher scores of their candidates (loss.score_distill)


def select_datasets(cfg: DataConfig, manifest: dict[str, Any]) -> list[str]:
    """The datasets to train on (``data.datasets``, default all), sorted; a name the shards lack is a ShardError
    naming the key."""
    have = list(manifest["datasets"])
    if cfg.datasets is None:
        return sorted(have)
    if not cfg.datasets:
        raise ShardError("data.datasets: empty list (null = every dataset of the shards)")
    missing = [n for n in cfg.datasets if n not in have]
    if missing:
        raise ShardError(
            f"data.datasets: {', '.join(missing)} not in the shards {cfg.shards}/{MANIFEST} (have: {', '.join(have)})"
        )
    return sorted(set(cfg.datasets))


def node_share() -> tuple[int, int]:
    """(local rank, processes on this node) from the launcher's environment (torchrun: LOCAL_WORLD_SIZE,
    deepspeed: LOCAL_SIZE); (0, 1) in a plain process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if not 0 <= local_rank < local_size:
        return 0, 1
    return local_rank, local_size


def check_data(
    cfg: DataConfig, tokenizer: Any | None = None, *, verify: bool | None = None, scores: bool = False
) -> ShardReader:
    """Check the shard directory before training, cheapest first; raises ShardError with a one-line message.

    1. ``data.shards`` is set, the directory and its manifest exist and parse (format, version, entries);
    2. every dataset of ``data.datasets`` is in the shards;
    3. every file of those datasets exists with the manifest's size (``stat``: a truncated file is caught here);
    4. `tokenizer` (when given) is the one the shards were built with;
    5. when `scores` (``loss.score_distill``), every dataset has fitting teacher scores (:func:`check_teacher_scores`);
    6. when ``verify`` (default ``data.verify_checksums``) every file's sha256 matches the manifest. The ranks of a
       node split the files between them (:func:`node_share`), so hashing costs about total size / (local ranks x
       ~1 GiB/s); a rank that finds a bad file exits and the launcher stops the others.
    Returns the opened reader.
    """
    if not cfg.shards:
        raise ShardError("data.shards: not set (the shard directory written by `python -m preprocess build`)")
    names = select_datasets(cfg, read_manifest(cfg.shards))
    reader = ShardReader(cfg.shards, datasets=names)
    if tokenizer is not None:
        reader.check_tokenizer(tokenizer)
    if scores:
        check_teacher_scores(reader, names)
    if cfg.verify_checksums if verify is None else verify:
        part, parts = node_share()
        reader.verify_checksums(names, part=part, parts=parts)
    return reader


def check_teacher_scores(reader: ShardReader, names: list[str]) -> None:
    """``loss.score_distill``: every dataset of `names` has teacher scores written by `preprocess score` for the
    queries and corpus it holds now, [n_queries, 1 + K] float32. ShardError naming the key and the dataset (at start
    and at ``--check``: both call :func:`check_data`)."""
    for name in names:
        ds = reader[name]
        if not ds.has_scores:
            raise ShardError(f"loss.score_distill: {ds.root} has no teacher scores; run `python -m preprocess score "
                             f"{reader.root} --teacher MODEL_DIR` first")
        key, files = ds.meta["scores"].get("key") or {}, ds.meta["files"]
        if (key.get("queries_sha256"), key.get("corpus_sha256")) != (tables_sha256(files, QUERIES),
                                                                      tables_sha256(files, CORPUS)):
            raise ShardError(f"loss.score_distill: {ds.root / SCORES_FILE}: scored for other queries or another corpus "
                             f"than the dataset holds; rerun `python -m preprocess score {reader.root}`")
        try:
            _ = ds.scores  # opens the table: its shape must fit the queries and pools
        except ShardError as exc:
            raise ShardError(f"loss.score_distill: {exc}") from None


def negatives_per_dataset(reader: ShardReader, names: list[str], loss: LossConfig) -> dict[str, int]:
    """Hard negatives per query for each dataset: the configured count for its type, capped by what it has."""
    out = {}
    for name in names:
        ds = reader[name]
        wanted = loss.hard_negatives.get(ds.type)
        if wanted is None:
            raise ValueError(f"loss.hard_negatives: no count for dataset type {ds.type!r} (dataset {name})")
        n = min(wanted, ds.num_negatives) if ds.num_negatives else 0
        if n == 0 and ds.type not in loss.in_batch_types:
            raise ValueError(
                f"dataset {name} ({ds.type}) has no hard negatives, and its type trains on the hard-negative loss "
                "only; add negatives or list its type in loss.in_batch_types"
            )
        out[name] = n
    return out


def build_batch(
    ds: ShardDataset, query_ids: np.ndarray, n_neg: int, *, seed: int, epoch: int, teacher_scores: bool = False
) -> ContrastiveBatch:
    """Token arrays (copied out of the map) of the given queries (none: an empty batch), their positives with
    their corpus ids, and sampled negatives; with `teacher_scores`, the teacher's scores of exactly those candidates
    (:func:`picked_teacher_scores`)."""
    query_ids = np.asarray(query_ids, dtype=np.int64)
    queries = [np.array(ds.queries[int(q)]) for q in query_ids]
    pos_ids = np.array(ds.positives[query_ids], dtype=np.int64)
    positives = [np.array(ds.corpus[int(p)]) for p in pos_ids]
    negatives, slots = [], []
    for q, p in zip(query_ids, pos_ids):
        picks = sample_negatives(
            ds.negatives[int(q)], n_neg, positive=int(p), n_docs=ds.num_docs, seed=seed, epoch=epoch,
            dataset=ds.name, query=int(q),
        )
        negatives.extend(np.array(ds.corpus[int(j)]) for j in picks.ids)
        slots.append(picks.slots)
    scores = None
    if teacher_scores:
        picked = np.stack(slots) if slots else np.zeros((0, n_neg), dtype=np.int64)
        scores = picked_teacher_scores(ds.scores[query_ids], picked)
    return ContrastiveBatch(queries, positives, negatives, n_neg, ds.type, positive_ids=pos_ids, teacher_scores=scores)


def picked_teacher_scores(rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """[B, 1 + n_neg] float32: each query's teacher score of its positive (column 0 of its score row), then of each
    sampled negative (column 1 + slot), NaN for a negative that is not from the pool (slot -1)."""
    picked = np.where(slots >= 0, np.take_along_axis(rows[:, 1:], np.maximum(slots, 0), axis=1), np.nan)
    return np.concatenate([rows[:, :1], picked], axis=1).astype(np.float32)


def rank_batch(
    plan: DataPlan, schedule: HomogeneousSchedule, reader: ShardReader, epoch: int, step: int, rank: int
) -> tuple[str, ContrastiveBatch]:
    """(dataset name, rank `rank`'s slice of global batch `step` of `epoch`), as the training loop receives it."""
    global_batch = schedule.batch(epoch, step)
    ids = schedule.rank_slice(global_batch, rank, plan.world_size)
    return global_batch.dataset, build_batch(
        reader[global_batch.dataset], ids, plan.n_neg[global_batch.dataset], seed=plan.seed, epoch=epoch,
        teacher_scores=plan.teacher_scores,
    )


def worker_context() -> multiprocessing.context.BaseContext:
    """How DataLoader workers start: forked from a fork server, never from the rank itself.

    A rank has threads (gloo/NCCL, the rank-health heartbeat, tqdm's monitor); ``fork`` copies a process in which
    another thread may hold an interpreter lock, and on CPython before 3.12 the child can then block for ever in
    ``PyOS_AfterFork_Child`` (seen here: a worker stuck there at the start of an epoch, its rank waiting for its
    first batch until the collective timeout). The fork server is a fresh single-threaded process (started once per
    rank by fork+exec, which is safe in a threaded process); it imports this module up front so the workers it forks
    start warm. It exits once the rank and its workers are gone, and the workers exit when the rank is gone
    (:class:`pipeline.resilience.preemption.DataWorkerInit`)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class StepBatches(Dataset):
    """Item `step` = (dataset name, this rank's batch) of global step `step` of `epoch`."""

    def __init__(self, plan: DataPlan, schedule: HomogeneousSchedule, epoch: int, rank: int) -> None:
        self.plan = plan
        self.schedule = schedule
        self.epoch = epoch
        self.rank = rank

    @cached_property
    def reader(self) -> ShardReader:  # opened lazily, once per worker process
        return ShardReader(self.plan.shards, datasets=list(self.plan.datasets))

    def __len__(self) -> int:
        return self.schedule.steps_per_epoch

    def __getitem__(self, step: int) -> tuple[str, ContrastiveBatch]:
        return rank_batch(self.plan, self.schedule, self.reader, self.epoch, step, self.rank)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("reader", None)
        return state


class TrainData:
    """Train/validation split, schedule and loaders over a shard directory."""

    def __init__(
        self, cfg: DataConfig, loss: LossConfig, *, seed: int, per_device_batch: int, world_size: int, rank: int,
        verify: bool | None = None,
    ) -> None:
        """`verify`: hash every shard file (default ``data.verify_checksums``); False when :func:`check_data`
        already did."""
        self.cfg = cfg
        self.rank = rank
        self.reader = check_data(cfg, verify=verify)
        names = sorted(self.reader.datasets)
        splits = {n: split_validation(identical_rows(self.reader[n].queries), cfg.validation_fraction, seed, n)
                  for n in names}
        self.train_ids = {n: s[0] for n, s in splits.items()}
        self.val_ids = {n: s[1] for n, s in splits.items()}
        self.plan = DataPlan(
            shards=cfg.shards,
            datasets=tuple(names),
            n_neg=negatives_per_dataset(self.reader, names, loss),
            seed=seed,
            per_device_batch=per_device_batch,
            world_size=world_size,
            teacher_scores=loss.score_distill is not None,
        )
        self.schedule = HomogeneousSchedule(
            self.train_ids, per_device_batch * world_size, seed, cfg.sampling_temperature, drop_last=cfg.drop_last
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    def loader(self, epoch: int, start_step: int = 0) -> DataLoader:
        """Batches of `epoch` from `start_step` on, collated in `data.num_workers` worker processes."""
        dataset = StepBatches(self.plan, self.schedule, epoch, self.rank)
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=range(start_step, len(dataset)),
            num_workers=workers,
            multiprocessing_context=worker_context() if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
            collate_fn=_identity,
            persistent_workers=False,
            # SIGTERM/SIGINT: the rank stops after the step; a worker exits when its rank is gone
            worker_init_fn=DataWorkerInit(),
            # Own generator: creating the iterator must not draw from the global torch RNG (exact resume).
            generator=torch.Generator().manual_seed(self.plan.seed + epoch),
        )

    def most_step_tokens(self, steps: int, rank: int | None = None) -> int:
        """The most real tokens rank `rank` (default this rank) has in one of the first `steps` steps of epoch 0 (at
        most an epoch; 0 without steps), its batches built as training builds them (:func:`rank_batch`; no RNG
        state is touched)."""
        rank = self.rank if rank is None else rank
        return max((rank_batch(self.plan, self.schedule, self.reader, 0, step, rank)[1].real_tokens()
                    for step in range(min(steps, self.steps_per_epoch))), default=0)

    def validation_steps(self, name: str) -> int:
        """Validation batches of dataset `name`: ceil(held-out queries / global batch), the last one ragged."""
        return batch_count(len(self.val_ids[name]), self.plan.per_device_batch * self.plan.world_size,
                           drop_last=False)

    def validation_batches(self) -> Iterator[tuple[str, ContrastiveBatch]]:
        """(dataset, this rank's batch) for every validation step: each dataset's held-out queries in global
        batches of B x world (the last one smaller), split over the ranks like training batches
        (:func:`pipeline.data.sampler.rank_share`). Every rank gets the same steps; a rank's batch may be empty."""
        world = self.plan.world_size
        global_batch = self.plan.per_device_batch * world
        for name in self.plan.datasets:
            ids = self.val_ids[name]
            for s in range(self.validation_steps(name)):
                mine = rank_share(ids[s * global_batch : (s + 1) * global_batch], self.rank, world)
                yield name, build_batch(self.reader[name], mine, self.plan.n_neg[name], seed=self.plan.seed, epoch=0,
                                        teacher_scores=self.plan.teacher_scores)


def _identity(item: tuple[str, ContrastiveBatch]) -> tuple[str, ContrastiveBatch]:
    return item


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
