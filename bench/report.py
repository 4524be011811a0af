"""One result line per metric, in the format every benchmark shares (DESIGN.md §8).

``metric=<name> ours=<v> peer=<v> unit=<u> ratio=<ours/peer> goal=<op><n> met=yes|no``
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

_GOAL_OPS = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    ours: float
    peer: float
    unit: str
    goal: str  # "<=1.3" or ">=0.5": the bound the ratio ours/peer must meet

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("inf")

    @property
    def met(self) -> bool:
        op, bound = self.goal[:2], float(self.goal[2:])
        return _GOAL_OPS[op](self.ratio, bound)

    def line(self) -> str:
        return (f"metric={self.name} ours={_fmt(self.ours)} peer={_fmt(self.peer)} "
                f"unit={self.unit} ratio={self.ratio:.3f} goal={self.goal} "
                f"met={'yes' if self.met else 'no'}")

    def as_dict(self) -> dict[str, object]:
        return {"metric": self.name, "ours": self.ours, "peer": self.peer, "unit": self.unit,
                "ratio": round(self.ratio, 4), "goal": self.goal, "met": self.met}


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
