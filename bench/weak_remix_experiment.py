"""The label-scarce experiment of the weak remix recipe (issue 12, deliverable 4). Run by hand.

For each seed: synthesise LABELLED songs (``--profile train``) and UNLABELLED songs from another generator
configuration (``--profile classic``, another seed: never the heldout profile, which is the judge),
separate the unlabelled ones (``demix run``, presence detected), build weak remixes from them
(``demix remix --labelled``), train the U-Net from the same initialisation for the same steps on the
labelled songs alone and on them plus the weak remixes, and score both on one heldout set
(``demix evaluate``, ``--profile heldout``, the same songs for every seed). Prints every command it runs,
the per-song paired SDR differences (with remixes minus without) per stem, and the mean and 95 %
confidence interval over seeds of the per-seed mean difference.

    .venv/bin/python bench/weak_remix_experiment.py --work /tmp/weak-exp                   # the full run
    .venv/bin/python bench/weak_remix_experiment.py --work /tmp/weak-smoke --smoke         # 1 step, tiny sets

Everything lands under ``--work/seed-<k>/``; a rerun reuses what each step already wrote (the synth
folders, the committed run and remixes, the trained runs) and redoes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEMIX = str(Path(sys.executable).with_name("demix"))
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def sh(cmd: list[str], done: Path | None = None) -> None:
    """Print and run ``cmd`` (skipped when ``done`` exists: a rerun resumes)."""
    print("$ " + shlex.join(cmd), flush=True)
    if done is not None and done.exists():
        print("  (done before; skipped)", flush=True)
        return
    subprocess.run(cmd, check=True, cwd=ROOT)


def synth(out: Path, tracks: int, seconds: float, seed: int, profile: str, jobs: int) -> None:
    sh([DEMIX, "synth", str(out), "--tracks", str(tracks), "--seconds", str(seconds), "--seed", str(seed),
        "--profile", profile, "--jobs", str(jobs), "--no-progress"], out / "truth.json")


def catalog(songs: Path, out: Path) -> Path:
    """A CSV catalog of the unlabelled songs' mixtures (track ids: ``u-<song>``, apart from the labelled
    songs' names in the lineage); their stems are never read."""
    rows = [{"uri": str(p / "mixture.wav"), "track_id": f"u-{p.name}"} for p in sorted(songs.iterdir()) if (p / "mixture.wav").is_file()]
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def train_and_score(args, name: str, labelled: Path, heldout: Path, work: Path, weak: Path | None) -> pd.DataFrame:
    run = work / name
    cmd = [DEMIX, "train", str(labelled), "-o", str(run), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--excerpt", str(args.excerpt), "--valid-every", str(args.valid_every), "--checkpoint-every", str(args.valid_every),
           "--seed", "0", "--device", args.device, "--export", str(run / "export"), "--no-progress"]
    if args.init_weights:
        cmd += ["--init-weights", args.init_weights]
    if weak is not None:
        cmd += ["--weak-data", str(weak), "--weak-share", str(args.weak_share)]
    sh(cmd, run / "export")
    weights = next((run / "export").glob("unet-*.safetensors"))
    scores = work / f"eval-{name}"
    sh([DEMIX, "evaluate", str(heldout), "-o", str(scores), "-m", "unet", "--weights", str(weights), "--trust-weights",
        "--previews", "0", "--no-progress"], scores / "scores.parquet")
    return pd.read_parquet(scores / "scores.parquet")[["track", "stem", "sdr"]]


def one_seed(args, seed: int, heldout: Path) -> pd.DataFrame:
    """Paired per-song SDR differences (weak minus base) of one seed: columns track, stem, base, weak, diff."""
    work = Path(args.work) / f"seed-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    labelled, unlabelled = work / "labelled", work / "unlabelled"
    synth(labelled, args.labelled, args.seconds, seed, "train", args.jobs)
    synth(unlabelled, args.unlabelled, args.seconds, 1000 + seed, "classic", args.jobs)
    run, remixes = work / "run", work / "remixes"
    sh([DEMIX, "run", str(catalog(unlabelled, work / "catalog.csv")), "-o", str(run), "--presence", args.presence, "--quiet"],
       run / "manifests" / "stems.parquet")
    sh([DEMIX, "remix", str(run), "-o", str(remixes), "--labelled", str(labelled), "--examples", str(args.examples),
        "--seconds", str(args.example_seconds), "--seed", str(seed), "--quiet"], remixes / "manifests" / "remixes.parquet")
    base = train_and_score(args, "base", labelled, heldout, work, None)
    weak = train_and_score(args, "weak", labelled, heldout, work, remixes / "train")
    paired = base.merge(weak, on=["track", "stem"], suffixes=("_base", "_weak")).dropna()
    paired = paired.rename(columns={"sdr_base": "base", "sdr_weak": "weak"})
    paired["diff"] = paired["weak"] - paired["base"]
    paired["seed"] = seed
    return paired


def report(all_pairs: pd.DataFrame) -> dict:
    """Print per-song differences and the over-seed summary; returns the summary."""
    print("\nper-song paired SDR difference (weak remixes minus labelled only), dB")
    print(all_pairs.pivot_table(index=["seed", "track"], columns="stem", values="diff").round(2).to_string())
    summary = {}
    print(f"\n{'stem':<8} {'mean diff':>10} {'95% CI':>20} {'per seed':>30} {'songs better':>13}")
    for stem, g in all_pairs.groupby("stem"):
        per_seed = g.groupby("seed")["diff"].mean().tolist()
        mean = statistics.fmean(per_seed)
        half = T95.get(len(per_seed) - 1, 1.96) * statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else math.nan
        better = f"{int((g['diff'] > 0).sum())}/{len(g)}"
        print(f"{stem:<8} {mean:>10.2f} {f'[{mean - half:.2f}, {mean + half:.2f}]':>20} {str([round(x, 2) for x in per_seed]):>30} {better:>13}")
        summary[stem] = {"mean_diff_db": mean, "ci95_db": [mean - half, mean + half], "per_seed": per_seed, "songs_better": better}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for everything the experiment writes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labelled", type=int, default=30, help="labelled songs per seed (--profile train)")
    p.add_argument("--unlabelled", type=int, default=120, help="unlabelled songs per seed (--profile classic, another seed)")
    p.add_argument("--heldout", type=int, default=20, help="heldout songs (--profile heldout, one set for all seeds)")
    p.add_argument("--seconds", type=float, default=30.0, help="song length")
    p.add_argument("--examples", type=int, default=240, help="weak remix examples per seed")
    p.add_argument("--example-seconds", type=float, default=6.0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--excerpt", type=float, default=6.0)
    p.add_argument("--valid-every", type=int, default=500)
    p.add_argument("--weak-share", type=float, default=0.5)
    p.add_argument("--init-weights", help="start both runs from these weights (default: the same random init, seed 0)")
    p.add_argument("--presence", default="combined", help="demix run --presence (default: combined)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=2, help="demix synth --jobs")
    p.add_argument("--smoke", action="store_true", help="tiny sets and 1 step: checks the commands, measures nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.labelled, args.unlabelled, args.heldout, args.seconds = [0], 3, 4, 2, 12.0
        args.examples, args.example_seconds, args.steps, args.valid_every, args.batch_size, args.excerpt = 4, 3.0, 1, 1, 2, 2.0
        args.presence = "energy"
    heldout = Path(args.work) / "heldout"
    synth(heldout, args.heldout, args.seconds, 999, "heldout", args.jobs)
    pairs = pd.concat([one_seed(args, seed, heldout) for seed in args.seeds], ignore_index=True)
    summary = report(pairs)
    (Path(args.work) / "summary.json").write_text(json.dumps(summary, indent=1))
    pairs.to_csv(Path(args.work) / "paired.csv", index=False)
    print(f"\nwrote {Path(args.work) / 'summary.json'} and {Path(args.work) / 'paired.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
