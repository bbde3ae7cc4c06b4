"""Streams of rows for the preprocess jobs: fixed-size batches, and a progress bar that opens at the first item."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter), in order."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def progress(items: Iterable[T], desc: str, unit: str, *, total: int | None = None,
             count: Callable[[Any], int] | None = None) -> Iterator[T]:
    """`items` with a progress bar of `unit`s, opened at the first item (a file that cannot be read fails before any
    bar is drawn); each item advances it by ``count(item)`` (default 1: e.g. ``count=len`` for batches of rows)."""
    bar: tqdm | None = None
    try:
        for item in items:
            if bar is None:
                bar = tqdm(desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=0.5)
            yield item
            bar.update(1 if count is None else count(item))
    finally:
        if bar is not None:
            bar.close()
