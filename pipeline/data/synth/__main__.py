"""``python -m demix.pipeline.data.synth {demo,demo-catalog,dataset} OUT``: write generated audio."""

from __future__ import annotations

import argparse
import sys

from demix.pipeline.data.synth.config import PROFILES, SOUNDFONT_ENV, VOCAL_ENGINES, SynthConfig, SynthError, track_name
from demix.pipeline.data.synth.dataset import synth_dataset
from demix.pipeline.data.synth.toy import write_demo_catalog, write_demo_inputs
from demix.pipeline.stems import STEMS

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demix.pipeline.data.synth", description="write generated audio")
    sub = parser.add_subparsers(dest="what", required=True)
    demo = sub.add_parser("demo", help="a few toy mixtures in assorted formats and names")
    demo.add_argument("out")
    demo.add_argument("--seed", type=int, default=0)
    cat = sub.add_parser("demo-catalog", help="the make-demo catalog: synthetic songs, odd names, one corrupt file")
    cat.add_argument("out")
    cat.add_argument("--tracks", type=int, default=3)
    cat.add_argument("--seconds", type=float, default=12.0)
    data = sub.add_parser("dataset", help="synthetic multitrack songs in MUSDB layout (needs fluidsynth)")
    data.add_argument("out", help="output folder: OUT/<track>/{mixture,vocals,drums,bass,other}.wav, OUT/truth.json")
    data.add_argument("--tracks", type=int, default=SynthConfig.tracks, help="number of songs (default: %(default)s)")
    data.add_argument("--seconds", type=float, default=SynthConfig.seconds, help="length of each song (default: %(default)s)")
    data.add_argument("--seed", type=int, default=SynthConfig.seed, help="dataset seed (default: %(default)s)")
    data.add_argument("--sample-rate", type=int, default=SynthConfig.sample_rate, help="Hz (default: %(default)s)")
    data.add_argument("--absent-share", type=float, default=SynthConfig.absent_share,
                      help="share of tracks with stems left out on purpose (default: %(default)s)")
    data.add_argument("--soundfont", default=None, help=f"General MIDI .sf2 (default: ${SOUNDFONT_ENV} or FluidR3_GM.sf2)")
    data.add_argument("--vocals", choices=VOCAL_ENGINES, default=SynthConfig.vocals,
                      help="espeak: sung syllables; gm: General MIDI voices; auto: espeak when installed "
                           "(classic profile; the others draw each song's voice engine)")
    data.add_argument("--profile", choices=tuple(PROFILES), default=SynthConfig.profile,
                      help="classic: one soundfont, sung espeak-ng vocals, no effects (as always); train: several "
                           "soundfonts, espeak-ng and flite voices sung and spoken, per-stem effects, wider ranges, "
                           "sparse and dense arrangements, moving loudness; heldout: the same variety on a soundfont "
                           "(TimGM6mb) and a voice engine (festival) that train never uses (default: %(default)s)")
    data.add_argument("--jobs", type=int, default=1, help="songs rendered at once (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.what == "demo":
        for p in write_demo_inputs(args.out, args.seed):
            print(p)
        return 0
    if args.what == "demo-catalog":
        try:
            print(write_demo_catalog(args.out, tracks=args.tracks, seconds=args.seconds))
        except (SynthError, ValueError) as err:
            print(f"demix.pipeline.data.synth: {err}", file=sys.stderr)
            return 1
        return 0
    try:
        config = SynthConfig(
            tracks=args.tracks, seconds=args.seconds, seed=args.seed, sample_rate=args.sample_rate,
            absent_share=args.absent_share, soundfont=args.soundfont, vocals=args.vocals, profile=args.profile,
        )
        truth = synth_dataset(args.out, config, jobs=args.jobs)
    except (SynthError, ValueError) as err:
        print(f"demix.pipeline.data.synth: {err}", file=sys.stderr)
        return 1
    for name in map(track_name, range(config.tracks)):
        print(name, " ".join(s for s in STEMS if truth[name][s]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
