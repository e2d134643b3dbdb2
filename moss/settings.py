"""The kinds of value a setting takes, with their limits: annotations for the parameters that take them.

A parameter declares its own limits (`num_workers: Workers`), and `moss.config_schema` checks every setting of
a config against the annotations of the parameter it reaches, before anything is built: one declaration, one
check. pydantic reads the annotations; at run time they are plain `int`, `float` and `dict`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, with_config
from typing_extensions import Required, TypedDict  # pydantic reads only these before Python 3.12

__all__ = ["Required", "TypedDict"]  # mapping settings are declared with these (`strict`)

Count = Annotated[int, Field(ge=1)]  # a number of things, at least one
Size = Annotated[int, Field(ge=0)]  # a number of things, possibly none
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what numpy and Lightning's seed_everything take
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a finite number above zero (a rate, a weight)
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # a share, a fraction of a whole
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# Rows of one pack or padded batch: above 2^18 rows the activations of the 2B model outgrow an 80 GB GPU even
# with checkpointing, and the attention masks of the padded path outgrow host memory.
Rows = Annotated[int, Field(ge=1, le=1 << 18)]
# Samples held in memory at once by a loader worker (a sample's codes are up to a few MB).
Buffer = Annotated[int, Field(ge=0, le=100_000)]
Workers = Annotated[int, Field(ge=0, le=256)]  # loader processes per rank

# A mapping setting refuses keys it does not know and non-finite numbers, like a parameter list does.
strict = with_config(ConfigDict(extra="forbid", allow_inf_nan=False))
