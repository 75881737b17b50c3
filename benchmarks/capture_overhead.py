"""What the thread-local capture costs in the forward pass, as a ratio measured side by side.

The capture is a ``TorchFunctionMode``: every torch function the model calls on the attributing
thread passes through one Python check. This measures the pretrained MiniLM's forward with
gradients enabled, with and without the mode (recording attention as an attribution does),
interleaved and repeated so that a noisy machine affects both alike, and reports medians.

    python benchmarks/capture_overhead.py [--tokens 128] [--batch 4] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from captum_chefer.capture import Recorder, capture_attention
from captum_chefer.demo import load_minilm


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _ = load_minilm()
    ids = torch.randint(1000, 20000, (args.batch, args.tokens))

    def plain() -> None:
        with torch.enable_grad():
            model(ids).last_hidden_state.sum()

    def captured() -> None:
        recorder = Recorder()
        with torch.enable_grad(), capture_attention(model, recorder):
            model(ids).last_hidden_state.sum()
        assert len(recorder.records) == 6

    for function in (plain, captured):
        function()
    times: dict[str, list[float]] = {"plain": [], "captured": []}
    for _ in range(args.repeats):
        times["plain"].append(_timed(plain))
        times["captured"].append(_timed(captured))
    plain_s, captured_s = (statistics.median(times[k]) for k in ("plain", "captured"))
    print(f"MiniLM forward, batch {args.batch} x {args.tokens} tokens, {args.repeats} repeats")
    print(f"plain forward (grad enabled): {plain_s * 1e3:.1f} ms (median)")
    print(f"forward with the capture mode: {captured_s * 1e3:.1f} ms (median)")
    print(f"ratio: {captured_s / plain_s:.3f}")


if __name__ == "__main__":
    main()
