"""The engine: overlap-add over any separator, the one-track job, frame features and presence detectors."""

from demix.pipeline.engine.presence import (
    BAND_EDGES_HZ, DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, DETECTORS, FRAME_S, Detector, EnergyConfig, Features,
    FrameFeatures, Hysteresis, Presence, PresenceError, Segment, decide, detect_classifier, detect_combined,
    detect_energy, features_of, segments_from_activation, smooth,
)
from demix.pipeline.engine.separate import (
    SeparationSettings, StemPlan, TrackError, TrackResult, plan_stems, separate, separate_stream, separate_track,
    track_stats, triangle_window,
)

__all__ = [
    "BAND_EDGES_HZ", "DEFAULT_CLASSIFIER", "DEFAULT_DETECTOR", "DETECTORS", "FRAME_S", "Detector", "EnergyConfig",
    "Features", "FrameFeatures", "Hysteresis", "Presence", "PresenceError", "Segment", "SeparationSettings",
    "StemPlan", "TrackError", "TrackResult", "decide", "detect_classifier", "detect_combined", "detect_energy",
    "features_of", "plan_stems", "segments_from_activation", "separate", "separate_stream", "separate_track",
    "smooth", "track_stats", "triangle_window",
]
