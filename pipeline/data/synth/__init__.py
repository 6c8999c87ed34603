"""Generated audio for demos, tests, benchmarks and training data.

Two generators:

* :func:`toy_song` builds a short four-stem piece from plain oscillators and noise (no soundfont needed): a
  vibrato lead with harmonics (vocals), kick/snare/hat hits (drums), a low sawtooth line (bass) and sustained
  chords (other). Deterministic per seed; the mixture is the exact sum of the stems.
* :func:`synth_dataset` writes Slakh-style multitrack songs in MUSDB layout,
  ``OUT/<track>/{mixture,vocals,drums,bass,other}.wav`` plus ``OUT/truth.json`` (which stems each track has).
  Each song is planned from ``np.random.default_rng([seed, index])`` (:func:`plan_song`), composed as MIDI
  (drums, bass, one or two accompaniment instruments, a sung melody), rendered by the ``fluidsynth`` command
  with a General MIDI soundfont, its lead vocal sung by ``espeak-ng`` syllables moved onto the melody with
  TD-PSOLA (pitch, vibrato and vowel length change; formants and consonants stay), then mixed: per-stem level,
  pan, reverb. :func:`render_song` returns one song's audio without writing it.
* Profiles (``SynthConfig(profile=...)``, ``--profile``): ``classic`` is the above, exactly; ``train`` varies
  what classic holds fixed (several Debian GM soundfonts, per song or per stem; espeak-ng and flite voices, sung
  or spoken; a random effect chain per stem before the mix; wider tempo, key, mode and register ranges; sparse and
  dense arrangements; loudness that moves); ``heldout`` does the same on a soundfont (TimGM6mb) and a voice
  engine (festival) that ``train`` never uses, with milder effects: a judge of what training on ``train`` learnt.

Audio arrays are ``(channels, time)`` float32 throughout; note times are seconds from the start of the clip.

Modules, in the order a song is made: :mod:`.config` (settings, tools, soundfont), :mod:`.styles` (the musical
vocabulary: scales, progressions, forms, grooves, instrument families), :mod:`.plan` (every random choice),
:mod:`.compose` (notes), :mod:`.midi` (MIDI files), :mod:`.speech` (what espeak-ng, flite and festival say),
:mod:`.voice` (sung and spoken vocals), :mod:`.render` (fluidsynth and the mix), :mod:`.effects` (per-stem
effects, gain automation), :mod:`.dataset` (the folder, ``truth.json``, ``song.json``), :mod:`.toy` (toy audio and
demo inputs); ``python -m demix.pipeline.data.synth`` runs :mod:`.__main__`.
"""

from demix.pipeline.data.synth.config import (
    CONFIG_FILE, PROFILES, SONG_FILE, SONGS_FILE, SOUNDFONT_ENV, SOUNDFONT_PATHS, SOUNDFONTS, SYNTH_VERSION, TRUTH_FILE,
    VOCAL_ENGINES, VOICES, SynthConfig, SynthError, find_soundfont, resolve_soundfont, track_name, vocal_engine,
)
from demix.pipeline.data.synth.dataset import song_metadata, synth_dataset
from demix.pipeline.data.synth.plan import Chord, Instrument, Note, Section, SongPlan, Sung, Voice, plan_song
from demix.pipeline.data.synth.render import render_song
from demix.pipeline.data.synth.toy import toy_song, write_demo_catalog, write_demo_inputs

__all__ = [
    "CONFIG_FILE", "Chord", "Instrument", "Note", "PROFILES", "SONGS_FILE", "SONG_FILE", "SOUNDFONTS",
    "SOUNDFONT_ENV", "SOUNDFONT_PATHS", "SYNTH_VERSION", "Section", "SongPlan", "Sung", "SynthConfig", "SynthError",
    "TRUTH_FILE", "VOCAL_ENGINES", "VOICES", "Voice", "find_soundfont", "plan_song", "render_song",
    "resolve_soundfont", "song_metadata", "synth_dataset", "toy_song", "track_name", "vocal_engine",
    "write_demo_catalog", "write_demo_inputs",
]
