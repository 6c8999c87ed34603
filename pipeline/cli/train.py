"""``demix synth`` and ``demix train``: make training data, train a model (or the presence classifier)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from demix.models.base import ModelLoadError
from demix.models.registry import load_model
from demix.pipeline.cli.common import add_no_progress, fail, parse_option, progress
from demix.pipeline.data import SynthConfig, SynthError, synth_dataset
from demix.pipeline.data.synth import PROFILES
from demix.pipeline.learn.checkpoints import export_checkpoint
from demix.pipeline.learn.nmf_fit import fit_nmf
from demix.pipeline.learn.presence import labelled_examples, save_classifier, train_classifier
from demix.pipeline.learn.train import TrainConfig, train


def add_parsers(sub) -> None:
    _add_synth(sub)
    _add_train(sub)


SYNTH_DESCRIPTION = """Render Slakh-style songs with FluidSynth and a General MIDI soundfont (drums, bass, other,
sung or spoken vocals) into OUT/<track>/{mixture,vocals,drums,bass,other}.wav plus OUT/truth.json.
Deterministic per seed; the mixture is exactly the sum of the stems; a share of tracks leaves stems out.

--profile:
  classic  the generator as it always was: one soundfont, sung espeak-ng vocals, no effects
  train    for training: varied soundfonts, voices (espeak-ng, flite), vocal styles, effects, arrangements
  heldout  for judging: train's variety on a soundfont (TimGM6mb) and voices (festival) train never uses
Profiles other than classic record each song's choices in OUT/<track>/song.json and OUT/songs.json."""


def _add_synth(sub) -> None:
    syn = sub.add_parser(
        "synth",
        help="render a synthetic multitrack dataset (MUSDB layout) with FluidSynth",
        description=SYNTH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    syn.add_argument("out", metavar="OUT")
    syn.add_argument("--tracks", type=int, default=10, help="number of songs (default: 10)")
    syn.add_argument("--seconds", type=float, default=30.0, help="length of each song (default: 30)")
    syn.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    syn.add_argument("--sample-rate", type=int, default=44100, help="(default: 44100)")
    syn.add_argument("--absent-share", type=float, default=0.25, help="share of songs with stems left out (default: 0.25)")
    syn.add_argument("--soundfont", help="GM soundfont (default: Debian's FluidR3_GM.sf2 or $DEMIX_SOUNDFONT)")
    syn.add_argument("--profile", choices=tuple(PROFILES), default="classic",
                     help="what the songs vary, see above (default: classic)")
    syn.add_argument("--jobs", type=int, default=1, help="songs rendered at once (default: 1)")
    add_no_progress(syn)
    syn.set_defaults(handler=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    try:
        config = SynthConfig(
            tracks=args.tracks, seconds=args.seconds, seed=args.seed, sample_rate=args.sample_rate,
            absent_share=args.absent_share, soundfont=args.soundfont, profile=args.profile,
        )
        with tqdm(total=config.tracks, unit="song", disable=args.no_progress) as bar:
            truth = synth_dataset(args.out, config, progress=bar.update, jobs=args.jobs)
    except (ValueError, SynthError) as err:
        return fail(err)
    absent = sum(not all(t.values()) for t in truth.values())
    print(f"demix synth: {len(truth)} songs in {args.out} ({absent} with stems left out; see truth.json)")
    return 0


def _add_train(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train a registered model on a MUSDB-layout dataset",
        description=(
            "Train a registered model (e.g. the U-Net) on a MUSDB-layout folder with Demucs-style augmentation. "
            "Logs loss and validation SDR to OUT/log.jsonl, checkpoints OUT/state.pt (resumable: rerun the same "
            "command), keeps the best weights as OUT/best.safetensors with OUT/best.json (sha256 inside). "
            "--export DIR writes <model>-<sha8>.safetensors ready for --weights. --model presence trains the stem "
            "presence classifier instead, on unet separations of DATASET's songs and variants with stems left out "
            "(options: dropped_variants, hidden, layers, separator); it writes presence-<sha8>.safetensors."
        ),
    )
    tr.add_argument("dataset", metavar="DATASET", help="folder of track folders (for MUSDB18-HQ: its train/)")
    tr.add_argument("-o", "--out", required=True, help="run folder (state, logs, best weights)")
    tr.add_argument("-m", "--model", default="unet", help="registered model to train (default: unet)")
    tr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="model option, e.g. channels=8 (repeatable)")
    tr.add_argument("--valid", metavar="DATASET", help="validation folder (default: hold out 10%% of DATASET)")
    tr.add_argument("--steps", type=int, default=10000)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--excerpt", type=float, default=6.0, help="training excerpt seconds (default: 6)")
    tr.add_argument("--valid-every", type=int, default=500)
    tr.add_argument("--checkpoint-every", type=int, default=250)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    tr.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    tr.add_argument("--init-weights", metavar="PATH_OR_URI", help="start from these weights (fine-tuning) instead of from scratch")
    tr.add_argument(
        "--weak-data", metavar="WEAK_DIR",
        help="also train on weak examples (`demix remix --labelled`, e.g. OUT/train): only their known stem and the sum "
        "of the other stems enter the loss; validation stays on labelled data",
    )
    tr.add_argument("--weak-share", type=float, default=0.5, metavar="P", help="share of weak training examples (default: 0.5)")
    tr.add_argument("--export", metavar="DIR", help="after training, export the best weights to DIR")
    tr.add_argument("--half", action="store_true", help="export in float16 (half the size)")
    add_no_progress(tr)
    tr.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "presence":  # the presence classifier: trained on separations of DATASET
        return cmd_train_presence(args)
    if args.model == "nmf":  # not gradient-trained: dictionaries are fitted to the training stems
        return cmd_fit_nmf(args)
    try:
        config = TrainConfig(
            dataset=args.dataset, model=args.model, model_options=dict(parse_option(o) for o in args.option),
            valid_dataset=args.valid, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            excerpt_seconds=args.excerpt, valid_every=args.valid_every, checkpoint_every=args.checkpoint_every,
            seed=args.seed, device=args.device, num_threads=args.threads, init_weights=args.init_weights,
            weak_dataset=args.weak_data, weak_share=args.weak_share,
        )

        def log(record: dict) -> None:
            if "valid_sdr" in record:
                print(json.dumps(record), flush=True)

        best = train(config, args.out, log=log, progress=not args.no_progress)
        print(f"demix train: best weights {best}")
        if args.export:
            path, digest = export_checkpoint(args.out, args.export, half=args.half)
            print(f"demix train: exported {path} (sha256 {digest})")
    except (ValueError, ModelLoadError) as err:
        return fail(err)
    return 0


def cmd_fit_nmf(args: argparse.Namespace) -> int:
    options = dict(parse_option(o) for o in args.option)
    try:
        path, digest = fit_nmf(args.dataset, args.export or args.out, components=int(options.get("components", 32)), seed=args.seed)
    except ValueError as err:
        return fail(err)
    print(f"demix train: NMF dictionaries {path} (sha256 {digest})")
    return 0


def cmd_train_presence(args: argparse.Namespace) -> int:
    options = dict(parse_option(o) for o in args.option)
    try:
        separator = load_model(str(options.pop("separator", "unet")))
        variants = int(options.pop("dropped_variants", 2))
        with tqdm(unit="song", disable=args.no_progress, desc="separating") as bar:
            examples = labelled_examples(args.dataset, separator, dropped_variants=variants, seed=args.seed, progress=progress(bar))
        model = train_classifier(examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, **options)
        path, digest = save_classifier(model, Path(args.export or args.out))
    except (ValueError, ModelLoadError) as err:
        return fail(err)
    print(f"demix train: presence classifier on {len(examples)} separated songs: {path} (sha256 {digest})")
    return 0
