"""The model registry: names mapped to frozen entries (data, not code paths).

An entry says how to build the network, at which rate it runs, which stems it returns and where its
weights live with their sha256. :func:`load_model` builds, fetches, verifies and loads, strictly.
Like torchaudio's ``SourceSeparationBundle`` and demucs' ``<sig>-<sha8>.th`` files, both together.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch

from demix.models import checkpoint_formats as _formats, weights as _weights
from demix.models.base import ModelLoadError, Separator
from demix.models.hdemucs import MUSDB_SOURCES, HDemucsSeparator
from demix.models.nmf import SupervisedNMF
from demix.models.oracle import MixtureCopy
from demix.models.presence import PresenceNet
from demix.models.published import SPECS as _PUBLISHED_SPECS, Published
from demix.models.unet import PHASES, SpectrogramUNet
from demix.models.waveunet import WaveUNet
from demix.pipeline.stems import STEMS

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: registry key, used by ``--model``.
        factory: builds the network with random weights; keyword options are model options.
        sample_rate: rate in Hz the model runs at; inputs are resampled to it.
        sources: stems the model returns, in order.
        weights_uri: where the trained weights live (path, fsspec URI or http(s)); ``None`` means the
            entry has no published weights and runs untrained unless ``weights=`` is given.
        sha256: expected digest of the file at ``weights_uri``.
        description: one line for ``demix models``.
        kind: ``"separator"`` (a :class:`demix.models.base.Separator`) or ``"presence"`` (a presence
            classifier, :class:`demix.models.presence.PresenceNet`); :func:`load_model` refuses the wrong kind.
        weights_format: ``"state_dict"`` (safetensors or a ``torch.save`` state dict), ``"demucs"`` (a demucs
            ``.th`` package) or ``"ckpt"`` (a RoFormer checkpoint); the last two are read by
            :mod:`demix.models.checkpoint_formats` (allow-listed, nothing executed).
        bag: for a bag of models, the members' file names under ``weights_uri`` (a folder or URI prefix);
            ``--weights`` then names a folder holding those files.
        bag_weights: per-member, per-source weights of a bag (as in demucs' bag YAML files).
        config: the architecture config the network is built from (published models: the publisher's).
        published: what the publisher states (SDR with its source, licence, size); ``None`` for demix's own.
    """

    name: str
    factory: Callable[..., Separator]
    sample_rate: int
    sources: tuple[str, ...]
    weights_uri: str | None = None
    sha256: str | None = None
    description: str = ""
    kind: str = "separator"
    weights_format: str = "state_dict"
    bag: tuple[str, ...] = ()
    bag_weights: tuple[tuple[float, ...], ...] | None = None
    config: dict = field(default_factory=dict)
    published: Published | None = None

    def options(self) -> tuple[str, ...]:
        """Keyword options the factory accepts (what ``load_model(**options)`` may pass)."""
        params = inspect.signature(self.factory).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry``; a second entry with the same name is refused."""
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    """The entry called ``name``; ``ModelLoadError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def list_models() -> list[ModelEntry]:
    """All entries, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def load_model(
    name: str,
    *,
    weights: str | None = None,
    sha256: str | None = None,
    device: str | torch.device = "cpu",
    pretrained: bool = True,
    kind: str = "separator",
    trust: bool = False,
    **options,
) -> Separator:
    """Build the model ``name``, load its weights strictly and return it in eval mode on ``device``.

    Args:
        name: registry key.
        weights: path or URI overriding the entry's ``weights_uri`` (air-gapped clusters pass the
            published file from their own storage). It needs a checksum: ``sha256`` when given, else
            the entry's sha256 when the file matches it, else a ``-<sha8>`` in its name; else only
            ``trust`` loads it (see :func:`demix.models.weights.fetch_user_weights`).
        sha256: expected digest for ``weights``.
        device: where the returned model lives.
        pretrained: load the entry's published weights (default). ``False`` builds the network with
            deterministic random weights (training from scratch, tiny test configurations whose
            options change the architecture). Ignored when ``weights`` is given.
        kind: the kind of model the caller needs (``separator`` or ``presence``); an entry of
            another kind is refused with a ``ModelLoadError``.
        trust: load ``weights`` that no checksum verifies (``--trust-weights``).
        **options: model options (see :meth:`ModelEntry.options`); unknown ones are refused.

    The returned module carries ``registry_name``, ``weights_uri`` (``None`` when untrained),
    ``weights_sha256`` for manifests and ``weights_verified_by`` (one of
    :data:`demix.models.weights.VERIFIED_BY`, ``None`` when untrained).
    """
    entry = get_entry(name)
    if entry.kind != kind:
        others = ", ".join(e.name for e in list_models() if e.kind == kind)
        raise ModelLoadError(f"model {name!r} is a {entry.kind} model, not a {kind} model; {kind} models: {others or 'none'}")
    unknown = sorted(set(options) - set(entry.options()))
    if unknown:
        raise ModelLoadError(
            f"model {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(entry.options()) or 'none'}"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # untrained entries are deterministic; the global RNG is left alone
            model = entry.factory(**options)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"cannot build model {name!r} with options {options}: {err}") from err

    uri = weights if weights is not None else (entry.weights_uri if pretrained else None)
    digest = how = None
    if uri is not None:
        digest, how = _load_parts(entry, model, resolve_parts(entry, weights, sha256=sha256, trust=trust))
    model.registry_name = name
    model.weights_uri = uri
    model.weights_sha256 = digest
    model.weights_verified_by = how
    return model.to(device).eval()


def resolve_weights(
    entry: ModelEntry | str, weights: str | None, *, sha256: str | None = None, trust: bool = False
) -> tuple[Path, str, str]:
    """Fetch and verify the weights :func:`load_model` would load: ``weights`` (the user's, needing a
    checksum or ``trust``) or the entry's own. Returns ``(local path, sha256, verified_by)``; the CLI
    calls it before Prefect or Ray start, so a refused file fails at once.

    Raises:
        ModelLoadError: unknown model, no weights to resolve, missing file, mismatch, or no checksum.
    """
    parts = resolve_parts(entry, weights, sha256=sha256, trust=trust)
    return (parts[0][0] if len(parts) == 1 else parts[0][0].parent), _combined(parts), parts[0][2]


def resolve_parts(
    entry: ModelEntry | str, weights: str | None, *, sha256: str | None = None, trust: bool = False
) -> list[tuple[Path, str, str]]:
    """Like :func:`resolve_weights`, one ``(path, sha256, verified_by)`` per file: one, or a bag's members
    (each under ``weights`` or the entry's URI prefix, each verified by the sha8 in its published name)."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    if entry.bag:
        if sha256 is not None:
            raise ModelLoadError(f"model {entry.name!r} is a bag of {len(entry.bag)} files: --weights-sha256 cannot name them; "
                                 "their names carry their checksums")
        root = (weights or entry.weights_uri or "").rstrip("/")
        if weights is not None:
            names = [_member_file(root, n) for n in entry.bag]
            return [_weights.fetch_user_weights(f"{root}/{n}", trust=trust, model=repr(entry.name)) for n in names]
        return [_weights.fetch_registry_weights(f"{root}/{n}", sha256=None) for n in entry.bag]
    return [_resolve_one(entry, weights, sha256=sha256, trust=trust)]


def _member_file(root: str, published: str) -> str:
    """A bag member's file under the user's folder: the published name, else the one file named with the
    member's signature, ``<sig>-<sha8>.th`` (demucs names members so); over http only the published name."""
    if root.startswith(("http://", "https://")):
        return published
    sig = published.split("-", 1)[0]
    fs, base = fsspec.core.url_to_fs(root)
    found = sorted(fs.glob(f"{base}/{sig}-*.th"))
    if len(found) > 1:
        raise ModelLoadError(f"{root} holds {len(found)} files for bag member {sig}: keep one")
    return found[0].rsplit("/", 1)[-1] if found else published


def _combined(parts: list[tuple[Path, str, str]]) -> str:
    """One file's sha256, or for a bag the sha256 of its members' digests joined by newlines."""
    return parts[0][1] if len(parts) == 1 else hashlib.sha256("\n".join(p[1] for p in parts).encode()).hexdigest()


def _load_parts(entry: ModelEntry, model: Separator, parts: list[tuple[Path, str, str]]) -> tuple[str, str]:
    """Load each verified file into its network (a bag: one per member); return ``(sha256, verified_by)``."""
    targets = list(model.members) if entry.bag else [model]
    for (path, _, _), target in zip(parts, targets, strict=True):
        _weights.load_strict(target.weights_module(), _read(entry, path, target), where=str(path))
    return _combined(parts), parts[0][2]


def _read(entry: ModelEntry, path: Path, target) -> dict:
    if entry.weights_format == "demucs":
        return _formats.read_demucs_package(path, klass="demucs.htdemucs.HTDemucs", kwargs=target.expected_kwargs)
    if entry.weights_format == "ckpt":
        return _formats.read_checkpoint(path)
    return _weights.read_state_dict(path)


def _resolve_one(entry: ModelEntry, weights: str | None, *, sha256: str | None, trust: bool) -> tuple[Path, str, str]:
    if weights is not None:
        return _weights.fetch_user_weights(
            weights, sha256=sha256, registry_sha256=entry.sha256, trust=trust, model=repr(entry.name)
        )
    if entry.weights_uri is None:
        raise ModelLoadError(f"model {entry.name!r} has no published weights; pass --weights")
    return _weights.fetch_registry_weights(entry.weights_uri, sha256=entry.sha256)


def _unet(
    *,
    phase: str = "mixture",
    griffin_lim_iters: int = 32,
    mask: str = "softmax",
    depth: int = 6,
    channels: int = 8,
) -> Separator:
    return SpectrogramUNet(
        STEMS,
        phase=phase,
        griffin_lim_iters=griffin_lim_iters,
        mask=mask,
        depth=depth,
        channels=channels,
    )


def _hdemucs(*, segment: float = 10.0) -> Separator:
    return HDemucsSeparator(segment=segment)


HDEMUCS_MUSDB = register(
    ModelEntry(
        name="hdemucs-musdb",
        factory=_hdemucs,
        sample_rate=44100,
        sources=MUSDB_SOURCES,
        weights_uri="https://download.pytorch.org/torchaudio/models/hdemucs_high_trained.pt",
        sha256="a004b2790d73ffeaa535db458a1a79b539dfdbafbccc31f275d07e632ebd7816",
        description="Hybrid Demucs (torchaudio hdemucs_high) with the published HDEMUCS_HIGH_MUSDB_PLUS weights",
        published=Published(
            8.34, "MUSDB18-HQ test, mean SDR of 4 stems, as the issue cites for Hybrid Demucs (v3); torchaudio's "
            "HDEMUCS_HIGH_MUSDB_PLUS was trained with MUSDB's test set included, so it is no held-out figure for these weights",
            "torchaudio's model pages state none beyond the code's BSD-2 (check before production use)",
            83_639_368, 334.6, "https://pytorch.org/audio/stable/generated/torchaudio.pipelines.HDEMUCS_HIGH_MUSDB_PLUS.html",
        ),
    )
)

UNET = register(
    ModelEntry(
        name="unet",
        factory=_unet,
        sample_rate=44100,
        sources=STEMS,
        weights_uri=str(WEIGHTS_DIR / "unet-78a9e21d.safetensors"),
        sha256="78a9e21d34b9db0984973114f7168caa70a787926df83cf144a7542982e19e29",
        description=(
            "Spectrogram U-Net (Jansson et al. 2017), 8 base channels, softmax masks; trained by demix on its "
            "own synthetic multitrack songs (demix synth: the classic generator, then the varied train profile), "
            "shipped in float16 (4.9 MB)"
        ),
    )
)


def _waveunet(*, depth: int = 10, growth: int = 24, net_rate: int = 22050) -> Separator:
    return WaveUNet(STEMS, depth=depth, growth=growth, net_rate=net_rate)


WAVEUNET = register(
    ModelEntry(
        name="waveunet",
        factory=_waveunet,
        sample_rate=44100,
        sources=STEMS,
        description=(
            "Wave-U-Net (Stoller et al. 2018) on the waveform at 22.05 kHz, difference output for 'other'; "
            "no shipped weights yet: train it with `demix train --model waveunet`, then pass --weights"
        ),
    )
)


def _mixture(*, segment: float = 10.0) -> Separator:
    return MixtureCopy(segment=segment)


MIXTURE = register(
    ModelEntry(
        name="mixture",
        factory=_mixture,
        sample_rate=44100,
        sources=STEMS,
        description="baseline: every stem is the mixture (the evaluation floor; zero-cost model for pipeline benchmarks)",
    )
)


def _nmf(*, components: int = 32, iters: int = 60) -> Separator:
    return SupervisedNMF(STEMS, components=components, iters=iters)


NMF = register(
    ModelEntry(
        name="nmf",
        factory=_nmf,
        sample_rate=44100,
        sources=STEMS,
        weights_uri=str(WEIGHTS_DIR / "nmf-7aa9fbf7.safetensors"),
        sha256="7aa9fbf757d7b13b931fa93ee6a99fd7a86f9b7728c2bba411ac58b53417960b",
        description="supervised NMF baseline: per-source KL-NMF dictionaries (fitted on demix synth data), activations solved at inference, soft masks",
    )
)


def _presence(*, hidden: int = 64, layers: int = 4):
    return PresenceNet(STEMS, hidden=hidden, layers=layers)


PRESENCE = register(
    ModelEntry(
        name="presence",
        factory=_presence,
        sample_rate=44100,
        sources=STEMS,
        weights_uri=str(WEIGHTS_DIR / "presence-b6e8d0a0.safetensors"),
        sha256="b6e8d0a009840fd4b2d3d424aec2dccd93ac0d60fce9d09fb8a9fe40f97fc2dd",
        description=(
            "stem presence classifier over 50 ms frame features of a unet separation; trained by demix on "
            "separated synthetic songs with stems left out (demix train --model presence), 0.3 MB"
        ),
        kind="presence",
    )
)

for _spec in _PUBLISHED_SPECS:
    register(ModelEntry(**_spec))

DEFAULT_MODEL = "unet"


def add_model_flags(parser) -> None:
    """The options that choose and load a separator (demucs' ``add_model_flags`` habit): ``--model``,
    ``--weights``, ``--weights-sha256``, ``--trust-weights`` and the U-Net's ``--phase``. ``parser`` is a parser
    or an argument group."""
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"registered model (default: {DEFAULT_MODEL}; `demix models` lists them)")
    parser.add_argument("--weights", metavar="PATH_OR_URI", help="weights file overriding the registry's (air-gapped clusters)")
    parser.add_argument(
        "--weights-sha256", metavar="HEX",
        help="expected sha256 of --weights (needed unless the registry's sha256 matches or the name ends in -<sha8>)",
    )
    parser.add_argument(
        "--trust-weights", action="store_true",
        help="load --weights that no checksum verifies (by default they are refused)",
    )
    parser.add_argument("--phase", choices=PHASES, help="U-Net only: mixture phase or Griffin-Lim reconstruction")


def model_options(args) -> dict:
    """The model options :func:`add_model_flags` parsed, for :func:`load_model` (only those given)."""
    return {"phase": args.phase} if getattr(args, "phase", None) else {}
