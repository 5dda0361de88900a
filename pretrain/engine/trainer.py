"""The pretraining loop. It builds the pieces from the config and calls them; it never asks which
backend, strategy or data source it has.

One step: for each micro-batch, mask -> forward (autocast) -> backward (gradient reduction only on
the last micro-batch); then clip and step (skipped when the gradient norm is not finite), the EMA
teacher follows on local shards, lr for the next step. Checkpoints every ``checkpoint_every`` steps,
at the end, and at the step boundary after a preemption signal, after which the run exits cleanly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mimscale.config import Config, to_dict, to_yaml
from mimscale.data_pipeline.bad_samples import append_jsonl
from mimscale.data_pipeline.build import build_pretrain_data
from mimscale.data_pipeline.views import size_at
from mimscale.pretrain.masking.score_cache import build_score_cache, full_view_reader
from mimscale.pretrain.method import MIMMethod

from .backend import build_backend, init_distributed
from .checkpoint import CheckpointManager, read_state, resolve_resume
from .data_wait import DataWait
from .figures import reconstruction_grid
from .flops import Throughput, peak_tflops, step_flops
from .guard import NumericsGuard, poison_nonfinite
from .logger import RunLogger
from .memory import MemoryReport, format_reports, measure, write_reports
from .optim import param_groups
from .preemption import PreemptionHandler
from .rng import rng_state, seed_everything, set_rng_state, step_generator
from .schedule import cosine_lr, scaled_lr

_log = logging.getLogger("mimscale.pretrain")
BAD_SAMPLES_FILE = "bad_samples.jsonl"  # the run's unreadable samples, one JSON line each


@dataclass
class RunSummary:
    run_dir: Path
    steps: int                          # the step the run stands at (counted from the run's start)
    checkpoint: Path | None
    metrics: Path
    tensorboard: Path | None
    figures: list[Path]
    losses: list[tuple[int, float]]
    wall_time: float                    # seconds since this start (a resume is a new start)
    preempted: str | None = None        # the signal that stopped the run early, if any
    skipped_steps: int = 0              # steps skipped for a non-finite loss or gradient
    memory: list[MemoryReport] = field(default_factory=list)
    start_step: int = 0                 # the step this start began at (0, or where it resumed)
    total_steps: int = 0
    bad_samples: int = 0                # samples skipped as unreadable, all ranks, whole run
    is_main: bool = True                # rank 0, which reports for the run

    def describe(self) -> str:
        """The run's last line: finished or stopped early, steps and time of this start, the
        checkpoint to continue from, and the skipped samples if there were any."""
        ran = f"{self.steps - self.start_step} steps in {self.wall_time:.1f}s"
        if self.start_step:
            ran += f" since this start (resumed at step {self.start_step})"
        if self.preempted:
            line = (f"stopped early by {self.preempted} at step {self.steps} of {self.total_steps}: {ran}; "
                    f"checkpoint {self.checkpoint} (continue with resume=auto)")
        else:
            line = f"done: {ran}; checkpoint {self.checkpoint}"
        if self.bad_samples:
            line += (f"; {self.bad_samples} unreadable sample{'s' * (self.bad_samples > 1)} skipped, "
                     f"listed in {self.run_dir / BAD_SAMPLES_FILE}")
        return line


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        device_type = "cuda" if cfg.engine.device == "cuda" or (
            cfg.engine.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.env = init_distributed(device_type)
        self.run_dir = Path(cfg.output.dir)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.output.keep_last)
        resume_from = resolve_resume(cfg.resume, self.checkpoints)
        self.backend = build_backend(cfg.engine, self.env, cfg.optim, cfg.data.batch_size)
        if resume_from is not None:
            self.backend.prepare_resume(resume_from, self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        seed_everything(cfg.engine.seed)  # identical initial weights on every rank
        self.backend.wrap(MIMMethod(cfg))
        self.method: MIMMethod = self.backend.module
        self.data = build_pretrain_data(cfg.data, cfg.model.img_size, cfg.engine.seed,
                                        self.env.rank, self.env.world_size, self.backend.device,
                                        cfg.schedule.resolution)
        self._batches: _OneAhead | None = None  # the loader as the running loop reads it
        seed_everything(cfg.engine.seed + self.env.rank)  # per-rank stream for drop path etc.

        accum = cfg.optim.accum_steps
        self.steps_per_epoch = max(1, self.data.steps_per_epoch // accum)
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch
        self.warmup_steps = (cfg.schedule.warmup_steps if cfg.schedule.warmup_steps is not None
                             else round(cfg.schedule.warmup_epochs * self.steps_per_epoch))
        self.effective_batch = cfg.data.batch_size * accum * self.env.world_size
        self.lr = cfg.optim.lr or scaled_lr(cfg.optim.blr, self.effective_batch)
        self.optimizer = self.backend.build_optimizer(
            param_groups(self.method, cfg.optim.weight_decay), self.lr, cfg.optim.betas)
        self.guard = NumericsGuard(cfg.engine.max_nonfinite_steps)
        self.step = 0
        self.saved_step: int | None = None
        self.figures: list[Path] = []
        self.memory: list[MemoryReport] = []

        if resume_from is not None:
            self._restore(resume_from)
        self.start_step = self.step
        if self.env.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self._throughputs: dict[int, Throughput] = {}
        self.throughput = self._throughput(self.data.epoch)
        self.logger = RunLogger(self.run_dir, self.env.is_main, self.total_steps, self.step,
                                cfg.logging.tensorboard, cfg.logging.progress)
        self.score_cache = build_score_cache(cfg, self.method, self.data.plan.num_samples,
                                             self.run_dir / "score_cache", self.env.rank, self.env.world_size,
                                             resumed=resume_from is not None)
        self.logger.print(
            f"mimscale pretrain: recipe={cfg.recipe} model={cfg.model.name} img={cfg.model.img_size} "
            + "".join(f"(from epoch {e}: {s}) " for e, s in cfg.schedule.resolution)
            + f"backend={self.backend.name}{f' zero{cfg.engine.zero_stage}' if self.backend.name == 'deepspeed' else ''} "
            f"ranks={self.env.world_size} batch/rank={cfg.data.batch_size} accum={accum} "
            f"effective_batch={self.effective_batch} lr={self.lr:.3g} "
            f"({'optim.lr' if cfg.optim.lr else f'blr {cfg.optim.blr:g} x {self.effective_batch}/256'}) "
            f"steps={self.total_steps} ({self.steps_per_epoch}/epoch, warmup {self.warmup_steps})"
            + (f" resumed at step {self.step} from {resume_from}" if resume_from else ""))

    def img_size(self, epoch: int) -> int:
        """The image size of ``epoch``: its ``schedule.resolution`` phase, else ``model.img_size``."""
        return size_at(self.cfg.schedule.resolution, epoch, self.cfg.model.img_size)

    def _throughput(self, epoch: int) -> Throughput:
        """FLOPs -> TFLOP/s and MFU at the image size of ``epoch`` (a resolution phase changes them)."""
        size = self.img_size(epoch)
        if size not in self._throughputs:
            cfg = self.cfg
            self._throughputs[size] = Throughput(
                step_flops(cfg, world_size=self.env.world_size, img_size=size), self.env.world_size,
                peak_tflops(self.backend.device, cfg.engine.precision, cfg.engine.peak_tflops))
        return self._throughputs[size]

    # ------------------------------------------------------------------ state

    def _run_state(self) -> dict:
        """Everything but the backend's model/optimizer. Collective (gathers every rank's RNG and
        rank-local module state, such as PLB's per-rank loss sums)."""
        data_per_rank = self.backend.all_gather_object(self._data_position())  # skips differ
        return {
            "format": self.backend.checkpoint_format,
            "backend": self.backend.name,
            "world_size": self.env.world_size,
            "step": self.step,
            "data": self._data_position(),
            "img_size": self.img_size(self._data_position()["epoch"]),  # of the next batch
            "data_per_rank": data_per_rank,
            "bad_samples": sum(d.get("bad_samples", 0) for d in data_per_rank),  # all ranks, whole run
            "rng": self.backend.all_gather_object(rng_state()),
            "rank_state": self.backend.all_gather_object(_to_cpu(rank_local_state(self.method))),
            "guard": self.guard.state_dict(),
            "config": to_dict(self.cfg),
            "effective_batch": self.effective_batch,
            "lr": self.lr,
        }

    def _data_position(self) -> dict:
        """The loader's position after the batches consumed so far (a batch fetched ahead is not)."""
        return self._batches.position if self._batches is not None else self.data.state_dict()

    def save_checkpoint(self) -> Path:
        """An atomic checkpoint of this step. Collective: every rank writes its shards into the
        staging folder, then the main rank writes state.pt and the marker and renames it."""
        tmp = self.checkpoints.staging_path(self.step)
        if self.env.is_main:
            self.checkpoints.stage(self.step)
        self.backend.barrier()
        entries = self.backend.save(tmp)
        if "model" in entries:  # full format: the student in the official MAE layout
            student, method_state = self.method.split_state_dict(entries.pop("model"))
            entries = {"model": student, "method": method_state, **entries}
        state = {**entries, **self._run_state()}
        if self.env.is_main:
            self.checkpoints.commit(self.step, tmp, state, to_yaml(self.cfg))
        self.backend.barrier()
        self.saved_step = self.step
        return self.checkpoints.path_for(self.step)

    def _restore(self, path: Path) -> None:
        state = read_state(path)
        self.backend.load(path, state)
        per_rank = state.get("rank_state") or [{}]
        same_world = len(per_rank) == self.env.world_size
        load_rank_local_state(self.method, per_rank[self.env.rank if same_world else 0])
        self.step = int(state["step"])
        data = state.get("data_per_rank") or [state["data"]]
        if len(data) == self.env.world_size:
            self.data.load_state_dict(data[self.env.rank])
        else:  # rank 0 carries the run's bad-sample count on, so the sum over ranks stays the run's
            total = state.get("bad_samples", sum(d.get("bad_samples", 0) for d in data))
            self.data.load_state_dict({**data[0], "bad_samples": total if self.env.is_main else 0})
        size, saved = self.img_size(self.data.epoch), state.get("img_size")
        if saved is not None and saved != size:
            _log.warning("schedule.resolution: the checkpoint's next batch was at %d px; this config's "
                         "schedule gives %d px at epoch %d, which the run uses", saved, size, self.data.epoch)
        self.guard.load_state_dict(state.get("guard", {}))
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank])

    # ------------------------------------------------------------------ loop

    def _micro_step(self, batch: dict, generator: torch.Generator, sync: bool):
        images = batch["images"].to(self.backend.device, non_blocking=True)
        views = batch.get("views") or []  # two-view recipes: the second view feeds the contrast
        second = views[1].to(self.backend.device, non_blocking=True) if len(views) > 1 else None
        cached = self.score_cache.batch(batch, self.backend.device) if self.score_cache else None
        with self.backend.accumulate(sync):
            with self.backend.autocast():
                out = self.backend.model(images, generator, second, cached)
            self.backend.backward(poison_nonfinite(out.loss), 1.0 / self.cfg.optim.accum_steps)
        return images, out

    def train_step(self, batches, wait: DataWait):
        """One optimizer step: lr, each micro-step (mask, forward, backward), clip and step (skipped
        when the gradient norm is not finite), the EMA teacher. ``batches`` hands out batches
        (``next(wait)``) and may read one ahead (``fetch(wait)``). The loop and ``bench step`` share it.
        Returns the last micro-step's images and output, the step's summed terms and the gradient
        norm (a device tensor; non-finite: the step was skipped). Nothing here reads the device on
        the host: whether the step is applied, the EMA teacher and the guard's count are decided
        on the device (DeepSpeed's own step is the exception: it syncs inside)."""
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        self.backend.set_lr(cosine_lr(self.step, self.lr, self.total_steps, self.warmup_steps, cfg.optim.min_lr))
        generator = step_generator(cfg.engine.seed, self.step, self.env.rank)
        self.method.set_progress(self.step, self.total_steps, self.steps_per_epoch)
        if self.score_cache is not None:
            self._refresh_scores()
        step_terms: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            last = micro == accum - 1
            images, out = self._micro_step(batches.next(wait), generator, last)
            if last and self.step + 1 < self.total_steps:
                batches.fetch(wait)  # while the device still runs this step's backward pass
            for k, v in {"loss": out.loss, **out.terms}.items():
                v = v.detach().float()
                step_terms[k] = step_terms[k] + v if k in step_terms else v
        grad_norm = self.backend.step(cfg.optim.clip_grad)
        finite = torch.isfinite(grad_norm)
        with self.backend.local_shards():  # a skipped step changed nothing, so nothing follows it
            self.method.after_optimizer_step(self.step, self.total_steps, finite)
        self.step += 1
        wait.step()
        self.guard.record(self.step, finite)
        return images, out, step_terms, grad_norm

    def _refresh_scores(self) -> None:
        """The score cache's pass over the data set when this step's epoch needs a new generation
        (collective). The scorer runs in eval mode and the pass draws nothing from the global RNG,
        so training goes on exactly as it would after a resume that reuses the cache."""
        cfg, cache = self.cfg, self.score_cache
        epoch = self.step * cfg.optim.accum_steps // self.data.steps_per_epoch  # the loader's epoch
        network = self.method.score_network
        training = network.training
        read = full_view_reader(self.data.source, cfg.model.img_size, cfg.data.batch_size, cfg.data.num_workers,
                                self.backend.device, cfg.data.fast_decode)

        def score(images):
            with self.backend.autocast():
                return self.method.score_maps(images)

        t0 = time.perf_counter()
        network.eval()
        try:
            ran = cache.ensure(epoch, score, read, self.backend.barrier)
        finally:
            network.train(training)
        if ran:
            self.logger.print(f"score cache: scored {cache.num_samples} images for epoch {cache.epoch} in "
                              f"{time.perf_counter() - t0:.1f} s -> {cache.folder}")

    def fit(self) -> RunSummary:
        with PreemptionHandler(self.cfg.engine.preempt_signals) as preemption:
            try:
                return self._fit(preemption)
            except BaseException:
                self._keep_bad_records()
                raise
            finally:
                if self._batches is not None:
                    self._batches.close()  # the loader stands where the run stopped consuming
                self.logger.close()

    def _fit(self, preemption: PreemptionHandler) -> RunSummary:
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        self._batches = batches = _OneAhead(self.data)
        losses: list[tuple[int, float]] = []
        window, wait = _Window(), DataWait()
        start, start_step = time.perf_counter(), self.step
        report_at = start_step + min(cfg.engine.memory_report_steps, self.total_steps - start_step)
        stopped_by = None
        out = images = None
        self.backend.model.train()
        while self.step < self.total_steps:
            epoch = batches.position["epoch"]
            images, out, step_terms, grad_norm = self.train_step(batches, wait)
            window.add({k: v / accum for k, v in step_terms.items()},
                       images.shape[0] * accum * self.env.world_size, torch.isfinite(grad_norm))

            if cfg.engine.memory_report_steps and self.step == report_at:
                self._memory_report()
            last = self.step == self.total_steps
            checkpoint = self.step % cfg.output.checkpoint_every == 0 or last
            log = self.step % cfg.logging.log_every == 0 or last
            if log or checkpoint:  # the guard's counters are read here only, not every step
                self.guard.check()
            if log:
                means, images_per_s = window.flush()
                self.throughput = self._throughput(epoch)
                norm = float(grad_norm)  # the last step's
                metrics = {"epoch": epoch, **means, "lr": self.optimizer.param_groups[0]["lr"],
                           "grad_norm": norm if math.isfinite(norm) else None, "images_per_s": images_per_s,
                           **self.throughput.of(images_per_s),
                           "data_wait_ms": wait.flush_ms(), "skipped_steps": self.guard.skipped,
                           "bad_samples": self._report_bad_samples()}
                if cfg.schedule.resolution:
                    metrics["img_size"] = self.img_size(epoch)
                self.logger.log(self.step, metrics)
                if "loss" in means:
                    losses.append((self.step, means["loss"]))
            else:
                self.logger.advance(self.step)
            if cfg.logging.image_every and self.step % cfg.logging.image_every == 0 and self.env.is_main:
                self._figure(images, out)
            # no periodic checkpoint in a streak of skipped steps: the last one written stays the newest
            if checkpoint and (last or self.guard.streak == 0):
                self.save_checkpoint()
            if self.backend.any_rank(preemption.requested):
                stopped_by = preemption.received or "a signal on another rank"
                if self.saved_step != self.step:
                    self.save_checkpoint()
                self.logger.print(f"{stopped_by}: checkpoint of step {self.step} written to "
                                  f"{self.checkpoints.path_for(self.step)}; exiting (continue with resume=auto)")
                break
        if self.env.is_main and out is not None and (
                not cfg.logging.image_every or self.step % cfg.logging.image_every):
            self._figure(images, out)
        return RunSummary(self.run_dir, self.step, self.checkpoints.latest(), self.logger.metrics_path,
                          self.logger.tb_dir if cfg.logging.tensorboard else None, self.figures, losses,
                          time.perf_counter() - start, stopped_by, self.guard.skipped, self.memory,
                          start_step, self.total_steps, self._report_bad_samples(), self.env.is_main)

    def _report_bad_samples(self) -> int:
        """The run's count of skipped samples, over all ranks and starts, as of the batches consumed;
        the main rank appends their records since the last call to ``bad_samples.jsonl``.
        Collective, over the CPU group: counts and records live on the host (the loader's), so
        reading them costs no device sync. Called at log lines and at the end."""
        mine = (self._batches.position.get("bad_samples", 0), self._batches.take_bad_records())
        gathered = self.backend.all_gather_host(mine)
        if self.env.is_main:
            append_jsonl(self.run_dir / BAD_SAMPLES_FILE, [r for _, records in gathered for r in records])
        return sum(count for count, _ in gathered)

    def _keep_bad_records(self) -> None:
        """A failing run (e.g. past ``data.max_bad_fraction``) lists what each rank read, itself:
        the other ranks may never reach a collective again."""
        records = self._batches.take_bad_records(ahead=True) if self._batches is not None else []
        append_jsonl(self.run_dir / BAD_SAMPLES_FILE, records + self.data.take_bad_records())

    def _memory_report(self) -> None:
        mine = measure(self.env.rank, self.backend.memory_bytes(), self.backend.device)
        self.memory = [MemoryReport(**r) for r in self.backend.all_gather_object(asdict(mine))]
        if self.env.is_main:
            write_reports(self.run_dir / "memory.json", self.memory, self.backend.name, self.step, self.start_step)
            self.logger.print(format_reports(self.memory, self.backend.name))

    def _figure(self, images: torch.Tensor, out) -> None:
        path = self.run_dir / "figures" / f"recon_step_{self.step:08d}.png"
        mae = out.mae
        self.figures.append(reconstruction_grid(self.method.student, images, mae.pred.detach(), mae.mask, path))


def rank_local_state(model: nn.Module) -> dict:
    """Each module's ``extra_state`` (strategy state such as PLB's per-rank loss sums), keyed as in
    the state dict. Saved for every rank: a state dict holds only one rank's copy."""
    out = {}
    for name, module in model.named_modules():
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            out[f"{name}._extra_state" if name else "_extra_state"] = module.get_extra_state()
    return out


def load_rank_local_state(model: nn.Module, state: dict) -> None:
    for name, module in model.named_modules():
        key = f"{name}._extra_state" if name else "_extra_state"
        if key in state:
            module.set_extra_state(state[key])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class _OneAhead:
    """The loader, read one batch ahead on request. Why: the host may wait on the device after
    the backward pass is queued (at a log line, or on a full launch queue), and then the device
    idles until the next batch is fetched and queued; fetching it before hides the fetch behind
    the backward pass. ``position`` is the loader's state after the batches handed out so far, which is what a
    checkpoint records: a batch fetched ahead is read again after a resume."""

    def __init__(self, loader):
        self.loader, self.batches = loader, iter(loader)
        self.position = loader.state_dict()
        self.ahead: tuple[dict, dict, list[dict]] | None = None  # batch, position after it, its bad samples
        self._bad: list[dict] = []  # bad samples of the batches handed out, until taken

    def fetch(self, wait: DataWait) -> None:
        if self.ahead is None:
            batch = wait.next(self.batches)
            self.ahead = (batch, self.loader.state_dict(), self.loader.take_bad_records())

    def next(self, wait: DataWait) -> dict:
        self.fetch(wait)
        (batch, self.position, bad), self.ahead = self.ahead, None
        self._bad.extend(bad)
        return batch

    def take_bad_records(self, ahead: bool = False) -> list[dict]:
        """The bad samples of the batches handed out since the last call (``ahead``: and of the batch
        fetched ahead): a batch put back is read again, so its samples are listed when it is used."""
        out, self._bad = self._bad, []
        return out + (self.ahead[2] if ahead and self.ahead is not None else [])

    def close(self) -> None:
        """Stop reading: the loader's workers end, and a batch fetched ahead is put back (the
        loader's next batch is the first one not consumed)."""
        self.batches.close()
        if self.ahead is not None:
            self.ahead = None
            self.loader.load_state_dict(self.position)


class _Window:
    """Sums the logged terms of applied steps between two log lines, and counts those steps and
    their images, all on the device (a skipped step adds zeros: its terms may be NaN); averaged
    over ranks and read once (one host sync) when flushed."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count: torch.Tensor | int = 0
        self.images: torch.Tensor | int = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], images: int, applied: torch.Tensor) -> None:
        for k, v in terms.items():
            v = torch.where(applied, v, 0.0)  # a CPU scalar (mask time) joins the device
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count = self.count + applied.long()
        self.images = self.images + applied.long() * images

    def flush(self) -> tuple[dict[str, float], float]:
        means, images = {}, 0
        if self.sums:
            keys = sorted(self.sums)
            values = torch.stack([self.sums[k].double() for k in keys])
            world = dist.get_world_size() if dist.is_initialized() else 1
            if world > 1:  # every rank has the same keys and applied steps
                dist.all_reduce(values)
                values = values / world
            *values, count, images = torch.cat([values, torch.stack([self.count, self.images]).double()]).tolist()
            if count:
                means = {k: v / count for k, v in zip(keys, values)}
                means = {"loss": means.pop("loss"), **means}
        rate = images / max(1e-9, time.perf_counter() - self.start)
        self.__init__()
        return means, rate
