"""``mmkd cache``: run a stage's teacher once over the stage's data and store what its losses read.

For a distillation stage each record stores the teacher's top-k ids, log-probabilities and log tail mass at the
positions whose logits predict answer tokens; for a preference stage, the teacher's summed log-probabilities of the
chosen and the rejected answer. Records are keyed by a hash of exactly what the teacher saw (token ids, stored
positions, images), computed by the stage's own collator, so a stage that reads the cache (``task_args.teacher_cache``)
joins each sample with its record by content.

How it runs: every rank reads the recipe, builds the stage's collator and computes the key of every record (a
pass over the data, no model); duplicate records are cached once. The unique records are dealt round-robin to the
ranks, a rank's records form fixed batches, and a batch whose records are all in complete shards already is not
run again (``mmkd cache`` resumes after a kill; a shard is written under a temporary name and renamed once complete,
so rerunning produces the shards an uninterrupted run would). The teacher runs under the stage's strategy and
precision (Lightning's predict loop): a replica per rank (DDP, ZeRO-2) or ZeRO-3 partitions, in which case every
rank runs the same number of batches (ranks with fewer run repeats whose output is not written).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmkd.train.recipe import Recipe, RecipeError, StageSpec
from mmkd.train.rundir import RunDir, is_rank_zero

__all__ = ["CACHE_FAULT_ENV", "cache_stage", "verify_command"]

# Test-only: ``MMKD_CACHE_FAULT=kill:N`` sends SIGKILL to the process after its N-th batch (1-based).
CACHE_FAULT_ENV = "MMKD_CACHE_FAULT"
# Records per shard: a multiple of every usual batch size, ~0.5 GB at 300 answer tokens per record and k=64.
SHARD_RECORDS = 4096
DEFAULT_K = 64


class _Batches(Dataset):
    """Item ``i``: the records of batch ``i`` of this rank and whether its output is written."""

    def __init__(self, dataset: Dataset, batches: Sequence[tuple[list[int], bool]]) -> None:
        self.dataset = dataset
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[list[Any], bool]:
        indices, write = self.batches[i]
        return [self.dataset[j] for j in indices], write


class _Collate:
    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, item: tuple[list[Any], bool]) -> tuple[Any, bool]:
        records, write = item
        return self.collator(records), write


def plan_batches(unique: Sequence[tuple[int, str]], done: set[str], *, rank: int, world: int, batch_size: int,
                 same_count: bool) -> tuple[list[tuple[list[int], bool]], int]:
    """This rank's batches: its round-robin share of the unique records in fixed batches, without batches already
    complete; with ``same_count`` (ZeRO-3) padded with unwritten repeats to the largest rank's count.

    Returns:
        ``(batches, records to write)``; each batch is ``(dataset indices, write)``.
    """
    def share(r: int) -> list[list[tuple[int, str]]]:
        mine = list(unique[r::world])
        chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        return [c for c in chunks if not all(key in done for _, key in c)]

    own = share(rank)
    batches = [([i for i, _ in c], True) for c in own]
    todo = sum(1 for c in own for _, key in c if key not in done)
    if same_count:
        most = max(len(share(r)) for r in range(world))
        filler = batches[-1][0] if batches else [unique[0][0]] if unique else []
        batches += [(filler, False)] * (most - len(batches)) if filler else []
    return batches, todo


class CacheModule(L.LightningModule):
    """The teacher over this rank's batches, each batch's targets appended to this rank's cache writer."""

    def __init__(self, teacher: nn.Module, dataset: Dataset, collator: Any, unique: list[tuple[int, str]],
                 done: set[str], *, folder: Path, spec: Any, batch_size: int, num_workers: int, k: int,
                 chunk_size: int | None, preference: bool, shard_records: int = SHARD_RECORDS,
                 echo: Callable[[str], None] = print) -> None:
        super().__init__()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never wrapped, converted or checkpointed
        self._anchor = nn.Parameter(torch.zeros(1))  # strategies need one parameter to wrap
        self.dataset, self.collator, self.unique, self.done = dataset, collator, unique, done
        self.folder, self.spec, self.batch_size, self.num_workers = folder, spec, batch_size, num_workers
        self.k, self.chunk_size, self.preference, self.echo = k, chunk_size, preference, echo
        self.shard_records = shard_records
        self.batches: list[tuple[list[int], bool]] = []
        self.todo = 0
        self.writer = None
        self.written = {"records": 0, "positions": 0, "tokens": 0}
        self._fault = _fault_after()
        self._bar = None
        self._t0 = 0.0

    def setup(self, stage: str) -> None:
        from mmkd.train.strategies import is_zero3

        world, rank = max(1, self.trainer.world_size), self.trainer.global_rank
        self.batches, self.todo = plan_batches(self.unique, self.done, rank=rank, world=world,
                                               batch_size=self.batch_size, same_count=is_zero3(self.trainer.strategy))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.dataset, self.batches), batch_size=None, shuffle=False,
                          num_workers=self.num_workers, collate_fn=_Collate(self.collator))

    def on_predict_start(self) -> None:
        from mmkd.cache import CacheWriter
        from mmkd.train.teachers import place_teacher

        self.teacher.eval().requires_grad_(False)
        object.__setattr__(self, "_engine", place_teacher(self.teacher, self.trainer.strategy, self.device))
        self.writer = CacheWriter(self.folder, self.spec, rank=self.trainer.global_rank,
                                  shard_records=self.shard_records, shard_bytes=1 << 40)
        self._t0 = time.time()
        if self.trainer.is_global_zero:
            from tqdm import tqdm

            self._bar = tqdm(total=self.todo, unit="rec", desc="mmkd cache", file=sys.stderr, mininterval=1.0,
                             dynamic_ncols=True)

    def predict_step(self, batch: tuple[Any, bool], batch_idx: int) -> None:
        batch, write = batch
        with torch.no_grad():
            new = self._preference(batch, write) if self.preference else self._topk(batch, write)
        if self._bar is not None and write:
            world = max(1, self.trainer.world_size)
            rate = self.written["tokens"] * world / max(time.time() - self._t0, 1e-9)
            self._bar.set_postfix_str(f"{rate:,.0f} tok/s (rank 0 x {world})", refresh=False)
            self._bar.update(new)
        if self._fault is not None and batch_idx + 1 == self._fault:
            os.kill(os.getpid(), signal.SIGKILL)

    def _topk(self, batch: Any, write: bool) -> int:
        from mmkd.objectives import answer_positions
        from mmkd.objectives.tokens import answer_topk

        inputs, labels = batch.teacher_side()
        out = self.teacher(**inputs.kwargs())
        mask = answer_positions(labels)
        ids, logprobs, log_tail = (t.cpu() for t in answer_topk(out, mask, self.k, self.chunk_size))
        if not write:
            return 0
        mask = mask.cpu()
        counts = mask.sum(1).tolist()
        start, new = 0, 0
        for row, (key, n) in enumerate(zip(batch.keys, counts)):
            end = start + n
            if key not in self.writer:
                positions = mask[row].nonzero().flatten()
                self.writer.add(key, positions, ids[start:end], logprobs[start:end], log_tail[start:end])
                self.written["records"] += 1
                self.written["positions"] += n
                self.written["tokens"] += int(inputs.attention_mask[row].sum())
                new += 1
            start = end
        return new

    def _preference(self, batch: Any, write: bool) -> int:
        from mmkd.objectives import answer_logprobs

        sides = []
        for side in (batch.chosen, batch.rejected):
            inputs, labels = side.teacher_side()
            sides.append(answer_logprobs(self.teacher(**inputs.kwargs()), labels).double().cpu())
        if not write:
            return 0
        new = 0
        for row, key in enumerate(batch.keys):
            if key not in self.writer:
                self.writer.add(key, sequence_logprobs=(sides[0][row], sides[1][row]))
                self.written["records"] += 1
                self.written["tokens"] += int(batch.chosen.teacher_side()[0].attention_mask[row].sum())
                new += 1
        return new

    def on_predict_end(self) -> None:
        self.writer.close()
        if self._bar is not None:
            self._bar.close()


def _fault_after() -> int | None:
    spec = os.environ.get(CACHE_FAULT_ENV, "")
    kind, _, n = spec.partition(":")
    return int(n) if kind == "kill" and n.isdigit() else None


def _stage_objective_k(spec: StageSpec) -> int | None:
    for o in spec.objectives:
        if o.name == "topk_kl" and o.args.get("k") is not None:
            return int(o.args["k"])
    return None


def _student_for_inputs(recipe: Recipe, spec: StageSpec) -> Any:
    """A student with the stage's input side (tokenizer, image processor, visual tokens): the recipe's student, or
    the stage's ``init_from`` folder when it names one outside the run (stages never change a student's inputs)."""
    init = spec.init_from
    if init not in ("recipe", *recipe.stage_names):
        from mmkd.train.runner import Runner

        return Runner(recipe, echo=lambda _: None).reload_student(Path(init))
    return recipe.student.build()


def cache_stage(recipe: Recipe, stage: str, *, out: str | None = None, top_k: int | None = None,
                batch_size: int | None = None, codec: str = "packed", shard_records: int | None = None,
                echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the teacher cache of one stage of ``recipe`` (or continue one a kill interrupted).

    Args:
        recipe: The loaded recipe.
        stage: The stage whose teacher, data and collator are cached.
        out: The cache folder; default the stage's ``task_args.teacher_cache``, else ``RUN_DIR/caches/STAGE``.
        top_k: Entries per position; default the stage's ``topk_kl`` k, else 64.
        batch_size: Records per teacher forward; default the stage's micro-batch.
        codec: ``packed`` (about 2 bytes per entry) or ``raw`` (exact float32).
        shard_records: Records per shard (default 4096, rounded up to a multiple of the batch size so that a
            resumed run recomputes whole batches and writes the same bytes).
        echo: Where messages go.

    Returns:
        A summary: folder, records, positions, bytes, bytes per stored position, seconds.
    """
    from mmkd.cache import CODECS, CacheError, build_codec, finalize
    from mmkd.cache.folder import read_header
    from mmkd.cache.join import STORED_ANSWER, STORED_SEQUENCE, dataset_keys, teacher_spec
    from mmkd.cache.reader import scan_index
    from mmkd.tasks import TASKS
    from mmkd.train.stage import align_vocabularies, build_task_for
    from mmkd.train.strategies import build_strategy

    if stage not in recipe.stage_names:
        raise RecipeError(f"--stage: no stage {stage!r} in the recipe (stages: {', '.join(recipe.stage_names)})")
    spec = recipe.stage(stage)
    if not hasattr(TASKS[spec.task], "key_collator"):
        raise RecipeError(f"--stage {stage}: a {spec.task} stage has no teacher targets to cache (distill and "
                          "preference stages have)")
    if recipe.teacher is None:
        raise RecipeError("teacher: the recipe has no teacher to cache")
    if codec not in CODECS:
        raise RecipeError(f"--codec: {codec!r} is not a codec (expected one of {', '.join(CODECS)})")
    preference = spec.task == "preference"
    k = 1 if preference else int(top_k or _stage_objective_k(spec) or DEFAULT_K)
    if k < 1:
        raise RecipeError(f"--top-k: expected a positive number, got {k}")
    folder = Path(out or spec.task_args.get("teacher_cache") or RunDir(recipe.run_dir).cache_dir(stage))
    _check_writable(folder)
    t0 = time.time()

    dataset = spec.data.build()
    student = _student_for_inputs(recipe, spec)
    teacher = recipe.teacher.build()
    align_vocabularies(student, teacher)
    view = getattr(teacher, "inputs_view", None)
    task = build_task_for(spec, student, None, spec.total_steps(len(dataset)))
    collator = task.key_collator(student, teacher, spec.max_length)
    stored = STORED_SEQUENCE if preference else STORED_ANSWER
    try:
        cache_spec = teacher_spec(view, k=k, stored=stored, batching=task.cache_batching(spec.max_length),
                                  codec=build_codec({"name": codec}))
    except CacheError as err:
        raise RecipeError(f"teacher: {err}") from None
    existing = read_header(folder) if folder.is_dir() else None
    if existing is not None:
        diffs = existing.differences(cache_spec, include_codec=True)
        if diffs:
            raise CacheError(f"{folder}: a cache written for another setup is there ({'; '.join(diffs)}); choose "
                             "another --out or remove it")
    del student

    keys = dataset_keys(dataset, collator, num_workers=int(spec.trainer.num_workers or 0))
    seen: set[str] = set()
    unique: list[tuple[int, str]] = []
    for i, (_, key) in enumerate(keys):
        if key is not None and key not in seen:
            seen.add(key)
            unique.append((i, key))
    done: set[str] = set()
    if existing is not None:
        done = {k_.ljust(32, b"\0").hex() for k_ in scan_index(folder, cache_spec).keys.tolist()}
    echo(f"mmkd cache {stage}: {len(keys)} records, {len(unique)} distinct, {len(done & seen)} cached already; "
         f"k={k}, codec {codec}, into {folder}")

    tr = spec.trainer
    strategy = tr.strategy or "auto"
    if strategy == "deepspeed_stage_2":
        strategy = "ddp"  # ZeRO-2 partitions optimizer state only: the teacher is a replica either way
    per_batch = int(batch_size or spec.micro_batch_size)
    if per_batch < 1 or (shard_records is not None and shard_records < 1):
        raise RecipeError(f"--batch-size {per_batch}, --shard-records {shard_records}: expected positive numbers")
    per_shard = -(-int(shard_records or SHARD_RECORDS) // per_batch) * per_batch
    module = CacheModule(teacher, dataset, collator, unique, done, folder=folder, spec=cache_spec,
                         batch_size=per_batch, num_workers=int(tr.num_workers or 0), k=k, chunk_size=None,
                         preference=preference, shard_records=per_shard, echo=echo)
    trainer = L.Trainer(accelerator=tr.accelerator, devices=tr.devices, num_nodes=int(tr.num_nodes or 1),
                        strategy=build_strategy(strategy, accelerator=tr.accelerator, spec=spec, student=None),
                        precision=tr.precision, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, use_distributed_sampler=False,
                        default_root_dir=str(folder))
    trainer.predict(module, return_predictions=False)
    trainer.strategy.barrier("mmkd_cache_written")
    summary: dict[str, Any] = {"folder": str(folder), "stage": stage, "k": k, "codec": codec}
    if trainer.is_global_zero:
        finalize(folder)
        summary.update(_folder_summary(folder, cache_spec))
        summary["seconds"] = round(time.time() - t0, 1)
        summary["written_now"] = module.written["records"] * max(1, trainer.world_size)
        echo(f"mmkd cache {stage}: {summary['records']} records, {summary['positions']} positions, "
             f"{summary['bytes']:,} bytes ({summary['bytes_per_position']:.1f} B per stored position) in "
             f"{summary['seconds']} s")
    trainer.strategy.barrier("mmkd_cache_finalized")
    return summary


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write and remove a probe file in it, before the teacher loads; on failure remove the
    folders this made and raise a one-line :class:`~mmkd.cache.CacheError` naming the folder."""
    from mmkd.cache import CacheError

    if folder.exists() and not folder.is_dir():
        raise CacheError(f"{folder}: exists and is not a folder; --out must name a folder")
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / f".probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        for path in made:  # innermost first
            try:
                path.rmdir()
            except OSError:
                pass
        raise CacheError(f"{folder}: cannot write the teacher cache here ({err.strerror or err})") from None


def _folder_summary(folder: Path, spec: Any) -> dict[str, Any]:
    from mmkd.cache.reader import scan_index

    index = scan_index(folder, spec)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    positions = sum(_shard_positions(folder / s.name) for s in index.shards)
    return {"records": int(index.keys.shape[0]), "shards": len(index.shards), "positions": positions, "bytes": size,
            "bytes_per_position": size / max(positions, 1)}


def _shard_positions(path: Path) -> int:
    import json

    from safetensors import safe_open

    from mmkd.cache.shard import META_KEY

    with safe_open(str(path), framework="numpy") as f:
        return int(json.loads((f.metadata() or {})[META_KEY]).get("positions", 0))


def verify_command(folder: str) -> dict[str, Any]:
    """Re-check every shard's checksum and the index of a teacher cache; exit 2 on the first problem."""
    from mmkd.cache import verify

    report = verify(folder)
    if is_rank_zero():
        print(report)
    return report
