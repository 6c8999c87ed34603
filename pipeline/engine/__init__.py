"""The engine: overlap-add over any separator, the one-track job, frame features and presence detectors.

Other packages import the engine through this package (``from demix.pipeline.engine import ...``). The
export list is a contract: names are added, never removed.
"""

from demix.pipeline.engine.batcher import BatchStats, DirectRunner, ModelBatcher, Ticket, make_runner
from demix.pipeline.engine.threads import Exclusive
from demix.pipeline.engine.features import BAND_EDGES_HZ, FRAME_S, Features, FrameFeatures, PresenceError, features_of
from demix.pipeline.engine.overlap_add import (
    SeparationSettings, add_separation_flags, separate, separate_stream, settings_kwargs, stage_for, track_stats,
    triangle_window,
)
from demix.pipeline.engine.presence import (
    CLASSIFIER_RULE, DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, DETECTORS, Detector, EnergyConfig, Hysteresis, Presence,
    Segment, classifier_activation, classifier_inputs, decide, detect_classifier, detect_combined, detect_energy,
    energy_activation, refine_edges, runs, segments_from_activation, smooth, to_db,
)
from demix.pipeline.engine.track import (
    Cancelled, StemPlan, TrackError, TrackResult, add_stem_flags, plan_stems, separate_track,
)

__all__ = [
    "BatchStats", "DirectRunner", "Exclusive", "ModelBatcher", "Ticket", "make_runner", "stage_for",
    "Cancelled", "BAND_EDGES_HZ", "CLASSIFIER_RULE", "DEFAULT_CLASSIFIER", "DEFAULT_DETECTOR", "DETECTORS", "FRAME_S",
    "Detector", "EnergyConfig", "Features", "FrameFeatures", "Hysteresis", "Presence", "PresenceError", "Segment",
    "SeparationSettings", "StemPlan", "TrackError", "TrackResult", "add_separation_flags", "add_stem_flags",
    "classifier_activation", "classifier_inputs", "decide", "detect_classifier", "detect_combined", "detect_energy",
    "energy_activation", "features_of", "plan_stems", "refine_edges", "runs", "segments_from_activation",
    "separate", "separate_stream", "separate_track", "settings_kwargs", "smooth", "to_db", "track_stats",
    "triangle_window",
]
