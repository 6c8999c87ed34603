"""The contract every separation model fulfils.

Shapes follow one convention everywhere in demix: ``(batch, channels, time)`` for audio and
``(batch, sources, channels, time)`` for separated stems.
"""

from __future__ import annotations

from torch import Tensor, nn


class ModelLoadError(RuntimeError):
    """A model or its weights could not be built, fetched, verified or loaded."""


class Separator(nn.Module):
    """Base class: a network that maps a mixture chunk to one estimate per source.

    Subclasses implement :meth:`forward` with
    ``mix: (batch, channels, time) -> (batch, sources, channels, time)`` for any ``time`` the model
    accepts (see :attr:`segment`), at :attr:`sample_rate`, with :attr:`audio_channels` channels.

    Attributes:
        sample_rate: rate the model was built for, in Hz.
        sources: names of the estimates, in output order.
        audio_channels: channels the model expects (demix feeds stereo).
        segment: preferred chunk length in seconds for overlap-add.
        masks_sum_to_one: True when the model promises that its estimates sum exactly to the input
            (for example softmax masks with the mixture phase); tests check that promise.
        normalize_input: True when the model expects the track-level normalisation used by demucs
            (subtract the mono mean, divide by the mono standard deviation, undo it on the output).
    """

    sample_rate: int = 44100
    sources: tuple[str, ...] = ()
    audio_channels: int = 2
    segment: float = 10.0
    masks_sum_to_one: bool = False
    normalize_input: bool = False

    def forward(self, mix: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights_module(self) -> nn.Module:
        """The module whose ``state_dict`` the published weights describe (``self`` by default)."""
        return self
