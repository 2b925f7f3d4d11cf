"""Match decisions: whether a robot should trust a frame's best place.

Every match is reported; ``accepted`` says whether to act on it, and ``reason`` why not:

* ``low_score``: its similarity is below ``min_score`` (``--min-score``);
* ``inconsistent``: fewer than ``consistency`` consecutive processed frames (``--consistency``)
  agree on the place: each frame's best place lies within ``window`` places (map order, which is
  the route's order for a map built from a drive) of the previous frame's. ORB-SLAM2 accepts a
  loop closure after 3 consistent candidates (``mnCovisibilityConsistencyTh = 3``,
  shared/research/round2-anchors.md §4); sequence filters can also hurt with DINOv2 descriptors,
  so the rule is off (1) by default. A frame below ``min_score`` breaks the chain; frames that
  failed or were dropped do not count;
* ``no_place``: the map returned nothing.

``python -m runtime evaluate --target-precision P --save-threshold`` measures the score threshold
that reaches precision P and saves it with the map: an ``acceptance`` entry of the map's metadata,
written as a new map version under the writer lock (``runtime.maps.set_metadata``), so it travels
with the map and a rebuilt map starts without one; ``localize`` reads it unless ``--min-score`` is
given.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import UserError

ACCEPTANCE_KEY = "acceptance"  # the map metadata entry that holds a saved rule


class DecisionError(UserError, ValueError):
    """A decision option or a saved rule that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class DecisionRule:
    min_score: Optional[float] = None
    consistency: int = 1
    window: int = 3

    def __post_init__(self) -> None:
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise DecisionError(f"--min-score {self.min_score}: expected a finite similarity score")
        if int(self.consistency) != self.consistency or self.consistency < 1:
            raise DecisionError(f"--consistency {self.consistency}: expected a whole number of frames >= 1")
        if int(self.window) != self.window or self.window < 0:
            raise DecisionError(f"--consistency-window {self.window}: expected a whole number of places >= 0")

    def describe(self) -> str:
        parts = [f"score >= {self.min_score:.4f}" if self.min_score is not None else "any score"]
        if self.consistency > 1:
            parts.append(f"{self.consistency} consecutive frames within {self.window} places")
        return ", ".join(parts)


@dataclass
class Decision:
    accepted: bool
    reason: str  # "ok", "low_score", "inconsistent" or "no_place"
    consistent: int  # frames in the current chain of agreeing frames, this one included


class Decider:
    """Applies a rule to the frames of one stream, in order (it remembers the chain)."""

    def __init__(self, rule: DecisionRule = DecisionRule()) -> None:
        self.rule = rule
        self._last: Optional[int] = None
        self._chain = 0

    def decide(self, index: Optional[int], score: Optional[float]) -> Decision:
        rule = self.rule
        if index is None or index < 0 or score is None:
            self._last, self._chain = None, 0
            return Decision(False, "no_place", 0)
        if rule.min_score is not None and score < rule.min_score:
            self._last, self._chain = None, 0
            return Decision(False, "low_score", 0)
        near = self._last is not None and abs(index - self._last) <= rule.window
        self._chain = self._chain + 1 if near else 1
        self._last = index
        if self._chain < rule.consistency:
            return Decision(False, "inconsistent", self._chain)
        return Decision(True, "ok", self._chain)


def save_acceptance(map_dir: Union[str, Path], rule: DecisionRule, measured: dict, bundle: dict) -> str:
    """Save a measured rule with the map, as a new map version; returns that version."""
    from .maps import set_metadata

    payload = {"rule": asdict(rule), "measured": measured, "bundle": bundle,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return set_metadata(map_dir, {ACCEPTANCE_KEY: payload})


def load_acceptance(place_map) -> Optional[dict]:
    """The rule saved with a loaded map ({'rule': DecisionRule, 'measured', 'bundle'}), or None."""
    payload = place_map.metadata.get(ACCEPTANCE_KEY)
    if payload is None:
        return None
    try:
        r = payload["rule"]
        rule = DecisionRule(None if r["min_score"] is None else float(r["min_score"]), int(r["consistency"]),
                            int(r["window"]))
        return {"rule": rule, "measured": dict(payload.get("measured") or {}), "bundle": dict(payload["bundle"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise DecisionError(f"{place_map.folder}: unusable saved decision rule ({exc}); save it again with "
                            "python -m runtime evaluate --map ... --save-threshold") from exc
