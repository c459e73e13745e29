"""The dimensions a search space is made of: a float range, an integer range, or a list of choices. Each knows how
Optuna samples it and what a grid over it is; `config.SearchSpace` gives every hyperparameter the dimension its type
takes. Nothing here imports Optuna: a trial is anything with Optuna's suggest_* methods.
"""
from __future__ import annotations

import math
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag, field_validator, model_validator


class Strict(BaseModel):
    # strict: a YAML `true` is not taken for 1, nor 2.5 for an integer (an int still counts as a float)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


GRID_POINTS = 5  # a grid over a continuous (or long integer) range takes this many points


class FloatRange(Strict):
    low: float = Field(description="smallest value tried")
    high: float = Field(description="largest value tried")
    log: bool = Field(False, description="sample on a log scale")

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def grid(self) -> list[float]:
        if self.log:
            lo, hi = math.log10(self.low), math.log10(self.high)
            return [float(10 ** (lo + (hi - lo) * i / (GRID_POINTS - 1))) for i in range(GRID_POINTS)]
        return [self.low + (self.high - self.low) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]

    def values(self) -> list:
        return [self.low, self.high]


class IntRange(Strict):
    low: int = Field(description="smallest value tried")
    high: int = Field(description="largest value tried")

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        return self

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high)

    def grid(self) -> list[int]:
        if self.high - self.low < 2 * GRID_POINTS:
            return list(range(self.low, self.high + 1))
        return sorted({round(self.low + (self.high - self.low) * i / (GRID_POINTS - 1)) for i in range(GRID_POINTS)})

    def values(self) -> list:
        return [self.low, self.high]


class Choices(RootModel[list]):
    """A list of values tried as categories (in the YAML: `head_size: [0, 32, 64]`)."""

    @field_validator("root")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("the list of choices is empty; give at least one value")
        if len(set(map(repr, v))) != len(v):
            raise ValueError("the choices repeat; list each value once")
        return v

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, self.root)

    def grid(self) -> list:
        return list(self.root)

    def values(self) -> list:
        return list(self.root)


Dimension = FloatRange | IntRange | Choices


def dimension_type(annotation) -> Any:
    """The search dimension a hyperparameter of this type takes: a range (a mapping) for numbers, or choices (a
    list) for anything. The tag keeps pydantic from trying one against the other."""
    kinds = {a for a in typing.get_args(annotation) if a is not type(None)} or {annotation}
    number = FloatRange if float in kinds else IntRange if int in kinds and bool not in kinds else None
    if number is None:
        return Choices | None
    tagged = Annotated[number, Tag("range")] | Annotated[Choices, Tag("choices")]
    return Annotated[tagged, Discriminator(lambda v: "choices" if isinstance(v, (list, Choices)) else "range")] | None
