"""A step loader's saved position belongs to one reader layout: another is refused in one line, naming it."""

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from moss.data.loader import StepLoader
from moss.errors import ConfigError


def loader(workers: int) -> StepLoader:
    return StepLoader(StatefulDataLoader(list(range(12)), batch_size=2, num_workers=workers), accumulate=1, steps=6)


def test_a_position_saved_with_other_loader_workers_is_refused_naming_both():
    saved = loader(2)
    steps = iter(saved)
    next(steps)
    state = saved.state_dict()
    assert state["ranks"][0]["workers"] == 2
    with pytest.raises(ConfigError, match="read by 2 loader workers per rank, this run has 0.*data.num_workers=2"):
        loader(0).load_state_dict(state)
    again = loader(2)
    again.load_state_dict(state)
    assert [int(b.micro[0][0]) for b in again] == [2, 4, 6, 8, 10]
    saved.close()
