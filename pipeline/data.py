"""Training data: shards -> this rank's :class:`ContrastiveBatch` for every step, built in DataLoader workers.

`TrainData` owns the split (train / held-out validation per dataset), the homogeneous schedule and the number of
hard negatives per dataset (``loss.hard_negatives[type]``, capped by the widest negative list the dataset has).
`StepBatches` is a map-style dataset indexed by step: item s is rank r's slice of global batch s of the epoch, with
tokens copied out of the memory map; a DataLoader iterates it from any step on, so resuming mid-epoch is one
sampler offset. Workers open the shards themselves (memory maps are not shipped between processes).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.batch import ContrastiveBatch
from pipeline.config import DataConfig, LossConfig
from pipeline.sampler import HomogeneousSchedule, sample_negatives, split_validation
from pipeline.shards import ShardDataset, ShardReader


@dataclass(frozen=True)
class DataPlan:
    """What the data side decided: picklable, shipped to DataLoader workers."""

    shards: str
    datasets: tuple[str, ...]
    n_neg: dict[str, int]
    seed: int
    per_device_batch: int
    world_size: int


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
    ds: ShardDataset, query_ids: np.ndarray, n_neg: int, *, seed: int, epoch: int
) -> ContrastiveBatch:
    """Token arrays (copied out of the map) of the given queries, their positives and sampled negatives."""
    queries = [np.array(ds.queries[int(q)]) for q in query_ids]
    pos_ids = ds.positives[query_ids]
    positives = [np.array(ds.corpus[int(p)]) for p in pos_ids]
    negatives = []
    for q, p in zip(query_ids, pos_ids):
        picks = sample_negatives(
            ds.negatives[int(q)], n_neg, positive=int(p), n_docs=ds.num_docs, seed=seed, epoch=epoch,
            dataset=ds.name, query=int(q),
        )
        negatives.extend(np.array(ds.corpus[int(j)]) for j in picks)
    return ContrastiveBatch(queries, positives, negatives, n_neg, ds.type)


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
        global_batch = self.schedule.batch(self.epoch, step)
        ids = self.schedule.rank_slice(global_batch, self.rank, self.plan.world_size)
        return global_batch.dataset, build_batch(
            self.reader[global_batch.dataset], ids, self.plan.n_neg[global_batch.dataset],
            seed=self.plan.seed, epoch=self.epoch,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("reader", None)
        return state


class TrainData:
    """Train/validation split, schedule and loaders over a shard directory."""

    def __init__(
        self, cfg: DataConfig, loss: LossConfig, *, seed: int, per_device_batch: int, world_size: int, rank: int
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.reader = ShardReader(cfg.shards, datasets=cfg.datasets, verify=cfg.verify_checksums)
        names = sorted(self.reader.datasets)
        splits = {n: split_validation(self.reader[n].num_queries, cfg.validation_fraction, seed, n) for n in names}
        self.train_ids = {n: s[0] for n, s in splits.items()}
        self.val_ids = {n: s[1] for n, s in splits.items()}
        self.plan = DataPlan(
            shards=cfg.shards,
            datasets=tuple(names),
            n_neg=negatives_per_dataset(self.reader, names, loss),
            seed=seed,
            per_device_batch=per_device_batch,
            world_size=world_size,
        )
        self.schedule = HomogeneousSchedule(
            self.train_ids, per_device_batch * world_size, seed, cfg.sampling_temperature
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
            prefetch_factor=4 if workers > 0 else None,
            collate_fn=_identity,
            persistent_workers=False,
            # Own generator: creating the iterator must not draw from the global torch RNG (exact resume).
            generator=torch.Generator().manual_seed(self.plan.seed + epoch),
        )

    def validation_batches(self) -> Iterator[ContrastiveBatch]:
        """This rank's validation batches: each dataset's held-out queries in per-device batches, the same count
        on every rank (a dataset contributes floor(n_val / (B * world)) steps)."""
        per_rank = self.plan.per_device_batch
        world = self.plan.world_size
        for name in self.plan.datasets:
            ids = self.val_ids[name]
            steps = len(ids) // (per_rank * world)
            for s in range(steps):
                start = (s * world + self.rank) * per_rank
                yield build_batch(
                    self.reader[name], ids[start : start + per_rank], self.plan.n_neg[name],
                    seed=self.plan.seed, epoch=0,
                )


def _identity(item: tuple[str, ContrastiveBatch]) -> tuple[str, ContrastiveBatch]:
    return item


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
