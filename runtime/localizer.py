"""``Localizer``: one camera frame in, its place out. Part of the public API
(``from runtime import Localizer``).

It is the localization loop's own pipeline (``runtime/pipeline.py``: preprocess, inference,
search, re-ranking, decision) called one frame at a time by the robot's code instead of by the
loop: the same ``Match``, the same decisions, and the decision state (the chain that
``consistency`` counts) carries from one call to the next, as it does from frame to frame in the
loop. ``python -m runtime localize`` opens a ``Localizer`` and runs the loop over it
(``Localizer.loop``), so the CLI and a robot's code share one path.
"""
from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

from .bundle import Bundle
from .decisions import DecisionRule, load_acceptance
from .encoder import Encoder
from .errors import OptionError
from .inputs import to_rgb
from .loop import LocalizationLoop, LoopConfig, search_threads
from .maps import PlaceMap, bundle_identity, check_compatible, load_map
from .maps.search import faiss_threads
from .pipeline import Match, Pipeline
from .sources import Frame
from .timing import StageTimer

LOOP_OPTIONS = tuple(f.name for f in fields(LoopConfig) if f.name != "rule")
RULE_KEYS = ("model", "dim", "preprocessing", "batch_mode")  # a saved rule holds only for this model


def decision_rule(place_map: PlaceMap, identity: dict, min_score: Optional[float] = None,
                  consistency: Optional[int] = None,
                  window: Optional[int] = None) -> Tuple[DecisionRule, List[str], Optional[str]]:
    """The decision rule: each option given, else the rule saved with the map (``evaluate
    --save-threshold``) when it was measured with this model, else the defaults. Returns the rule,
    warnings, and a line saying where the min score came from (None when not from the map)."""
    saved = load_acceptance(place_map)
    base, warnings, source = DecisionRule(), [], None
    if saved is not None:
        where = f"the rule saved with {place_map.folder}"
        if any(saved["bundle"].get(k) != identity.get(k) for k in RULE_KEYS):
            warnings.append(f"{where} was measured with another model; ignored (run evaluate --save-threshold again)")
        else:
            base = saved["rule"]
            if saved["bundle"].get("onnx_sha256") != identity.get("onnx_sha256"):
                warnings.append(f"{where} was measured with another build of this model "
                                f"({saved['bundle'].get('precision')}); check it with evaluate")
            if min_score is None and base.min_score is not None:
                m = saved["measured"]
                source = (f"min score {base.min_score:.4f} from {where} (precision "
                          f"{m.get('precision', float('nan')):.4f}, recall {m.get('recall', float('nan')):.4f} "
                          f"on {m.get('dataset', '?')})")
    rule = DecisionRule(base.min_score if min_score is None else min_score,
                        base.consistency if consistency is None else consistency,
                        base.window if window is None else window)
    return rule, warnings, source


class Localizer:
    """A bundle and a map: ``localize(image)`` returns the image's ``Match``.

    ``Localizer.open(bundle, map, ...)`` is the way in. ``warnings`` lists what opening found
    worth saying (an INT8 bundle on a float map, a batch-coupled model, a saved rule that does not
    apply); ``rule_source`` says where the min score came from when the map supplied it. ``with``
    (or ``close()``) releases the backend and the map's lease. Not thread-safe: one caller at a
    time, frames in their order (the decision chain follows the calls)."""

    def __init__(self, encoder: Encoder, place_map: PlaceMap, config: LoopConfig = LoopConfig(),
                 warnings: Optional[List[str]] = None, rule_source: Optional[str] = None) -> None:
        self.encoder, self.map, self.config = encoder, place_map, config
        self.warnings = list(warnings or [])
        self.rule_source = rule_source
        self.timer = StageTimer()
        self.pipeline = Pipeline(encoder, place_map, config.top_k, config.rerank, config.rule, self.timer)
        self._threads = search_threads(place_map, config.search_threads)
        self._frames = 0

    @classmethod
    def open(cls, bundle: Union[str, Path, Bundle], map: Union[str, Path], *, threads: Optional[int] = None,
             device: str = "cpu", batch_size: Optional[int] = None, cuda_graph: bool = False,
             min_score: Optional[float] = None, consistency: Optional[int] = None,
             consistency_window: Optional[int] = None, verify: str = "quick", **loop_options: Any) -> "Localizer":
        """Open a bundle (``Encoder.from_bundle``: ``threads``, ``device``, ``batch_size``,
        ``cuda_graph``) and a map built with it (``verify``: how much of the map loading checks,
        ``runtime/maps/reader.py``), and check that they belong together.

        Decisions: ``min_score``, ``consistency`` (K consecutive frames agreeing) and
        ``consistency_window`` (places within which they agree); each one not given comes from the
        rule saved with the map, else from the defaults (any score, K = 1, 3 places).
        ``loop_options``: the other fields of ``runtime.loop.LoopConfig`` (``top_k``, ``rerank``,
        ``search_threads``; ``budget_ms``, ``queue_size``, ``batch_wait`` and ``probe_interval``
        matter to ``loop`` only). Raises a ``UserError`` naming the problem: a bad bundle or map,
        a map from other weights, an unknown or out-of-range option."""
        unknown = sorted(set(loop_options) - set(LOOP_OPTIONS))
        if unknown:
            raise OptionError(f"unknown option {', '.join(unknown)}; the loop's options are {', '.join(LOOP_OPTIONS)}")
        encoder = Encoder.from_bundle(bundle, threads=threads, device=device, batch_size=batch_size,
                                      cuda_graph=cuda_graph)
        place_map = None
        try:
            place_map = load_map(map, verify)
            identity = bundle_identity(encoder.bundle)
            warnings = check_compatible(place_map.meta["bundle"], identity, Path(map))
            if encoder.bundle.batch_mode == "batched":
                warnings.append("this bundle's descriptors depend on their batch-mates (CricaVPR batched mode); "
                                "the loop's micro-batches change them. Prefer the -independent model for localization.")
            rule, rule_warnings, source = decision_rule(place_map, identity, min_score, consistency, consistency_window)
            config = LoopConfig(rule=rule, **loop_options)
            return cls(encoder, place_map, config, warnings + rule_warnings, source)
        except BaseException:
            if place_map is not None:
                place_map.close()
            encoder.close()
            raise

    @property
    def rule(self) -> DecisionRule:
        """The decision rule in force."""
        return self.config.rule

    def localize(self, image: Any, bgr: bool = False, name: Optional[str] = None) -> Match:
        """The ``Match`` of one image: ``place`` (its name in the map), ``index`` (its row), ``score``
        (inner product of L2-normalised descriptors: cosine similarity), ``pose`` (the map's pose
        of that place, a list of floats, or None when the map has none), ``accepted`` and
        ``reason`` (``ok``, ``low_score``, ``inconsistent``, ``no_place``), ``top_k`` (the best K
        places, best first), ``times_ms`` (per stage: ``decode`` is the conversion of the input,
        ``total`` the whole call) and ``to_dict()`` / ``to_json()``, the loop's JSON record.

        ``image``: a numpy array (H, W, 3) uint8 RGB, or BGR with ``bgr=True`` (grey, RGBA,
        uint16 and float [0, 1] arrays are converted: ``runtime/inputs.py``), a PIL image or a
        path. ``name`` names the frame in the record (default ``frame000000``, counting calls)."""
        arrival = time.perf_counter()
        rgb = to_rgb(image, bgr)
        ready = time.perf_counter()
        index = self._frames
        self._frames += 1
        frame = Frame(index, name or f"frame{index:06d}", arrival, rgb, decode_ms=(ready - arrival) * 1000, ready=ready)
        with faiss_threads(self._threads):
            return self.pipeline.run([frame], ready)[0]

    def loop(self, on_result: Optional[Callable[[dict], None]] = None) -> LocalizationLoop:
        """A localization loop over this bundle and map, with this localizer's options (its own
        decision chain): ``loop(on_result).run(source)`` runs a folder, video or camera under the
        latency budget, ``on_result`` receiving each frame's record (``runtime/loop.py``)."""
        return LocalizationLoop(self.encoder, self.map, self.config, on_result)

    def close(self) -> None:
        """Release the backend and the map (its reader's lease). Safe to call twice."""
        self.encoder.close()
        self.map.close()

    def __enter__(self) -> "Localizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
