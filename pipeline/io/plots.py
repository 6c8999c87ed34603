"""The media of the HTML reports: spectrogram thumbnails (PNG), box plots (SVG, inline in the page),
both drawn by matplotlib (its object API on an Agg canvas, no pyplot state; draw from one thread at a
time: matplotlib is not thread-safe), and short preview clips (MP3) of a piece of audio. Pure functions
of arrays, returning bytes or text.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import signal

from demix.pipeline.io.conform import conform
from demix.pipeline.io.encode import Encoding, save_audio

PREVIEW_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""Sample rates a preview MP3 keeps; audio at any other rate is resampled to 44.1 kHz."""

_COLORS = ("#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc", "#fc9272", "#d9d9d9")


def _figure(width_in: float, height_in: float):
    """A matplotlib figure on an Agg canvas of its own. matplotlib is imported here, not at module top:
    every ``demix`` command imports this module through the CLI, few of them draw (0.7 s saved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _mono(audio: np.ndarray) -> np.ndarray:
    x = np.asarray(audio, np.float32)
    return x.mean(0) if x.ndim == 2 else x


def spectrogram_png(audio: np.ndarray, sample_rate: int, *, width_px: int = 320, height_px: int = 96) -> bytes:
    """A small log-magnitude spectrogram (0 Hz to Nyquist, -80 dB floor under the loudest bin) of
    ``audio`` (``(channels, time)`` or ``(time,)``, mixed to mono) as PNG bytes, without axes."""
    x = _mono(audio)
    nfft = 1024 if sample_rate > 16000 else 512
    if x.size < nfft:
        x = np.pad(x, (0, nfft - x.size))
    _, _, spec = signal.stft(x, fs=sample_rate, nperseg=nfft, noverlap=nfft // 2, boundary=None)
    db = 20 * np.log10(np.abs(spec) + 1e-9)
    db = np.clip(db, db.max() - 80.0, None)
    fig = _figure(width_px / 100, height_px / 100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(db, origin="lower", aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def boxplot_svg(
    groups: Mapping[str, Mapping[str, Sequence[float]]], *, label: str = "SDR (dB)", width_px: int | None = None,
) -> str:
    """An inline SVG box plot of ``{model: {stem: values}}``: one box per model side by side within each
    stem (quartile box, median, whiskers to the furthest value within 1.5 IQR, outliers as dots).
    Non-finite values are left out; each tick names the stem and its count (``n=0`` for an empty group).
    Every drawn box is a ``<g class="box" data-stem=... data-model=...>`` element (with a tooltip)."""
    models = list(groups)
    stems = list(dict.fromkeys(s for m in models for s in groups[m]))
    data = {
        (m, s): np.array([v for v in groups[m].get(s, ()) if np.isfinite(v)], np.float64) for m in models for s in stems
    }
    import matplotlib  # lazy: see _figure
    from matplotlib.patches import Patch

    width = width_px or max(360, 90 * len(stems) * max(1, len(models)) + 120)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "demix", "font.size": 10}):
        fig = _figure(width / 100, 3.4)
        ax = fig.add_subplot()
        slot = 0.8 / max(1, len(models))
        for j, model in enumerate(models):
            for i, stem in enumerate(stems):
                v = data[(model, stem)]
                if not v.size:
                    continue
                pos = i - 0.4 + slot * (j + 0.5)
                art = ax.boxplot(
                    [v], positions=[pos], widths=slot * 0.8, patch_artist=True, showfliers=True,
                    medianprops={"color": "#d62728", "linewidth": 2}, flierprops={"markersize": 4},
                )
                art["boxes"][0].set_facecolor(_COLORS[j % len(_COLORS)])
                art["boxes"][0].set_gid(f"demixbox-{i}-{j}")
        counts = [sum(data[(m, s)].size for m in models) for s in stems]
        ax.set_xticks(range(len(stems)), [f"{s}\nn={n}" for s, n in zip(stems, counts)])
        ax.set_xlim(-0.6, max(len(stems), 1) - 0.4)
        ax.set_ylabel(label)
        ax.grid(axis="y", color="#ddd")
        if len(models) > 1:
            handles = [Patch(facecolor=_COLORS[j % len(_COLORS)], label=m) for j, m in enumerate(models)]
            ax.legend(handles=handles, loc="best", fontsize=8)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):].strip()

    def tag(match: re.Match) -> str:
        i, j = int(match.group(1)), int(match.group(2))
        v = data[(models[j], stems[i])]
        tip = f"{models[j]} {stems[i]}: median {np.median(v):.2f}, n={v.size}"
        return (
            f'<g class="box" data-stem="{_attr(stems[i])}" data-model="{_attr(models[j])}" id="demixbox-{i}-{j}">'
            f"<title>{_attr(tip)}</title>"
        )

    return re.sub(r'<g id="demixbox-(\d+)-(\d+)">', tag, svg)


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def preview_mp3(audio: np.ndarray, sample_rate: int, *, kbps: int = 64) -> bytes:
    """``audio`` (``(channels, time)``, at most two channels kept) as a constant bit rate MP3 (rescaled
    when it would clip), resampled to 44.1 kHz when ``sample_rate`` is no MP3 rate."""
    x = np.asarray(audio, np.float32)
    x = x[None] if x.ndim == 1 else x[:2]
    if sample_rate not in PREVIEW_RATES:
        x = conform(x, sample_rate, target_rate=44100, target_channels=x.shape[0], source="preview").numpy()
        sample_rate = 44100
    kbps = min(kbps, 64) if sample_rate < 16000 else kbps
    buf = io.BytesIO()
    save_audio(buf, x, sample_rate=sample_rate, encoding=Encoding(format="mp3", mp3_bitrate=kbps))
    return buf.getvalue()
