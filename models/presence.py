"""The learned presence classifier: per 50 ms frame, is each stem sounding?

A small dilated 1-D convolutional network over *frame features* (see :mod:`demix.pipeline.engine.features`): for
each source, its band levels relative to the mixture's, plus the mixture's own band levels, as a
separation produces them. Input ``(batch, (sources + 1) * bands, frames)``, output logits
``(batch, sources, frames)``. The receptive field is about 1.5 s, so a frame is judged with its
context (a sustained note versus leakage that comes and goes with another instrument).

Seed lecture: "a classifier that detects each stem's presence". Trained by
:func:`demix.pipeline.learn.presence.train_classifier` on separated synthetic songs (true stems give the labels);
registered as ``presence`` (kind ``presence``) and loaded with :func:`demix.models.registry.load_model`
like any model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from demix.pipeline.stems import STEMS


class PresenceNet(nn.Module):
    """``(batch, (len(sources) + 1) * bands, frames) -> (batch, len(sources), frames)`` logits."""

    def __init__(self, sources: Sequence[str] = STEMS, *, bands: int = 6,
                 hidden: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.sources = tuple(sources)
        self.bands = bands
        blocks: list[nn.Module] = []
        width = (len(self.sources) + 1) * bands
        for i in range(layers):
            dilation = 2**i
            blocks += [nn.Conv1d(width, hidden, 5, padding=2 * dilation, dilation=dilation), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Conv1d(hidden, len(self.sources), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def weights_module(self) -> nn.Module:
        return self
