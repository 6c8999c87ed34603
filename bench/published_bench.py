"""CPU (or GPU) real-time factor of the published models' networks, one chunk each, random weights.

    .venv/bin/python bench/published_bench.py [--models htdemucs,bs-roformer-vocals] [--device cpu] [--repeats 1]

Each model is built full size from its registry config (weights do not change the cost) and runs one
forward over its own segment (HT Demucs 7.8 s, RoFormers 8 s); a bag runs its four members. RTF here
is compute seconds per audio second (> 1: slower than real time); the engine adds overlap (0.25 for
demucs: x1.33 chunks, 0.5 for the RoFormers: x2) and decode/encode around it. Run by hand.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the demix command does

import torch  # noqa: E402

from demix.models.registry import load_model  # noqa: E402

MODELS = ("htdemucs", "htdemucs_6s", "htdemucs_ft", "bs-roformer-vocals", "mel-roformer-vocals", "hdemucs-musdb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print("| model | segment s | forward s | RTF (compute / audio) |\n| --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        model = load_model(name, pretrained=False, device=args.device)
        n = round(model.segment * model.sample_rate)
        x = torch.randn(1, model.audio_channels, n, device=args.device)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(x)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        print(f"| {name} | {model.segment:.2f} | {best:.2f} | {best / model.segment:.2f} |", flush=True)


if __name__ == "__main__":
    main()
