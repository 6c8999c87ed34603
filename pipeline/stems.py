"""Stem names and the silence rule: one definition of each, used by every layer (models included).

``STEMS`` is the MUSDB order of the four-stem task; a model's own ``sources`` may be in another order
(Hybrid Demucs: drums, bass, other, vocals) or hold other names (a six-stem model), so code that handles
a model's output takes the names from the model, and ``STEMS`` only where the task itself is meant
(datasets, evaluation, the default models).
"""

from __future__ import annotations

import numpy as np

STEMS = ("vocals", "drums", "bass", "other")
"""The four stems of the MUSDB task, in MUSDB's order."""

MIXTURE = "mixture"
"""The name of the mixture: a MUSDB file name, and a signal name in presence features."""

SILENCE_DBFS = -90.0
"""The silence rule: a signal whose mean square (all channels, whole length) is below this level, in dB
relative to full scale (1.0), is *silent*. -90 dBFS sits above the noise floor of dithered 16-bit audio
(about -96 dBFS), so a stem holding only dither or rounding noise is silent, and far below any musical
content (one second at -20 dBFS RMS in a four-minute track is about -44 dBFS). A signal whose channel
sum is exactly zero everywhere (which museval refuses to score) is silent too."""

QUIET_DBFS = -60.0
"""A stricter level for training excerpts (RMS below 0.001): an excerpt in which every stem is below it
holds nothing to learn from and is drawn again. Not silence: evaluation uses :data:`SILENCE_DBFS`."""


def mean_square_dbfs(audio) -> float:
    """Mean power of ``audio`` (an array or tensor of any shape) in dB re full scale; ``-inf`` if empty or zero."""
    data = np.asarray(audio.detach().cpu() if hasattr(audio, "detach") else audio)
    if data.size == 0:
        return -np.inf
    ms = float(np.mean(np.square(data, dtype=np.float64)))
    return 10.0 * np.log10(ms) if ms > 0 else -np.inf


def is_silent(audio, threshold_dbfs: float = SILENCE_DBFS) -> bool:
    """The silence rule for ``audio`` ``(channels, time)`` (or any shape): empty, mean square below
    ``threshold_dbfs`` (default :data:`SILENCE_DBFS`), or, for two or more dimensions, a channel sum that is
    zero at every sample."""
    data = np.asarray(audio.detach().cpu() if hasattr(audio, "detach") else audio)
    if data.size == 0 or mean_square_dbfs(data) < threshold_dbfs:
        return True
    return data.ndim >= 2 and not np.any(data.sum(axis=-2) != 0)
