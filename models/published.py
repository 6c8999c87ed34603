"""Published third-party checkpoints: HT Demucs (single, fine-tuned bag, 6 stems), BS- and Mel-Band RoFormer.

Each spec is data for a :class:`demix.models.registry.ModelEntry`: where the publisher serves the file,
the checksum the publisher gives (demucs: the 8-hex sha256 prefix in the file name, checked on every
load; the RoFormer release assets: none published, so demix records none and says so), the
architecture config copied from the publisher's files (demucs' package kwargs, MSST's YAML), and the
published figures with their sources. Parameter counts are checked by tests/test_published_models.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from demix.models.base import Separator
from demix.models.htdemucs import BagSeparator, HTDemucsSeparator
from demix.models.roformer import BS_FREQS_PER_BANDS, RoFormerSeparator

DEMUCS_ROOT = "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/"
UVR_ROOT = "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/"
MUSDB4 = ("drums", "bass", "other", "vocals")
SIX = ("drums", "bass", "other", "vocals", "guitar", "piano")


@dataclass(frozen=True)
class Published:
    """What the publisher states about a checkpoint (shown by ``demix models`` and the README).

    Attributes:
        sdr: published SDR in dB, or ``None`` when none is published.
        sdr_note: what the number is (metric, test set, averaging) and where it is published.
        licence: licence of the weights as published.
        params: parameter count of the network (built from the config; the tests check it).
        size_mb: size of the published file(s) in MB (10^6 bytes), from the parameter count and dtype.
        page: where the publisher describes the model.
    """

    sdr: float | None
    sdr_note: str
    licence: str
    params: int
    size_mb: float
    page: str


HTDEMUCS_CONFIG = {
    # the published htdemucs package's kwargs (demucs conf/config.yaml htdemucs section with the
    # released variant's overrides: dconv in encoder and decoder, 512 bottom channels, 7.8 s segment)
    "audio_channels": 2, "samplerate": 44100, "segment": Fraction(39, 5), "channels": 48, "growth": 2,
    "nfft": 4096, "cac": True, "depth": 4, "dconv_mode": 3, "dconv_depth": 2, "dconv_comp": 8,
    "bottom_channels": 512, "t_layers": 5, "t_heads": 8, "t_hidden_scale": 4.0, "t_emb": "sin",
}

ROFORMER_COMMON = {
    "depth": 12, "stereo": True, "num_stems": 1, "time_transformer_depth": 1, "freq_transformer_depth": 1,
    "dim_head": 64, "heads": 8, "attn_dropout": 0.1, "ff_dropout": 0.1, "stft_n_fft": 2048,
    "stft_hop_length": 441, "stft_win_length": 2048, "stft_normalized": False, "mask_estimator_depth": 2,
}
BS_ROFORMER_CONFIG = {"dim": 512, "freqs_per_bands": BS_FREQS_PER_BANDS, **ROFORMER_COMMON}
"""``model:`` of configs/viperx/model_bs_roformer_ep_317_sdr_12.9755.yaml (MSST), loss settings left out."""
MEL_ROFORMER_CONFIG = {"dim": 384, "num_bands": 60, "sample_rate": 44100, **ROFORMER_COMMON}
"""``model:`` of configs/viperx/model_mel_band_roformer_ep_3005_sdr_11.4360.yaml (MSST), loss settings left out."""
ROFORMER_CHUNK = 352800  # audio.chunk_size of both YAMLs: 8 s
ROFORMER_OVERLAP = 0.5  # inference.num_overlap: 2


def htdemucs_factory(sources: tuple[str, ...], members: int = 1, weights=None):
    """A factory for one HT Demucs or a bag of ``members``; its options shrink the network (tests)."""

    def factory(*, channels: int = 48, t_layers: int = 5, bottom_channels: int = 512, segment: float | None = None) -> Separator:
        config = {**HTDEMUCS_CONFIG, "channels": channels, "t_layers": t_layers, "bottom_channels": bottom_channels}
        if segment is not None:
            config["segment"] = Fraction(segment).limit_denominator(1000)
        nets = [HTDemucsSeparator(sources, config) for _ in range(members)]
        for net in nets:
            net.expected_kwargs = {**config, "sources": list(sources)}
        return nets[0] if members == 1 else BagSeparator(nets, weights)

    return factory


def roformer_factory(arch: str, config: dict):
    """A factory for a vocals RoFormer; ``dim`` and ``depth`` shrink it (tests)."""

    def factory(*, dim: int = config["dim"], depth: int = config["depth"], chunk_size: int = ROFORMER_CHUNK) -> Separator:
        return RoFormerSeparator(arch, {**config, "dim": dim, "depth": depth}, chunk_size=chunk_size, overlap=ROFORMER_OVERLAP)

    return factory


_DEMUCS_PAGE = "https://github.com/facebookresearch/demucs (README, remote/files.txt, remote/*.yaml)"
_HT_PAPER = "Rouard, Massa, Défossez, Hybrid Transformers for Music Source Separation, ICASSP 2023"
FT_BAG = ("f7e0c4bc-ba3fe64a.th", "d12395a8-e57c48e6.th", "92cfc3b6-ef3bcb9c.th", "04573f0d-f3cf25b2.th")
FT_WEIGHTS = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0))

SPECS = (
    dict(
        name="htdemucs", factory=htdemucs_factory(MUSDB4), sample_rate=44100, sources=MUSDB4,
        weights_uri=DEMUCS_ROOT + "955717e8-8726e21a.th", weights_format="demucs", config=HTDEMUCS_CONFIG,
        description="Hybrid Transformer Demucs (demucs v4 `htdemucs`), trained on MUSDB18-HQ + 800 songs; 7.8 s chunks",
        published=Published(8.80, f"MUSDB18-HQ test, mean SDR of 4 stems ({_HT_PAPER})", "MIT (demucs repository)",
                            41_984_456, 84.0, _DEMUCS_PAGE),
    ),
    dict(
        name="htdemucs_ft", factory=htdemucs_factory(MUSDB4, 4, FT_WEIGHTS), sample_rate=44100, sources=MUSDB4,
        weights_uri=DEMUCS_ROOT, bag=FT_BAG, bag_weights=FT_WEIGHTS, weights_format="demucs", config=HTDEMUCS_CONFIG,
        description="fine-tuned HT Demucs bag (demucs `htdemucs_ft`): one model per source, weights as remote/htdemucs_ft.yaml; 4x htdemucs' compute",
        published=Published(9.00, f"MUSDB18-HQ test, mean SDR of 4 stems (demucs README; {_HT_PAPER})", "MIT (demucs repository)",
                            4 * 41_984_456, 4 * 84.0, _DEMUCS_PAGE),
    ),
    dict(
        name="htdemucs_6s", factory=htdemucs_factory(SIX), sample_rate=44100, sources=SIX,
        weights_uri=DEMUCS_ROOT + "5c90dfd2-34c22ccb.th", weights_format="demucs", config=HTDEMUCS_CONFIG,
        description="six-stem HT Demucs (demucs `htdemucs_6s`: + guitar, piano; the publisher calls piano experimental)",
        published=Published(None, "none published (demucs README: guitar okay, piano bleeds)", "MIT (demucs repository)",
                            41_989_076, 84.0, _DEMUCS_PAGE),
    ),
    dict(
        name="bs-roformer-vocals", factory=roformer_factory("bs", BS_ROFORMER_CONFIG), sample_rate=44100,
        sources=("vocals", "instrumental"), weights_uri=UVR_ROOT + "model_bs_roformer_ep_317_sdr_12.9755.ckpt",
        weights_format="ckpt", config=BS_ROFORMER_CONFIG,
        description="BS-RoFormer vocals/instrumental by viperx (UVR, MSST configs/viperx); instrumental = mixture - vocals; 8 s chunks",
        published=Published(12.9755, "vocals SDR on the MVSep multisong set (file name; not MUSDB18-HQ). Architecture: Lu et al. 2023, "
                            "9.80 dB mean of 4 stems on MUSDB18-HQ for their own 4-stem model", "not stated by the publisher (UVR model_repo release)",
                            159_758_092, 639.0, "https://github.com/ZFTurbo/Music-Source-Separation-Training (docs/pretrained_models.md)"),
    ),
    dict(
        name="mel-roformer-vocals", factory=roformer_factory("mel", MEL_ROFORMER_CONFIG), sample_rate=44100,
        sources=("vocals", "instrumental"), weights_uri=UVR_ROOT + "model_mel_band_roformer_ep_3005_sdr_11.4360.ckpt",
        weights_format="ckpt", config=MEL_ROFORMER_CONFIG,
        description="Mel-Band RoFormer vocals/instrumental by viperx (UVR, MSST configs/viperx); instrumental = mixture - vocals; 8 s chunks",
        published=Published(11.4360, "vocals SDR on the MVSep multisong set (file name; not MUSDB18-HQ). Architecture: Wang et al. 2023",
                            "not stated by the publisher (UVR model_repo release)", 251_869_636, 1007.5,
                            "https://github.com/ZFTurbo/Music-Source-Separation-Training (docs/pretrained_models.md)"),
    ),
)
"""Keyword arguments of the registry entries, in ``demix models`` order."""
