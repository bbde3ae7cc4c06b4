"""Homogeneous global-batch schedule (F2LLM's "homogeneous macro batches") and hard-negative sampling.

Every optimizer step draws ONE global batch of up to G = per_device_batch x world_size queries from ONE dataset,
so all ranks compute the same loss type and in-batch candidates come from the same task. Per epoch e:

* each dataset d's training queries are permuted with a RNG seeded by (seed, e, d) and cut into ceil(n_d / G)
  global batches: full ones and one last, smaller batch of n_d mod G queries, so every training query is trained
  once per epoch (datasets smaller than G are one small batch). With ``data.drop_last`` the remainder is dropped
  instead (floor(n_d / G) batches; the permutation differs every epoch) and datasets smaller than G are not
  trained;
* with sampling temperature T = 1 the epoch is a random order (seed, e) of all those batches: equivalent to F2LLM
  choosing, at every step, a dataset with probability proportional to its remaining batches;
* with T != 1 each step picks dataset d with probability p_d ~ n_batches_d ** (1 / T) (T > 1 flattens towards
  uniform), cycling through d's permuted batches; the epoch length stays sum_d n_batches_d.

Rank r takes its share of the global batch (:func:`rank_share`: contiguous, sizes differing by at most one, B each
for a full batch; a rank may get none of a batch smaller than the world size). Every rank takes every step: a rank
with fewer queries runs GradCache's dummy chunks, and the loss weights each rank by its queries
(:mod:`pipeline.training.losses`). Everything is a pure function of (seed, epoch, step): a resumed run sees exactly
the batches it would have seen.

Validation: a fraction of each dataset's queries, chosen with a RNG seeded by (seed, d) and fixed for the run, is
held out of training. The split is by query: rows whose query token sequences are identical (a JSONL line with
several positives becomes one row per positive) are held out or trained together, never split.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def _key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def split_validation(
    groups: np.ndarray, fraction: float, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train row ids, validation row ids) of one dataset, split by query.

    `groups[i]` is the query of row i (dense ids 0..n_groups-1, numbered by first appearance:
    :func:`pipeline.data.shards.identical_rows`). round(fraction * n_groups) queries are held out - at least one
    when fraction > 0 and the dataset has more than one query - with every row of each. With one row per query
    (groups = 0, 1, 2, ...) this is a permutation of the rows cut at round(fraction * n)."""
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    order = np.random.default_rng([seed, _key(name), 1]).permutation(n_groups)
    n_val = int(round(fraction * n_groups))
    if fraction > 0 and n_val == 0 and n_groups > 1:
        n_val = 1
    held = np.zeros(n_groups, dtype=bool)
    held[order[:n_val]] = True
    is_val = held[groups]
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def rank_share(query_ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of a global batch: sizes differ by at most one, lower ranks take the extra
    query (``numpy.array_split``); B each when the batch holds B x world_size queries, none for some ranks when it
    holds fewer queries than ranks."""
    return np.array_split(query_ids, world_size)[rank]


def batch_count(n_queries: int, global_batch: int, drop_last: bool) -> int:
    """Global batches of `n_queries` queries: ceil(n / G), or floor(n / G) with `drop_last`."""
    return n_queries // global_batch if drop_last else -(-n_queries // global_batch)


@dataclass(frozen=True)
class ScheduledBatch:
    dataset: str
    query_ids: np.ndarray  # the global batch: G query row ids of `dataset` (fewer in a dataset's last batch)


class HomogeneousSchedule:
    """Deterministic per-epoch list of single-dataset global batches (see module docstring)."""

    def __init__(
        self,
        train_ids: dict[str, np.ndarray],
        global_batch: int,
        seed: int,
        temperature: float = 1.0,
        drop_last: bool = False,
    ) -> None:
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if temperature <= 0:
            raise ValueError(f"data.sampling_temperature must be > 0, got {temperature}")
        self.global_batch = global_batch
        self.seed = seed
        self.temperature = temperature
        self.drop_last = drop_last
        self.train_ids = {name: ids for name, ids in sorted(train_ids.items())}
        self.n_batches = {name: batch_count(len(ids), global_batch, drop_last) for name, ids in self.train_ids.items()}
        self.datasets = [name for name, n in self.n_batches.items() if n > 0]
        self.skipped = [name for name, n in self.n_batches.items() if n == 0]
        if not self.datasets:
            sizes = ", ".join(f"{n}: {len(ids)}" for n, ids in self.train_ids.items())
            what = f"a full global batch of {global_batch} (data.drop_last)" if drop_last else "any"
            raise ValueError(f"no dataset has {what} training queries ({sizes})")

    def skip_reason(self, name: str) -> str:
        """Why dataset `name` (one of ``skipped``) is not trained on."""
        n = len(self.train_ids[name])
        if n == 0:
            return "no training queries (all held out for validation, or none): not trained on"
        return f"{n} training queries, fewer than one global batch of {self.global_batch} (data.drop_last): not trained on"

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.n_batches[d] for d in self.datasets)

    def probabilities(self) -> np.ndarray:
        """p_d ~ n_batches_d ** (1 / T) of each trained dataset (order of ``datasets``), summing to 1: the chance
        that a step draws from d (T = 1: d's share of the epoch's batches)."""
        weights = np.array([self.n_batches[d] for d in self.datasets], dtype=np.float64) ** (1.0 / self.temperature)
        return weights / weights.sum()

    def _dataset_order(self, name: str, epoch: int, cycle: int = 0) -> np.ndarray:
        """`name`'s training queries in the order (seed, epoch, cycle): batch k is [k*G, (k+1)*G) of it."""
        ids = self.train_ids[name]
        return ids[np.random.default_rng([self.seed, epoch, _key(name), cycle]).permutation(len(ids))]

    @lru_cache(maxsize=2)
    def epoch_plan(self, epoch: int) -> tuple[list[str], list[int]]:
        """(dataset of each step, index of that dataset's batch) for `epoch`."""
        rng = np.random.default_rng([self.seed, epoch, 0xD5])
        if self.temperature == 1.0:
            owners = np.repeat(np.arange(len(self.datasets)), [self.n_batches[d] for d in self.datasets])
            owners = owners[rng.permutation(len(owners))]
        else:
            owners = rng.choice(len(self.datasets), size=self.steps_per_epoch, p=self.probabilities())
        counters = np.zeros(len(self.datasets), dtype=np.int64)
        names, index = [], []
        for owner in owners:
            names.append(self.datasets[owner])
            index.append(int(counters[owner]))
            counters[owner] += 1
        return names, index

    def batch(self, epoch: int, step: int) -> ScheduledBatch:
        """The global batch of `step` (0-based, within `epoch`)."""
        names, index = self.epoch_plan(epoch)
        name, k = names[step], index[step]
        n = self.n_batches[name]
        cycle, k = divmod(k, n)
        g = self.global_batch
        return ScheduledBatch(name, self._dataset_order(name, epoch, cycle)[k * g : (k + 1) * g])

    def rank_slice(self, batch: ScheduledBatch, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s queries of `batch` (:func:`rank_share`)."""
        return rank_share(batch.query_ids, rank, world_size)


@dataclass(frozen=True)
class NegativePicks:
    """The negatives a query gets at one step: corpus ids, and for each the pool slot it was taken from (-1 for a
    random corpus document, when the pool is empty). ``pool[slots] == ids`` wherever ``slots >= 0``; the slots
    select the matching teacher scores (column 1 + slot of the dataset's scores, :mod:`pipeline.data.shard_format`)."""

    ids: np.ndarray  # [n_neg] int64 corpus ids
    slots: np.ndarray  # [n_neg] int64 indices into the pool row, -1 = not from the pool


def sample_negatives(
    pool: np.ndarray, n_neg: int, *, positive: int, n_docs: int, seed: int, epoch: int, dataset: str, query: int
) -> NegativePicks:
    """`n_neg` hard negatives for one query, a pure function of (seed, epoch, dataset, query).

    `pool` is the query's row of negative ids (-1 = empty slot). The positive's own id is never a negative (a pool
    that lists it - e.g. the same document mined for a query with several positives - has that slot left out of the
    draw). Slots are drawn without replacement when the pool has at least `n_neg` valid ones, with replacement when
    it has fewer, and random corpus documents other than the positive are taken when it has none (so every query of
    a batch gets the same number of negatives).
    """
    if n_neg == 0:
        empty = np.zeros(0, dtype=np.int64)
        return NegativePicks(empty, empty)
    rng = np.random.default_rng([seed, epoch, _key(dataset), query, 7])
    valid = np.flatnonzero((pool >= 0) & (pool != positive))
    if len(valid) > 0:
        slots = rng.choice(valid, size=n_neg, replace=len(valid) < n_neg).astype(np.int64)
        return NegativePicks(pool[slots].astype(np.int64), slots)
    if n_docs <= 1:
        raise ValueError(f"dataset {dataset}: query {query} has no hard negatives and the corpus has one document")
    picks = rng.integers(0, n_docs - 1, size=n_neg)
    return NegativePicks((picks + (picks >= positive)).astype(np.int64), np.full(n_neg, -1, dtype=np.int64))
