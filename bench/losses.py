"""Memory and time of forward KL, naive vs chunked, forward + backward, on CPU in float32.

Both sides are given as final hidden states and LM head weights (the model output contract). The naive case
builds the full ``(tokens, V)`` logits of both sides; the chunked case uses ``mmkd.losses.chunked_token_loss``.
Each case runs in a fresh subprocess so that peak resident sets do not mix. "Added" memory is the peak
resident set during forward + backward minus the resident set once the inputs, heads and gradient buffers
exist (the kernel's peak counter is reset at that point through /proc/self/clear_refs).

    python bench/losses.py                               # V=151,936, H=896, 4,096 tokens (needs ~18 GB)
    python bench/losses.py --tokens 512 --vocab 32000    # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(case: str, tokens: int, vocab: int, hidden: int, chunk_size: int | None, seed: int) -> dict:
    import torch

    from mmkd.losses import ForwardKL, chunked_token_loss

    torch.manual_seed(seed)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.05).requires_grad_()
    teacher_h = torch.randn(tokens, hidden)
    teacher_w = torch.randn(vocab, hidden) * 0.05
    # Gradient buffers exist before the measurement (as they do after the first step of a training run).
    h.grad = torch.zeros_like(h)
    w.grad = torch.zeros_like(w)
    loss_fn = ForwardKL()
    (torch.randn(64, hidden) @ w.detach()[:1024].t()).sum()  # warm up the matmul kernels
    baseline = _rss_mb("VmRSS")
    exact_peak = _reset_peak()
    start = time.perf_counter()
    if case == "naive":
        logits = h @ w.t()
        with torch.no_grad():
            teacher_logits = teacher_h @ teacher_w.t()
        loss = loss_fn.per_token(logits, teacher_logits).mean()
        loss.backward()
        del logits, teacher_logits
    else:
        loss = chunked_token_loss(loss_fn, h, w, teacher_h, teacher_w, chunk_size=chunk_size)
        loss.backward()
    seconds = time.perf_counter() - start
    peak = _rss_mb("VmHWM")
    return {
        "case": case,
        "tokens": tokens,
        "vocab": vocab,
        "hidden": hidden,
        "chunk_size": chunk_size,
        "threads": torch.get_num_threads(),
        "loss": float(loss),
        "grad_w_norm": float(w.grad.norm()),
        "baseline_mb": round(baseline, 1),
        "peak_mb": round(peak, 1),
        "added_mb": round(peak - baseline, 1),
        "seconds": round(seconds, 2),
        "exact_peak": exact_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: ~64 MiB of logits)")
    parser.add_argument("--cases", default="naive,chunked", help="comma-separated: naive, chunked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_case(args.child, args.tokens, args.vocab, args.hidden, args.chunk_size, args.seed)
        print(json.dumps(result))
        return

    results = []
    for case in args.cases.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--seed", str(args.seed)]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{case:8s} added {r['added_mb']:9.1f} MB  peak {r['peak_mb']:9.1f} MB  "
              f"baseline {r['baseline_mb']:8.1f} MB  {r['seconds']:7.2f} s  loss {r['loss']:.6f}", flush=True)
    by_case = {r["case"]: r for r in results}
    if {"naive", "chunked"} <= set(by_case):
        naive, chunked = by_case["naive"], by_case["chunked"]
        print(f"chunked/naive: added memory {chunked['added_mb'] / naive['added_mb']:.4f} (target <= 0.0625), "
              f"time {chunked['seconds'] / naive['seconds']:.3f} (target <= 1.2), "
              f"|loss diff| {abs(chunked['loss'] - naive['loss']):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
