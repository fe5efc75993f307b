"""The resumable, sharded sampler."""

from __future__ import annotations

import itertools

import pytest

from ttt.data import DataError, ResumableSampler, epoch_permutation


def _take(sampler: ResumableSampler, n: int) -> list[list[int]]:
    """The next ``n`` batches, running on through epochs (like a training loop)."""
    out: list[list[int]] = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_deterministic_epochs() -> None:
    a = ResumableSampler(50, batch_size=8, seed=3)
    b = ResumableSampler(50, batch_size=8, seed=3)
    assert len(a) == 6
    ea, eb = list(a), list(b)
    assert ea == eb and a.epoch == 1
    flat = list(itertools.chain(*ea))
    assert len(flat) == 48 and len(set(flat)) == 48 and all(0 <= i < 50 for i in flat)
    assert list(a) != ea  # next epoch, another order
    assert list(ResumableSampler(50, batch_size=8, seed=4)) != ea
    # pinned order: no library RNG, same on every machine / version
    assert epoch_permutation(10, seed=0, epoch=0).tolist() == [4, 8, 0, 1, 7, 6, 2, 5, 3, 9]
    assert epoch_permutation(10, seed=7, epoch=3).tolist() == [2, 7, 6, 1, 8, 9, 0, 3, 4, 5]


def test_no_drop_last() -> None:
    s = ResumableSampler(10, batch_size=4, seed=0, drop_last=False)
    batches = list(s)
    assert [len(b) for b in batches] == [4, 4, 2] and len(s) == 3
    assert sorted(itertools.chain(*batches)) == list(range(10))


@pytest.mark.parametrize("stop", [1, 5, 6, 7, 13])
def test_resume_equality(stop: int) -> None:
    ref = _take(ResumableSampler(50, batch_size=8, seed=1), 20)
    s = ResumableSampler(50, batch_size=8, seed=1)
    first = _take(s, stop)
    state = s.state_dict()
    resumed = ResumableSampler(50, batch_size=8, seed=1)
    resumed.load_state_dict(state)
    assert first + _take(resumed, 20 - stop) == ref


def test_resume_mid_iteration_state() -> None:
    s = ResumableSampler(20, batch_size=4, seed=0)
    it = iter(s)
    next(it)
    next(it)
    assert s.state_dict()["position"] == 8 and s.state_dict()["epoch"] == 0
    r = ResumableSampler(20, batch_size=4, seed=0)
    r.load_state_dict(s.state_dict())
    assert next(iter(r)) == next(it)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_sharding_union(world_size: int) -> None:
    single = _take(ResumableSampler(64, batch_size=8, seed=5), 12)
    ranks = [ResumableSampler(64, batch_size=8, seed=5, rank=r, world_size=world_size)
             for r in range(world_size)]
    per_rank = [_take(s, 12) for s in ranks]
    for step in range(12):
        parts = [per_rank[r][step] for r in range(world_size)]
        assert all(len(p) == 8 // world_size for p in parts)
        assert list(itertools.chain(*parts)) == single[step]  # rank r holds the r-th contiguous slice


def test_resume_with_other_world_size() -> None:
    single = _take(ResumableSampler(64, batch_size=8, seed=2), 12)
    two = [ResumableSampler(64, batch_size=8, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in two:
        _take(s, 5)
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    four = [ResumableSampler(64, batch_size=8, seed=2, rank=r, world_size=4) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    per_rank = [_take(s, 7) for s in four]
    for step in range(7):
        assert list(itertools.chain(*(p[step] for p in per_rank))) == single[5 + step]
    one = ResumableSampler(64, batch_size=8, seed=2)
    one.load_state_dict(state)
    assert _take(one, 7) == single[5:]


def test_sampler_errors() -> None:
    with pytest.raises(DataError, match="only 5 rows, fewer than one global batch of 8"):
        ResumableSampler(5, batch_size=8, seed=0)
    with pytest.raises(DataError, match="batch_size 6 is not divisible by world_size 4"):
        ResumableSampler(50, batch_size=6, seed=0, world_size=4)
    with pytest.raises(DataError, match="rank 2 is not in a world of size 2"):
        ResumableSampler(50, batch_size=4, seed=0, rank=2, world_size=2)
    s = ResumableSampler(50, batch_size=4, seed=0)
    with pytest.raises(DataError, match="sampler state is for 40 rows, this dataset has 50"):
        s.load_state_dict({"epoch": 0, "position": 4, "num_rows": 40})
