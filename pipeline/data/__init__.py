"""Training and evaluation data: MUSDB-layout multitrack folders, the training sampler, synthetic songs.

Other packages import from here (``from demix.pipeline.data import MusdbDataset, load_track``).
"""

from demix.pipeline.data.musdb import MusdbDataset, TrackInfo, find_tracks, load_track
from demix.pipeline.data.sampler import AugmentConfig, StemRecipe, TrainingSampler, fixed_excerpts
from demix.pipeline.data.synth import (
    SynthConfig, SynthError, find_soundfont, plan_song, render_song, synth_dataset, toy_song, track_name, vocal_engine,
    write_demo_catalog, write_demo_inputs,
)

__all__ = [
    "AugmentConfig", "MusdbDataset", "StemRecipe", "SynthConfig", "SynthError", "TrackInfo", "TrainingSampler",
    "find_soundfont", "find_tracks", "fixed_excerpts", "load_track", "plan_song", "render_song", "synth_dataset",
    "toy_song", "track_name", "vocal_engine", "write_demo_catalog", "write_demo_inputs",
]
