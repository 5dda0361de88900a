"""One typed config tree, built from a YAML recipe plus ``key=value`` overrides.

Dataclasses define every key, its type, its default and its valid range (in field metadata).
Loading is strict: an unknown key, a value of the wrong type or an impossible value raises
:class:`ConfigError` naming the key and what is valid, before any work starts. A recipe may name
another recipe as its ``base`` and override only what differs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from mimscale.errors import UserError


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 scalars: only true/false are booleans (``progress: off`` stays a string) and
    ``1e-4`` is a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(UserError, ValueError):
    """A config key, type or value that cannot work; the message names the key and the fix.
    (A ``ValueError`` too, for the callers that catch one.)"""


def _opt(default, doc: str = "", **rules):
    """A dataclass field with a docstring and validation rules (choices, gt, ge, lt, le)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(doc=doc, **rules))
    return field(default=default, metadata=dict(doc=doc, **rules))


@dataclass
class ModelConfig:
    name: str = _opt("mae_vit_base_patch16", "encoder/decoder preset, see `build_mae`")
    img_size: int = _opt(224, "input resolution in pixels", gt=0)
    patch_size: int | None = _opt(None, "patch size; null keeps the preset's", gt=0)
    decoder_embed_dim: int = _opt(512, "MAE decoder width", gt=0)
    decoder_depth: int = _opt(8, "MAE decoder blocks", ge=1)
    decoder_num_heads: int = _opt(16, "MAE decoder heads", ge=1)
    drop_path: float = _opt(0.0, "stochastic depth rate of the encoder", ge=0, lt=1)


@dataclass
class DataConfig:
    source: str = _opt("imagefolder", "where images come from: an ImageFolder, generated images, "
                       "webdataset tar shards or an FFCV .beton",
                       choices=("imagefolder", "synthetic", "wds", "ffcv"))
    root: str | None = _opt(None, "ImageFolder root (its `train/` split is used if present)")
    urls: str | list[str] | None = _opt(
        None, "wds: tar shards (paths, brace patterns like 'train-{000000..000127}.tar', globs, an "
        "index .json, pipe:COMMAND); ffcv: the .beton file")
    allow_pipe: bool = _opt(False, "allow pipe:COMMAND URLs (they run a shell command)")
    batch_size: int = _opt(64, "images per process per micro-step", gt=0)
    num_workers: int = _opt(8, "data loader worker processes", ge=0)
    prefetch_factor: int = _opt(2, "batches each loader worker keeps ready ahead (DataLoader's "
                                "prefetch_factor)", ge=1)
    pin_memory: str = _opt("main", "where a batch bound for a GPU is copied into pinned memory: main (the "
                           "main thread, just before its copy to the device) or thread (DataLoader's pin "
                           "thread, beside the step); unused on a CPU", choices=("main", "thread"))
    stage: str = _opt("auto", "where a batch is put on the training device (pinning, the copy, normalising; "
                      "with data.decode=gpu the decode and the views): main (the training thread) or "
                      "thread (a background thread, a batch ahead, beside the step); auto: thread when "
                      "JPEGs are decoded on a GPU (nvJPEG's call blocks until the batch is decoded), "
                      "else main", choices=("main", "thread", "auto"))
    remainder: str = _opt("drop", "samples beyond a multiple of ranks x batch each epoch: drop "
                          "them, or pad by repeating the epoch's first ones", choices=("drop", "pad"))
    max_bad_fraction: float = _opt(0.01, "stop when more than this fraction of a rank's samples in "
                                   "one epoch are unreadable (0 = stop at the first)", ge=0, le=1)
    views: str = _opt("mae", "augmented views per image: MAE's one, or MoCo v3's two",
                      choices=("mae", "mocov3"))
    fast_decode: bool = _opt(True, "decode JPEGs at the smallest DCT scale the crop allows")
    decode: str = _opt("cpu", "where JPEGs are decoded: cpu (loader workers), gpu (the main process, on the "
                       "training device: nvJPEG on CUDA, the same code on a CPU run), auto (gpu when training "
                       "on CUDA with data.views=mae). cpu by default: on an H200 the gpu path was no faster "
                       "than 15 workers and once failed (docs/performance.md)", choices=("cpu", "gpu", "auto"))
    crop_scale: tuple[float, float] = _opt((0.2, 1.0), "RandomResizedCrop area range [MAE]")
    hflip: bool = _opt(True, "random horizontal flip [MAE]")
    synthetic_images: int = _opt(2048, "images generated when source=synthetic", gt=0)
    synthetic_size: int = _opt(64, "side of generated images when source=synthetic", gt=0)


STRATEGIES = ("random", "block", "idm", "gpa", "ccmim", "sbam", "sbam_amr")


@dataclass
class IDMConfig:
    """IDM + PLB (SPEC §2): one attention head of the last block picks the most informative patches."""
    plb: bool = _opt(True, "pattern-learning balance of the head distribution; false = uniform heads [P]")
    plb_scope: str = _opt("step", "one head per step for the global batch [P], or per image [X]",
                          choices=("step", "image"))
    plb_lambda: float = _opt(0.99, "PLB update rate λ, eq. 4 [P]", ge=0, le=1)
    plb_eps: float = _opt(0.2, "PLB temperature ε, eq. 4 [P]", gt=0)


@dataclass
class GPAConfig:
    """GPA (SPEC §3): global patch-wise attention of one teacher head, soft-to-hard schedule."""
    block: int = _opt(9, "scoring block (0-indexed; negative counts from the end) [C: ViT-B]")
    head: int | str = _opt(11, "scoring head (0-indexed) or 'mean' (sum over heads) [C: ViT-B]")
    queries: str = _opt("patches", "queries summed: patches without self [P] or all [C]", choices=("patches", "all"))
    progress: str = _opt("epoch", "schedule progress by epoch [P] or step", choices=("epoch", "step"))
    soft: tuple[float, float] = _opt((0.5, 0.0), "α_s from start to end, eq. 6 [P]")
    hard: tuple[float, float] = _opt((0.0, 0.5), "α_h from start to end, eq. 6 [P]")
    soft_probs: str = _opt("minmax", "sampling π: per-image min-max GPA [C] or softmax of z-score [S]",
                           choices=("minmax", "zsoftmax"))


@dataclass
class CCMIMConfig:
    """ccMIM (SPEC §4): CLS-attention importance, importance sampling of the masked set."""
    importance: str = _opt("last", "last block [P, eq. 4] or sum over all blocks [C]", choices=("last", "all_blocks"))


@dataclass
class SBAMConfig:
    """SBAM + AMR (SPEC §5): salience of the input tokens, noisy top-k, adaptive ratio."""
    scaled: bool = _opt(False, "scale X·Xᵀ by 1/√D before the softmax [S]")
    delta_r: float = _opt(0.15, "AMR half-range Δr, eq. 7 [P]", ge=0, lt=1)
    threshold: float = _opt(0.1, "AMR salience threshold δ, eq. 7 [P]", ge=0, le=1)
    amr_scope: str = _opt("image", "one ratio per image [P] or per rank's batch [C]", choices=("image", "local_batch"))
    random_warmup_epochs: float = _opt(0.0, "random masking for the first epochs [S]", ge=0)


@dataclass
class ScoreCacheConfig:
    """Per-sample full-image score maps refreshed every K epochs, warped into each view [X]."""
    every_epochs: int = _opt(0, "refresh the cached score maps every K epochs (idm, gpa, ccmim); "
                             "0 = off, score every view online [X]", ge=0)


@dataclass
class ShotConfig:
    """A later shot of multi-shot masking (SPEC §6): drop visible tokens inside the encoder."""
    layer: int | float = _opt(10, "block index it acts before (≥ 1), or a fraction of depth in (0, 1)")
    ratio: float = _opt(0.1, "fraction η of the still-visible patches it hides", ge=0, lt=1)
    guide: str = _opt("random", "random [P], or the block's own GPA / CLS attention [X]",
                      choices=("random", "gpa", "cls"))


@dataclass
class MaskingConfig:
    strategy: str = _opt("random", "how patches are chosen for hiding", choices=STRATEGIES)
    ratio: float = _opt(0.75, "fraction of patches hidden at the input [MAE]", ge=0, lt=1)
    selector: str = _opt("auto", "turn scores into a mask; auto = the strategy's own",
                         choices=("auto", "topk", "sample", "noisy_topk", "random", "block"))
    noise_width: float | None = _opt(None, "noisy_topk width; null = the strategy's (SBAM 0.5, ccMIM 1)", ge=0)
    score_source: str = _opt("auto", "network whose no-grad pass scores patches; auto = the paper's",
                             choices=("auto", "teacher", "student", "input"))
    idm: IDMConfig = field(default_factory=IDMConfig)
    gpa: GPAConfig = field(default_factory=GPAConfig)
    ccmim: CCMIMConfig = field(default_factory=CCMIMConfig)
    sbam: SBAMConfig = field(default_factory=SBAMConfig)
    score_cache: ScoreCacheConfig = field(default_factory=ScoreCacheConfig)
    shots: list[ShotConfig] = _opt([], "later shots inside the encoder, e.g. [{layer: 10, ratio: 0.1}]")
    loss_weights: str = _opt("union", "multi-shot loss: one mean over all hidden [P], equal or ratio-weighted shots",
                             choices=("union", "equal", "ratio"))


@dataclass
class TeacherConfig:
    type: str = _opt("none", "none, an EMA of the student, or frozen weights from a checkpoint",
                     choices=("none", "ema", "frozen"))
    checkpoint: str | None = _opt(None, "frozen teacher weights: a mimscale checkpoint or an official MAE .pth")
    model: str | None = _opt(None, "frozen teacher architecture (a model name); null = the student's")
    momentum: float = _opt(0.996, "EMA momentum at the start of the cosine ramp [SPEC §7]", ge=0, le=1)
    momentum_final: float = _opt(1.0, "EMA momentum at the end of training", ge=0, le=1)


@dataclass
class MAMConfig:
    """GPA's masked attention modeling (SPEC §3): predict the teacher's z-scored GPA."""
    weight: float = _opt(0.0, "weight of L_GPA; 0 = off (recipe gpa: 1 [P])", ge=0)
    head: str = _opt("linear", "linear head on the decoder trunk, hidden patches [S]; or a second decoder, "
                     "all patches [C]", choices=("linear", "decoder"))
    start: float = _opt(0.75, "fraction of training after which the decoder variant is on [C]", ge=0, le=1)


@dataclass
class InfoNCEConfig:
    """CAMAE's two-view contrast (SPEC §2, MoCo v3): online projector+predictor vs momentum encoder."""
    weight: float = _opt(0.0, "weight of L_c; 0 = off (recipe camae_plb: 1 [P])", ge=0)
    tau: float = _opt(0.2, "temperature τ [P]", gt=0)
    dim: int = _opt(256, "projection width [P]", ge=1)
    hidden: int = _opt(4096, "projector/predictor hidden width [MoCo v3]", ge=1)


@dataclass
class CCMIMContrastConfig:
    """ccMIM's visible-vs-masked CLS contrast (SPEC §4)."""
    weight: float = _opt(0.0, "λ; 0 = off (recipe ccmim: 0.2 [P], ccmim_code: 0.1 [C])", ge=0)
    variant: str = _opt("nce", "eq. 7 [P], the code's CE [C], or eq. 8 alignment [P]", choices=("nce", "code", "align"))
    tau: float = _opt(0.5, "temperature τ [C]", gt=0)
    dim: int = _opt(256, "projection width [C]", ge=1)


@dataclass
class ObjectivesConfig:
    norm_pix_loss: bool = _opt(True, "per-patch normalised pixel targets [MAE]")
    pixel_weight: float = _opt(1.0, "weight of the pixel reconstruction loss", ge=0)
    mam: MAMConfig = field(default_factory=MAMConfig)
    infonce: InfoNCEConfig = field(default_factory=InfoNCEConfig)
    ccmim: CCMIMContrastConfig = field(default_factory=CCMIMContrastConfig)


@dataclass
class OptimConfig:
    blr: float = _opt(1.5e-4, "base lr; lr = blr * effective_batch / 256 [MAE]", gt=0)
    lr: float | None = _opt(None, "absolute lr; overrides blr when set", gt=0)
    min_lr: float = _opt(0.0, "floor of the cosine schedule", ge=0)
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on norms, biases, tokens)", ge=0)
    betas: tuple[float, float] = _opt((0.9, 0.95), "AdamW betas [MAE]")
    clip_grad: float | None = _opt(None, "max gradient norm; null disables clipping", gt=0)
    accum_steps: int = _opt(1, "micro-steps per optimizer step", ge=1)


@dataclass
class ScheduleConfig:
    epochs: int = _opt(800, "training length in epochs", ge=1)
    max_steps: int | None = _opt(None, "optimizer steps; overrides epochs when set", ge=1)
    warmup_epochs: float = _opt(40.0, "linear warmup length in epochs", ge=0)
    warmup_steps: int | None = _opt(None, "warmup in steps; overrides warmup_epochs", ge=0)
    resolution: list[tuple[int, int]] = _opt(
        [], "low-resolution phase [X]: (epoch, image size) pairs from epoch 0 on, e.g. [[0, 160], [80, 224]]; "
        "empty = model.img_size throughout")


@dataclass
class EngineConfig:
    backend: str = _opt("ddp", "ddp (also single process), fsdp (FSDP2, sharded) or deepspeed (ZeRO)",
                        choices=("ddp", "fsdp", "deepspeed"))
    zero_stage: int = _opt(2, "DeepSpeed ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters "
                           "sharded", choices=(1, 2, 3))
    device: str = _opt("auto", "compute device", choices=("auto", "cpu", "cuda"))
    precision: str = _opt("bf16", "compute dtype (autocast; FSDP also gathers bf16 params); master "
                          "params, gradient reduction and losses stay fp32", choices=("bf16", "fp32"))
    seed: int = _opt(0, "seed of data order, augmentation, masks and init", ge=0)
    threads: int | None = _opt(None, "torch intra-op threads per process; null = torch default", ge=1)
    activation_checkpointing: bool = _opt(False, "recompute each transformer block in backward: "
                                          "less activation memory for ~30% more compute")
    compile: bool | str = _opt("auto", "torch.compile each transformer block; auto = on CUDA under ddp and "
                               "fsdp (+20-40 % images/s on an H200, docs/performance.md), off on CPUs "
                               "(slow to start) and under deepspeed", choices=(True, False, "auto"))
    compile_scope: str = _opt("blocks", "what engine.compile compiles: blocks (each transformer block on its "
                              "own: small graphs, quick to compile, every backend) or model (the student's "
                              "whole forward, patch embedding to loss, as one graph, and other blocks one by "
                              "one: fewer kernels and less Python per step, longer to compile; ddp only)",
                              choices=("blocks", "model"))
    compile_mode: str = _opt("default", "torch.compile's mode for what engine.compile compiles: default; "
                             "max-autotune-no-cudagraphs (Triton matmul templates with the bias and GELU fused "
                             "into them, tuned at the first step: slower to start); reduce-overhead (each "
                             "compiled graph's forward and backward replayed as CUDA graphs: less host time "
                             "per kernel; not with optim.accum_steps > 1); max-autotune (both)",
                             choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"))
    attention: str = _opt("auto", "scaled-dot-product attention kernel: auto = torch's choice, or "
                          "only the named one (CUDA: flash, cudnn, efficient; math anywhere)",
                          choices=("auto", "flash", "cudnn", "efficient", "math"))
    varlen: str = _opt("auto", "how the encoder runs images of unequal visible counts (AMR, multi-shot): "
                       "packed without padding, attention per image by nested (SDPA on nested jagged "
                       "tensors), flex (FlexAttention; no backward on CPUs) or masked (one padded SDPA "
                       "with a key mask, only attention sees padding); auto = nested on CUDA, masked on "
                       "CPUs, padded under engine.compile; padded = each batch padded to its largest count",
                       choices=("auto", "nested", "flex", "masked", "padded"))
    cpu_offload: bool = _opt(False, "keep sharded params/grads (fsdp) or optimizer state (deepspeed) "
                             "in CPU memory")
    deepspeed_config: str | None = _opt(None, "JSON file merged over the generated DeepSpeed config")
    preempt_signals: list[str] = _opt(["SIGUSR1", "SIGUSR2", "SIGTERM"],
                                      "signals that checkpoint at the next step and exit cleanly; "
                                      "[] = none (drop SIGUSR1 where NCCL uses it)")
    max_nonfinite_steps: int = _opt(10, "consecutive non-finite steps skipped before the run stops "
                                    "(0 = stop at the first); checked on the host at the next log line "
                                    "or checkpoint, not every step", ge=0)
    memory_report_steps: int = _opt(2, "report per-rank memory after this many steps; 0 = never", ge=0)
    peak_tflops: float | None = _opt(None, "the device's peak TFLOP/s for MFU; null = looked up from the "
                                     "GPU's name and engine.precision (none on CPUs: no MFU)", gt=0)


@dataclass
class LoggingConfig:
    log_every: int = _opt(20, "optimizer steps between metric lines", ge=1)
    image_every: int = _opt(500, "steps between reconstruction PNGs; 0 = only at the end", ge=0)
    tensorboard: bool = _opt(True, "write TensorBoard scalars")
    progress: str = _opt("auto", "progress bar; auto = when attached to a terminal", choices=("auto", "on", "off"))


@dataclass
class OutputConfig:
    dir: str = _opt("runs/pretrain", "run folder: config, checkpoints, logs, figures")
    checkpoint_every: int = _opt(1000, "optimizer steps between checkpoints (also one at the end and "
                                 "one on a preemption signal)", ge=1)
    keep_last: int | None = _opt(3, "complete checkpoints kept; null keeps all", ge=1)


@dataclass
class Config:
    recipe: str = _opt("mae", "recipe the config was built from (name or YAML path)")
    resume: str = _opt("none", "'none', 'auto' (newest complete checkpoint in output.dir) or a path")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# --------------------------------------------------------------------------- building


def _closest(name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is tuple:
        return "[" + ", ".join(_describe(a) for a in typing.get_args(tp)) + "]"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Convert a YAML value to the declared type or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner[:-1]:
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        try:
            return _coerce(key, value, inner[-1])
        except ConfigError:
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}") from None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if dataclasses.is_dataclass(item):
            out = []
            for i, v in enumerate(value):
                obj = item()
                _apply(obj, v, f"{key}[{i}].")
                out.append(obj)
            return out
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values {_describe(tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _check_rules(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not a valid choice; valid: {', '.join(map(str, choices))}")
    bounds = [("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
              ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")]
    for rule, ok, _ in bounds:
        if rule in meta and not ok(value, meta[rule]):
            limits = " and ".join(f"{s} {meta[r]}" for r, _, s in bounds if r in meta)
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {limits}")


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates onto a dataclass instance, strictly."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            section = prefix.rstrip(".") or "the config root"
            valid = list(fields)
            raise ConfigError(f"unknown key '{key}'{_closest(str(name), valid)}; valid keys in "
                              f"{section}: {', '.join(valid)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{key}.")
            continue
        coerced = _coerce(key, value, hints[name])
        _check_rules(key, coerced, fields[name].metadata)
        setattr(obj, name, coerced)


def _validate(cfg: Config, require: bool = True) -> None:
    """Checks that involve several keys or other modules; with ``require``, also that no value a
    run needs is missing (see :func:`missing_values`)."""
    from mimscale.pretrain.models import available_models

    if cfg.model.name not in available_models():
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; valid: "
                          f"{', '.join(available_models())}")
    patch = cfg.model.patch_size or int(cfg.model.name.rsplit("patch", 1)[-1])
    if cfg.model.img_size % patch:
        raise ConfigError(f"model.img_size: {cfg.model.img_size} is not a multiple of the patch size {patch}")
    _validate_data(cfg.data)
    _validate_resolution(cfg.schedule.resolution, patch)
    _validate_masking(cfg)
    _validate_engine(cfg)
    for i, b in enumerate(cfg.optim.betas):
        if not 0 <= b < 1:
            raise ConfigError(f"optim.betas[{i}]: {b} must be in [0, 1)")
    for key, why in (missing_values(cfg) if require else {}).items():
        raise ConfigError(f"{key}: required {why}")


def missing_values(cfg: Config) -> dict[str, str]:
    """Keys left empty that a run needs, each with when and what to give: kept apart from the other
    checks so that ``config show`` can print such a config, marked, while a run refuses it."""
    d, t = cfg.data, cfg.teacher
    missing = {}
    if d.source == "imagefolder" and not d.root:
        missing["data.root"] = ("when data.source=imagefolder (a folder of class sub-folders "
                                "of images); or use data.source=synthetic")
    urls = [d.urls] if isinstance(d.urls, str) else list(d.urls or [])
    if d.source in ("wds", "ffcv") and not any(u.strip() for u in urls):
        what = ("tar shards, e.g. data.urls='/data/train-{000000..000127}.tar'" if d.source == "wds"
                else "the .beton file, e.g. data.urls=/data/train.beton")
        missing["data.urls"] = f"when data.source={d.source} ({what})"
    if t.type == "frozen" and not t.checkpoint:
        missing["teacher.checkpoint"] = ("when teacher.type=frozen (a mimscale checkpoint folder "
                                         "or an official MAE .pth)")
    return missing


def _validate_data(d: DataConfig) -> None:
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale: {list(d.crop_scale)} must satisfy 0 < min <= max <= 1")
    if d.decode == "gpu" and d.views != "mae":
        raise ConfigError(f"data.decode=gpu: the device makes random crops and flips only; data.views={d.views} has "
                          "colour operations: use data.decode=cpu (or auto)")
    urls = [d.urls] if isinstance(d.urls, str) else list(d.urls or [])
    if urls and d.source not in ("wds", "ffcv"):
        raise ConfigError(f"data.urls: only read when data.source is wds or ffcv (it is {d.source}); "
                          "an ImageFolder is given by data.root")
    if d.source == "ffcv" and len(urls) > 1:  # none: see missing_values
        raise ConfigError(f"data.urls: data.source=ffcv reads one .beton file, got {d.urls!r}")
    piped = [u for u in urls if u.startswith("pipe:")]
    if piped and not d.allow_pipe:
        raise ConfigError(f"data.urls: {piped[0]!r} runs a shell command; set data.allow_pipe=true "
                          "to allow pipe: URLs")


def _validate_resolution(phases, patch: int) -> None:
    if not phases:
        return
    epochs = [e for e, _ in phases]
    if epochs[0] != 0:
        raise ConfigError(f"schedule.resolution: the first phase must start at epoch 0, got {[list(p) for p in phases]}")
    if any(a >= b for a, b in zip(epochs, epochs[1:])):
        raise ConfigError(f"schedule.resolution: epochs must be strictly ascending, got {epochs}")
    for epoch, size in phases:
        if size <= 0 or size % patch:
            raise ConfigError(f"schedule.resolution: size {size} (from epoch {epoch}) must be a positive "
                              f"multiple of the patch size {patch}")


def _validate_engine(cfg: Config) -> None:
    import signal

    e = cfg.engine
    for name in e.preempt_signals:
        full = name if name.upper().startswith("SIG") else f"SIG{name}"
        if full.upper() in ("SIGKILL", "SIGSTOP") or not hasattr(signal, full.upper()):
            raise ConfigError(f"engine.preempt_signals: {name!r} is not a signal a process can catch; "
                              "valid e.g. SIGUSR1, SIGUSR2, SIGTERM, SIGINT")
    if e.compile is False and (e.compile_scope != "blocks" or e.compile_mode != "default"):
        raise ConfigError("engine.compile=false compiles nothing, so engine.compile_scope and engine.compile_mode "
                          "have no effect: set engine.compile=true (or auto: on CUDA) or drop them")
    if e.compile_mode in ("reduce-overhead", "max-autotune") and cfg.optim.accum_steps > 1:
        raise ConfigError(f"engine.compile_mode={e.compile_mode} replays CUDA graphs, and torch frees a replay's "
                          "outputs when the next compiled forward begins with no backward pending: with "
                          f"optim.accum_steps={cfg.optim.accum_steps} that is the next micro-step, while the "
                          "accumulation still holds the previous one's (the gradients of its replayed backward; "
                          "with compile_scope=model its loss terms too). Use "
                          "optim.accum_steps=1, or engine.compile_mode=default or max-autotune-no-cudagraphs")
    if e.compile_scope == "model" and e.backend != "ddp":
        raise ConfigError(f"engine.compile_scope=model: the student's forward compiled whole runs under ddp; "
                          f"engine.backend={e.backend} shards each block (use engine.compile_scope=blocks)")
    check_sharding_options(e)


def check_sharding_options(e) -> None:
    """The engine options that only a sharded backend reads (pretraining and classification)."""
    if e.cpu_offload and e.backend == "ddp":
        raise ConfigError("engine.cpu_offload: offloads the shards of fsdp or deepspeed; engine.backend=ddp "
                          "has none (it needs engine.backend=fsdp or deepspeed)")
    if e.deepspeed_config is not None:
        if e.backend != "deepspeed":
            raise ConfigError(f"engine.deepspeed_config: only used with engine.backend=deepspeed (not {e.backend})")
        if not Path(e.deepspeed_config).is_file():
            raise ConfigError(f"engine.deepspeed_config: file {e.deepspeed_config} does not exist")


_SCORE_SOURCE = {"idm": "student", "gpa": "teacher", "ccmim": "student", "sbam": "input", "sbam_amr": "input"}


def score_source(masking) -> str | None:
    """The network a strategy scores with: the configured one, else the paper's (SPEC §2–5)."""
    if masking.strategy not in _SCORE_SOURCE:
        return None
    return _SCORE_SOURCE[masking.strategy] if masking.score_source == "auto" else masking.score_source


def _validate_masking(cfg: Config) -> None:
    m, t = cfg.masking, cfg.teacher
    if m.ratio == 0 and not m.shots:
        raise ConfigError("masking.ratio: 0 hides nothing; it is allowed only with later shots (masking.shots)")
    if isinstance(m.gpa.head, str) and m.gpa.head != "mean":
        raise ConfigError(f"masking.gpa.head: {m.gpa.head!r} is not valid; give a head index or 'mean'")
    source = score_source(m)
    if source == "teacher" and t.type == "none":
        raise ConfigError(f"masking.strategy={m.strategy} scores with a teacher but teacher.type=none; "
                          "set teacher.type=ema or teacher.type=frozen (with teacher.checkpoint)")
    if m.score_cache.every_epochs:
        from mimscale.pretrain.masking.score_cache import check_cacheable

        check_cacheable(m.strategy, source)
    o = cfg.objectives
    if o.mam.weight > 0 and m.strategy != "gpa":
        raise ConfigError(f"objectives.mam.weight: MAM predicts the GPA score, so it needs masking.strategy=gpa "
                          f"(got {m.strategy})")
    if o.infonce.weight > 0 and t.type != "ema":
        raise ConfigError("objectives.infonce.weight: the two-view contrast needs a momentum encoder: teacher.type=ema")
    if o.infonce.weight > 0 and getattr(cfg.data, "views", "mocov3") != "mocov3":
        raise ConfigError("objectives.infonce.weight: the two-view contrast needs two views: data.views=mocov3")
    if t.momentum > t.momentum_final:
        raise ConfigError(f"teacher.momentum: {t.momentum} must not exceed teacher.momentum_final {t.momentum_final}")
    from mimscale.pretrain.masking.multishot import resolve_layer
    from mimscale.pretrain.models import MODEL_SIZES

    depth = MODEL_SIZES[cfg.model.name]["depth"]
    layers = []
    for i, shot in enumerate(m.shots):
        layer = shot.layer
        if isinstance(layer, float) and not (0 < layer < 1 or (layer >= 1 and layer.is_integer())):
            raise ConfigError(f"masking.shots[{i}].layer: {layer} must be a block index ≥ 1 or a fraction in (0, 1)")
        if not isinstance(layer, float) and layer < 1:
            raise ConfigError(f"masking.shots[{i}].layer: {layer} must be ≥ 1 (shot 1 is the input masking)")
        try:
            layers.append(resolve_layer(layer, depth))
        except ValueError as e:
            raise ConfigError(f"masking.shots[{i}].layer: {e}") from None
    if layers != sorted(set(layers)):
        raise ConfigError(f"masking.shots: layers resolve to blocks {layers}; they must be strictly increasing")


# --------------------------------------------------------------------------- recipes

RECIPE_PACKAGE = "mimscale.pretrain"


def available_recipes() -> list[str]:
    folder = resources.files(RECIPE_PACKAGE).joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_recipe(name: str, seen: tuple[str, ...] = ()) -> dict:
    """A recipe as a dict, with its ``base`` chain merged in (base first)."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"recipe: file {path} does not exist")
        text = path.read_text()
    else:
        if name not in available_recipes():
            raise ConfigError(f"recipe: unknown recipe {name!r}{_closest(name, available_recipes())}; "
                              f"valid: {', '.join(available_recipes())} (or a path to a YAML file)")
        text = resources.files(RECIPE_PACKAGE).joinpath("recipes", f"{name}.yaml").read_text()
    if name in seen:
        raise ConfigError(f"recipe: circular base chain {' -> '.join(seen + (name,))}")
    data = _yaml(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_recipe(base, seen + (name,)), data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.blr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def load_config(overrides: list[str] | None = None, recipe: str | None = None, require: bool = True) -> Config:
    """Build and validate the config: defaults <- recipe YAML (with bases) <- overrides. Without
    ``require``, values a run needs may be missing (:func:`missing_values` lists them)."""
    updates = parse_overrides(list(overrides or []))
    recipe = str(updates.pop("recipe", recipe or "mae"))
    merged = _merge(_read_recipe(recipe), updates)
    cfg = Config()
    _apply(cfg, merged)
    cfg.recipe = recipe
    _validate(cfg, require)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied and the whole validated again."""
    import copy

    out = copy.deepcopy(cfg)
    _apply(out, parse_overrides(list(overrides)))
    _validate(out)
    return out


# --------------------------------------------------------------------------- saving


def to_dict(cfg: Any) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config, notes: dict[str, str] | None = None) -> str:
    """The config as YAML; ``notes`` (dotted key -> text) become comments at the end of their lines."""
    dumped = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if not notes:
        return dumped
    lines, path = [], []
    for line in dumped.splitlines():
        key = re.match(r"( *)([A-Za-z_][\w]*):", line)
        if key:
            path[len(key.group(1)) // 2:] = [key.group(2)]
            here = ".".join(path)
            inline = line.endswith("}")  # a flow mapping: its keys are on this line
            found = [text if key == here else f"{key[len(here) + 1:]}: {text}" for key, text in notes.items()
                     if key == here or (inline and key.startswith(here + "."))]
            line += f"  # {'; '.join(found)}" if found else ""
        lines.append(line)
    return "\n".join(lines) + "\n"


def from_dict(data: dict) -> Config:
    """Rebuild a Config from a saved dict (e.g. the copy inside a checkpoint)."""
    cfg = Config()
    _apply(cfg, data)
    return cfg
