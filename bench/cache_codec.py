"""Size, accuracy and speed of the teacher-cache codecs at a realistic vocabulary (V = 151,936), on CPU.

Teacher-like distributions: logits = a Zipf-like log-frequency prior over the vocabulary (-0.6 log(1 + rank/100)) +
standard normal noise + a few boosted "context" candidates drawn from the prior, divided by a per-position
temperature found by bisection so that the entropies spread uniformly over 0.5-3 nats (top-1 probabilities
come out at 0.4-0.9). "skewed": rank = token id (frequent tokens have small ids, as in BPE vocabularies);
"uniform": a random permutation (ids spread uniformly: the codec's worst case). Students: the teacher's logits
plus Gaussian noise of std 0.5 (top-k KL about 0.05 nats, a student close to its teacher: the hard case for a
relative error) and 1.0 (about 0.2 nats).

For each case and k = 16, 64, 128 the records (64 positions each) go through ``CacheWriter`` into a real cache
folder (replicated to 128 records so the shard and index overheads are amortized as in a real shard) and back
through ``CacheReader``:

* B/token, B/entry: all bytes of the folder (header.json, the shard, the merged index) per stored position
  and per stored (id, log-prob) entry;
* KL rel err: (mean top-k KL from the decoded cache - mean from the uncompressed top-k) / the latter, with
  ``mmkd.losses.TopKKL(tail="bucket")``, for both students; tok rms: root mean square of the per-token relative
  error (student std 1.0). TopKKL reads a student only through its log-probs at the teacher's ids and its mass
  outside them, so it runs on those K + 1 numbers, computed in float64 from the full logits (the line under the
  table compares this with TopKKL on the full float32 logits);
* write / read tok/s: ``CacheWriter.add`` (checks, encoding, checksum; shard write included) and
  ``CacheReader.get`` (slices, checksum, decoding), one process on this machine.

At k = 64 two alternatives of the packed codec are measured too: a uniform 1/32-nat grid (``lin 1/32``) and the
chosen grid with a coarser top step (``1/48``). A second table compares layouts by the bits per entry of their
coded ids and log-probs (no overheads).

    .venv/bin/python bench/cache_codec.py               # 1,024 tokens per case (45-90 s on 2 cores)
    .venv/bin/python bench/cache_codec.py --tokens 512  # quicker
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmkd.cache import CacheReader, CacheSpec, CacheWriter, PackedCodec, RawCodec, finalize, record_key, teacher_topk
from mmkd.cache.bits import choose_codes
from mmkd.losses import TopKKL

V = 151_936
KS = (16, 64, 128)
RECORD_LEN = 64
REPLICAS = 8


def teacher_logits(n: int, skewed: bool, seed: int, chunk: int = 128) -> torch.Tensor:
    """``(n, V)`` teacher-like logits (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(V) if skewed else torch.randperm(V, generator=g)
    prior = -0.6 * torch.log1p(rank.float() / 100)
    out = torch.empty(n, V)
    # Preallocated buffers: fresh (chunk, V) temporaries every bisection step cost more in page faults than in math.
    x, e = torch.empty(chunk, V), torch.empty(chunk, V)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = out[start : start + m]
        torch.randn(m, V, generator=g, out=z)
        z.add_(prior)
        cand = torch.multinomial(torch.softmax(prior, 0), m * 8, replacement=True, generator=g).view(m, 8)
        z.scatter_add_(1, cand, torch.rand(m, 8, generator=g) * 6 + 2)
        target = 0.5 + 2.5 * torch.rand(m, 1, generator=g)
        zmax = z.max(-1, keepdim=True).values
        lo, hi = torch.full((m, 1), 0.05), torch.full((m, 1), 3.0)
        xm, em = x[:m], e[:m]
        for _ in range(8):  # bisection on the temperature: the entropy grows with it
            mid = (lo + hi) / 2
            torch.sub(z, zmax, out=xm).div_(mid)
            torch.exp(xm, out=em)
            total = em.sum(-1, keepdim=True)
            entropy = total.log() - em.mul_(xm).sum(-1, keepdim=True) / total
            low = entropy < target
            lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
        z.div_((lo + hi) / 2)
    return out


def chunked_topk(logits: torch.Tensor, k: int, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = [teacher_topk(logits[s : s + chunk], k) for s in range(0, len(logits), chunk)]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def prefix_topk(ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The top-k of a larger top-K: the first k entries, and the tail plus the mass of entries k..K-1."""
    rest = torch.cat([tail.double()[:, None], lp[:, k:].double()], 1).logsumexp(1)
    return ids[:, :k], lp[:, :k], rest.float()


class StudentTopK:
    """A student's log-probs at the teacher's top-k ids plus its log mass outside them, ``(N, K + 1)``.

    ``TopKKL(tail="bucket")`` reads a student only through these K + 1 numbers, so it gives the same value on
    these as on the full ``(N, V)`` logits, at a fraction of the cost (compared once per case with TopKKL on the
    full float32 logits, in :func:`main`). Decoded ids are a permutation of the original ones per row;
    :meth:`relabel` maps them to the reduced vocabulary 0..K-1.
    """

    def __init__(self, logp: torch.Tensor, ids: torch.Tensor) -> None:
        self.logp = logp  # (N, K + 1) float64
        self.ids = ids
        self.order = ids.argsort(1)
        self.sorted_ids = ids.gather(1, self.order)

    @classmethod
    def of(cls, student: torch.Tensor, ids: torch.Tensor, chunk: int = 128) -> StudentTopK:
        rows = []
        for s in range(0, len(ids), chunk):
            # float64: torch's float32 log-softmax over 151,936 ids is off by up to ~1e-4 (its sum is 1.0001).
            logp = torch.log_softmax(student[s : s + chunk].double(), -1)
            idx = ids[s : s + chunk]
            tail = logp.scatter(1, idx, float("-inf")).logsumexp(-1, keepdim=True)
            rows.append(torch.cat([logp.gather(1, idx), tail], 1))
        return cls(torch.cat(rows), ids)

    def prefix(self, k: int) -> StudentTopK:
        """The same student against the teacher's first k ids."""
        tail = self.logp[:, k:].logsumexp(1, keepdim=True)
        return StudentTopK(torch.cat([self.logp[:, :k], tail], 1), self.ids[:, :k])

    def kl(self, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """TopKKL per token for teacher ``ids`` (a per-row permutation of this student's) and ``logprobs``."""
        relabeled = self.order.gather(1, torch.searchsorted(self.sorted_ids, ids.contiguous()))
        return TopKKL(tail="bucket").per_token(self.logp.float(), relabeled, logprobs).double()


def run_cache(folder: Path, codec, k: int, ids, lp, tail) -> dict:
    """Write the records (replicated) through CacheWriter, read them back; bytes, speeds, decoded top-k."""
    shutil.rmtree(folder, ignore_errors=True)
    spec = CacheSpec(teacher="bench/teacher", vocab_size=V, k=k, tokenizer="bench", codec=codec)
    n = ids.shape[0]
    starts = range(0, n, RECORD_LEN)
    keys = [
        [record_key([rep, s], [], list(range(s, min(s + RECORD_LEN, n)))) for s in starts] for rep in range(REPLICAS)
    ]
    # Throughputs are the best of the replicas (write) and of three passes (read): the machine may be shared.
    write_times = []
    with CacheWriter(folder, spec, shard_records=10**6) as writer:
        for rep in range(REPLICAS):
            t = time.perf_counter()
            for key, s in zip(keys[rep], starts, strict=True):
                e = min(s + RECORD_LEN, n)
                writer.add(key, np.arange(s, e), ids[s:e], lp[s:e], tail[s:e])
            write_times.append(time.perf_counter() - t)
        t = time.perf_counter()
    write_time = min(write_times) + (time.perf_counter() - t) / REPLICAS  # plus a share of the shard write
    finalize(folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    reader = CacheReader(folder, expect=spec)
    read_time = math.inf
    for _ in range(3):
        t = time.perf_counter()
        got = [reader.get(key) for key in keys[0]]
        read_time = min(read_time, time.perf_counter() - t)
    return {
        "bytes_per_token": size / (n * REPLICAS),
        "write": n / write_time,
        "read": n / read_time,
        "ids": torch.cat([r.ids for r in got]),
        "lp": torch.cat([r.logprobs for r in got]),
    }


def layout_bits(ids: np.ndarray, lp: np.ndarray) -> dict[str, float]:
    """Bits per entry of the coded ids and log-probs under alternative layouts (no per-position overheads)."""

    def golomb_bits(values: np.ndarray) -> float:
        family, order = choose_codes(values)
        b = order.astype(np.int64)[:, None]
        q = values >> b
        eg = 2 * (np.frexp((q + 1).astype(np.float64))[1] - 1)
        bits = np.where(family[:, None] == 1, eg, q) + 1 + b
        return float(bits.sum()) / values.size

    n, k = ids.shape
    order = np.argsort(ids, axis=1)
    sid = np.take_along_axis(ids, order, 1)
    gaps = np.diff(sid, axis=1, prepend=-1) - 1
    gap = lp[:, :1].astype(np.float64) - lp
    c = PackedCodec()
    levels = np.rint(c.doubling_gap * np.log1p(gap / c.doubling_gap) / c.logprob_step).astype(np.int64)
    lin = np.rint(gap * 32).astype(np.int64)

    def rev(s: np.ndarray) -> np.ndarray:
        return s.max(axis=1, keepdims=True) - s

    bound = (math.lgamma(V + 1) - math.lgamma(k + 1) - math.lgamma(V - k + 1)) / math.log(2) / k
    return {
        "ids: id-sorted gaps (chosen)": golomb_bits(gaps),
        "ids: ranked, 18-bit": 18.0,
        "ids: log2 C(V,k)/k (uniform bound)": bound,
        "lp: id order, log1p grid 1/80, d0=2 (chosen)": golomb_bits(rev(np.take_along_axis(levels, order, 1))),
        "lp: id order, linear grid 1/32": golomb_bits(rev(np.take_along_axis(lin, order, 1))),
        "lp: ranked, deltas of the log1p grid": golomb_bits(np.diff(levels, axis=1, prepend=0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="positions per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report(args.tokens, args.seed)


def report(tokens: int, seed: int) -> None:
    """Measure every case and print the tables (bench/cache.py prints them too)."""
    args = argparse.Namespace(tokens=tokens, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix="mmkd-cache-bench-"))
    rows, layouts, full_vs_reduced = [], {}, {}
    try:
        for case, skewed in (("skewed", True), ("uniform", False)):
            t0 = time.perf_counter()
            z = teacher_logits(args.tokens, skewed, args.seed)
            stats = torch.cat([torch.log_softmax(z[s : s + 128], -1) for s in range(0, len(z), 128)])
            entropy = -(stats.exp() * stats).sum(-1)
            top1 = stats.max(-1).values.exp()
            del stats
            ids_k, lp_k, tail_k = chunked_topk(z, max(KS))
            g = torch.Generator().manual_seed(args.seed + 1)
            students = {}
            for std in (0.5, 1.0):
                student = z + std * torch.randn(z.shape, generator=g)
                students[std] = StudentTopK.of(student, ids_k)
                if std == 1.0:  # the reduced student against TopKKL on the full float32 logits, once per case
                    ids, lp, _ = prefix_topk(ids_k, lp_k, tail_k, 64)
                    full = torch.cat(
                        [
                            TopKKL().per_token(student[s : s + 256], ids[s : s + 256], lp[s : s + 256])
                            for s in range(0, len(ids), 256)
                        ]
                    ).double()
                    reduced = students[std].prefix(64).kl(ids, lp)
                    full_vs_reduced[case] = ((full.mean() - reduced.mean()) / reduced.mean()).item()
                del student
            h05, h95, p05, p95 = (float(x.quantile(q)) for x in (entropy, top1) for q in (0.05, 0.95))
            built = time.perf_counter() - t0
            print(
                f"{case}: {args.tokens} tokens, entropy {h05:.2f}-{h95:.2f} nats, top-1 p {p05:.2f}-{p95:.2f} "
                f"(5-95%), built in {built:.0f} s",
                flush=True,
            )
            for k in KS:
                ids, lp, tail = prefix_topk(ids_k, lp_k, tail_k, k)
                reduced = {std: r.prefix(k) for std, r in students.items()}
                ref = {std: r.kl(ids, lp) for std, r in reduced.items()}
                if k == 64:
                    layouts[case] = layout_bits(ids.numpy(), lp.numpy())
                codecs = [("packed", PackedCodec()), ("raw", RawCodec())]
                if k == 64:
                    codecs += [("lin 1/32", PackedCodec(1 / 32, doubling_gap=1e9)), ("1/48", PackedCodec(1 / 48))]
                for name, codec in codecs:
                    out = run_cache(tmp / f"{case}-{k}-{name}", codec, k, ids, lp, tail)
                    rel, rms = {}, 0.0
                    for std, r in reduced.items():
                        got = r.kl(out["ids"], out["lp"])
                        rel[std] = ((got.mean() - ref[std].mean()) / ref[std].mean()).item()
                        if std == 1.0:
                            rms = ((got - ref[std]) / ref[std]).pow(2).mean().sqrt().item()
                    kl = {std: r.mean().item() for std, r in ref.items()}
                    rows.append((case, k, name, out["bytes_per_token"], rel, rms, kl, out["write"], out["read"]))
            del z, students
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    head = (
        f"{'ids':8s} {'k':>4s} {'codec':8s} {'B/token':>8s} {'B/entry':>8s} {'KL rel err (std .5 / 1)':>24s} "
        f"{'tok rms':>8s} {'KL (std .5 / 1)':>16s} {'write tok/s':>12s} {'read tok/s':>11s}"
    )
    print(head)
    print("-" * len(head))
    for case, k, name, bpt, rel, rms, kl, write, read in rows:
        print(
            f"{case:8s} {k:4d} {name:8s} {bpt:8.1f} {bpt / k:8.3f} {rel[0.5]:+11.1e} / {rel[1.0]:+9.1e} {rms:8.1e} "
            f"{kl[0.5]:7.3f} / {kl[1.0]:6.3f} {write:12,.0f} {read:11,.0f}"
        )
    print(
        "TopKKL on the full float32 student logits vs on the exact reduced student (k = 64, std 1): "
        + ", ".join(f"{case} {v:+.1e}" for case, v in full_vs_reduced.items())
        + " relative (float32 log-softmax over V: the floor of any comparison made in float32)"
    )
    print()
    print(f"bits per entry at k = 64, coded values only: {'skewed':>8s} {'uniform':>8s}")
    for label in layouts["skewed"]:
        print(f"  {label:48s} {layouts['skewed'][label]:8.2f} {layouts['uniform'][label]:8.2f}")


if __name__ == "__main__":
    main()
