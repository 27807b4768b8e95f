"""An experiment: every component of a config built from the registry, validated before training."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range, checked
from ..core.config import ConfigDict, check_keys, show_value
from ..core.errors import ConfigError, GenlabError
from ..core.registry import build, construct, lookup
from ..core.checkpoint import Pins, load_run_weights, resolve_checkpoint
from ..core.config import load_config
from ..adapters.guidance import CFG, Guidance
from ..diffusion import Denoiser, Process, Sampler
from ..objectives import BuildContext, Objective
from .adapters import attach_adapters
from .latent import LatentSpace, latent_from
from .text_conditioning import TextConditioning, TextConfig

SECTIONS = ("name", "process", "model", "adapters", "objective", "sampler", "guidance", "data", "train", "distill",
            "text_encoder", "latent", "pinned")


@checked
@dataclass
class TrainConfig:
    """The ``train:`` section. Ranges are declared on the fields and checked when the config is read."""

    steps: PositiveInt = 4000
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    adam_beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9  # AdamW's betas, for every optimizer of the run
    adam_beta2: Annotated[float, Range(ge=0, lt=1)] = 0.999  # (VQGAN / latent diffusion's autoencoders: 0.5, 0.9)
    warmup_steps: NonNegativeInt = 200
    grad_clip: PositiveFloat | None = 1.0  # max gradient norm (None: no clipping)
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.999
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: Annotated[int, Range(ge=0, lt=2**31)] = 0
    log_every: PositiveInt = 100
    checkpoint_every: PositiveInt = 1000
    max_bad_steps: PositiveInt = 10  # consecutive skipped steps (non-finite loss or gradient) before the run stops
    eval_samples: PositiveInt = 4000  # samples drawn for the final metrics (images: split over the classes)
    eval_steps: list[PositiveInt] = field(default_factory=list)  # the final metrics also in these sampling steps
    grad_accum: PositiveInt = 1  # micro-batches per optimizer step (batch_size is per micro-batch)
    num_workers: NonNegativeInt = 0  # DataLoader worker processes (0: batches are read in the training process)
    compile: bool = False  # torch.compile the model
    sample_every: NonNegativeInt = 0  # also draw samples/step_N.png every N steps (0: only at the end)
    tensorboard: bool = False  # log losses to <run>/tensorboard (needs the tensorboard package)


@checked
@dataclass
class DistillConfig:
    """The ``distill:`` section, read by ``genlab distill`` (``genlab train`` trains one round)."""

    rounds: PositiveInt = 1  # progressive-distillation rounds, each halving the student's steps


@dataclass
class Experiment:
    """The built components of one config (``config`` is the resolved mapping)."""

    config: ConfigDict
    train: TrainConfig
    process: Process
    data: Any
    model: nn.Module
    objective: Objective
    sampler: Sampler
    guidance: Guidance | None = None  # the config's ``guidance:``, applied when sampling
    text: TextConditioning | None = None  # the config's ``text_encoder:``: captions -> cross-attention context
    latent: LatentSpace | None = None  # the config's ``latent:``: the frozen autoencoder the model works behind
    pins: Pins = field(default_factory=Pins)  # the checkpoint each pretrained run was loaded from (``pinned:``)
    checkpoint: Path | None = None  # where load_pretrained read the weights (None: built from a config)

    @classmethod
    def from_config(cls, config: ConfigDict) -> Experiment:
        """Validate and build every section; the model is initialised from ``train.seed``."""
        source = getattr(config, "source", "config")
        check_keys(config, SECTIONS, path="", source=source)
        for key, value in config.items():
            check_section(key, value, source)
        train = construct(TrainConfig, config.get("train") or {}, path="train", source=source)
        construct(DistillConfig, config.get("distill") or {}, path="distill", source=source)
        process = build("process", config.get("process", "vp"), path="process", source=source)
        data = build("dataset", config.get("data", "toy2d"), path="data", source=source)
        objective = build("objective", config.get("objective", "denoising"), path="objective", source=source)
        sampler = build("sampler", config.get("sampler", "unipc"), path="sampler", source=source)
        guidance = guidance_from(config.get("guidance"), source)
        text = text_from(config, data, guidance, source)
        pins = Pins(config.get("pinned"), source)  # a run's own config: the checkpoints it was built on
        pretrained = functools.partial(load_pretrained, pins=pins)
        latent = latent_from(config, item_shape(data), data, source, pretrained)
        shape = item_shape(data) if latent is None else latent.shape
        if guidance is not None:
            try:
                guidance.build(pretrained)
            except ValueError as e:
                raise ConfigError(f"{source}: guidance: {e}") from None

        def new_model() -> nn.Module:  # initialised from the global generator
            return build("model", config.get("model", "mlp"), path="model", source=source,
                         **model_extra(config, shape, source, text))

        torch.manual_seed(train.seed)
        model = new_model()  # an objective's further networks (new_model) are drawn after it, from the same seed
        if config.get("adapters"):  # fine-tuning through LoRA: base weights, the adapter, the rest frozen
            attach_adapters(model, config["adapters"], source, pins.resolve)
        try:  # the grid against the process: only now are both known
            sampler.timesteps(process)
        except ValueError as e:
            raise ConfigError(f"{source}: sampler: {e}") from None
        exp = cls(config, train, process, data, model, objective, sampler, guidance, text, latent, pins)
        context = BuildContext(model=model, process=process, sampler=sampler, data_shape=exp.data_shape,
                               num_classes=exp.num_classes, pretrained=pretrained, new_model=new_model,
                               guidance=guidance, data=data)
        try:
            objective.build(context)
        except ValueError as e:
            raise ConfigError(f"{source}: objective: {e}") from None
        check_control(objective, data, source)
        if train.eval_steps and "steps" not in inspect.signature(objective.sample).parameters:
            raise ConfigError(f"{source}: train.eval_steps: objective {type(objective).__name__} samples in no "
                              "number of steps; leave train.eval_steps empty")
        return exp

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of what the model sees: one data item (``[D]`` or ``[C, H, W]``, see :func:`item_shape`),
        or its latent ``[c, h, w]`` behind a ``latent:`` autoencoder."""
        return self.image_shape if self.latent is None else self.latent.shape

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one data item, what samples are evaluated as (latents decoded)."""
        return item_shape(self.data)

    @property
    def num_classes(self) -> int | None:
        """Classes the model is conditioned on, when the data has labels and the model takes them."""
        k = getattr(self.model, "num_classes", None)
        return k if k is not None and getattr(self.data, "labels", None) is not None else None

    @property
    def sampled_classes(self) -> int | None:
        """Classes samples are requested in: the model's (:attr:`num_classes`), else those of a guidance that
        makes an unconditional model class-conditional (classifier guidance)."""
        if self.text is not None:
            return len(self.prompts)
        return self.num_classes or (getattr(self.guidance, "num_classes", None)
                                    if getattr(self.data, "labels", None) is not None else None)

    @property
    def prompts(self) -> list[str]:
        """A text-conditioned experiment's prompts for sampling, one per class of :attr:`sampled_classes` (see
        :meth:`~genlab.training.text_conditioning.TextConditioning.requested`); [] without text."""
        if self.text is None:
            return []
        labelled = getattr(self.data, "labels", None) is not None
        return self.text.requested(self.data, getattr(self.data, "num_classes", None) if labelled else None)

    @property
    def prompts_name_classes(self) -> bool:
        """Whether prompt k is class k's (its samples are scored as class k): the data set's class prompts."""
        return self.text is not None and not self.text.cfg.prompts and callable(getattr(self.data, "prompt", None)) \
            and getattr(self.data, "labels", None) is not None

    def heldout_set(self) -> Any:
        """The data set's test split (items the model never saw), built with the config's other data
        options (a control image per item too): for data sets with a ``split`` (digits)."""
        cfg = self.config.get("data", "toy2d")
        cfg = {"type": cfg} if isinstance(cfg, str) else {k: v for k, v in dict(cfg).items() if k != "n"}
        if "split" not in inspect.signature(lookup("dataset", cfg.get("type"), path="data.type")).parameters:
            raise ConfigError(f"heldout_images: data set {cfg.get('type')!r} has no test split (it takes no `split`); "
                              "held-out images come from data sets such as digits")
        return build("dataset", {**cfg, "split": "test"}, path="data")

    def heldout_split(self) -> Any:
        """:meth:`heldout_set` with its items in memory (``data`` [N, ...], ``labels`` [N]); GenlabError for a
        data set that reads its items lazily."""
        held = self.heldout_set()
        if not isinstance(getattr(held, "data", None), Tensor):
            raise GenlabError(f"heldout_images: data set {type(held).__name__} reads its items lazily and has no "
                              "`data` tensor holding them all; read the images needed with its images(indices)")
        return held

    def heldout_images(self) -> Tensor:
        """The test split's images [N, ...] (images the model never saw), all of them at once: see
        :meth:`heldout_split`."""
        return self.heldout_split().data

    def denoiser(self, model: nn.Module | None = None) -> Denoiser:
        """The objective's Denoiser of ``model`` (default: the experiment's), for diffusion families."""
        make = getattr(self.objective, "denoiser", None)
        if make is None:
            raise ConfigError(f"objective {type(self.objective).__name__} trains no denoiser")
        return make(self.model if model is None else model, self.process)

    def heldout(self, n: int, draw: int = 0) -> Tensor:
        """``n`` fresh data points the model never saw (draw ``draw`` of the data with another seed); for a
        data set that cannot draw more (fixed rows such as reflow's pairs), ``n`` of its rows drawn at
        random (with replacement), a different draw each time."""
        cfg = self.config.get("data", "toy2d")
        cfg = {"type": cfg} if isinstance(cfg, str) else dict(cfg)
        params = inspect.signature(lookup("dataset", cfg.get("type"), path="data.type")).parameters
        if not {"n", "seed"} <= params.keys():
            g = torch.Generator().manual_seed(7919 * (draw + 1))
            return self.data.data[torch.randint(len(self.data.data), (n,), generator=g)]
        cfg.update(n=n, seed=int(cfg.get("seed", 0)) + 7919 * (draw + 1))
        return build("dataset", cfg, path="data").data

    def resolved(self) -> dict[str, Any]:
        """The config with the train section's defaults filled in and ``pinned:``, the checkpoint each
        pretrained run was loaded from (:class:`~genlab.core.checkpoint.Pins`): what a checkpoint stores."""
        out = {k: v for k, v in self.config.items() if k != "pinned"}
        return {**out, "train": asdict(self.train), **({"pinned": dict(self.pins.used)} if self.pins.used else {})}


def load_pretrained(path: str, pins: Pins | None = None) -> Experiment:
    """The Experiment of a trained run (a run directory or a checkpoint directory, verified), its model
    holding the EMA weights (loaded through safetensors), in eval mode and frozen: a teacher, or any
    pretrained component an objective names in its config. A ControlNet run (objective ``controlnet``)
    loads whole: its model is the base with the ControlNet (a ``ControlledModel``, which takes ``control``).
    With ``pins``, the checkpoint is the one pinned for ``path`` (or, unpinned, the newest), and recorded."""
    ckpt = resolve_checkpoint(path) if pins is None else pins.resolve(path)
    exp = Experiment.from_config(ConfigDict(load_config(ckpt / "config.yaml"), source=str(ckpt / "config.yaml")))
    if exp.objective.modules().get("model", exp.model) is exp.model:
        load_run_weights(exp.model, ckpt)
    else:  # the run trained another network on the frozen model: loaded whole, as it samples
        from .resume import load_sampling_weights

        whole = getattr(exp.objective, "controlled", None)
        if whole is None:
            raise GenlabError(f"{path}: objective {type(exp.objective).__name__} trains a network beside the config's "
                              "model, which genlab cannot load as one pretrained model; sample it with genlab sample")
        exp.model = whole(load_sampling_weights(exp, ckpt))  # a ControlNet run: its base with the ControlNet
    exp.model.eval().requires_grad_(False)
    exp.checkpoint = ckpt
    return exp


def guidance_from(cfg: Any, source: str = "config") -> Guidance | None:
    """The ``guidance:`` section built (None without one); a mapping without ``type`` is classifier-free
    guidance (``genlab sample RUN guidance.scale=3``)."""
    if cfg is None:
        return None
    if isinstance(cfg, Mapping) and "type" not in cfg:
        cfg = {"type": "cfg", **cfg}
    return build("guidance", cfg, path="guidance", source=source)


def check_control(objective: Objective, data: Any, source: str) -> None:
    """ConfigError when the data set gives control images (``data.control``) that the trained model cannot
    take: a plain backbone has no ``control`` input, a ControlNet (objective ``controlnet``) adds one."""
    if getattr(data, "control", None) is None or objective.takes_control:
        return
    model = objective.modules()["model"]
    params = inspect.signature(model.forward).parameters
    if "control" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{source}: data.control: the data set gives control images, but the model "
                          f"({type(model).__name__}) takes no control input; train a ControlNet (objective: "
                          "{type: controlnet, base: RUN}) or drop data.control")


def text_from(config: Mapping, data: Any, guidance: Guidance | None, source: str) -> TextConditioning | None:
    """The ``text_encoder:`` section built (None without one), checked against the data (it must give captions);
    a classifier-free guidance without its own ``uncond`` gets the empty prompt's context as the unconditional
    branch."""
    section = config.get("text_encoder")
    if section is None:
        return None
    if getattr(data, "captions", None) is None:
        raise ConfigError(f"{source}: text_encoder: data set {type(data).__name__} gives no captions; use a captioned "
                          "data set (digits: data.captions: templates)")
    text = TextConditioning(construct(TextConfig, section, path="text_encoder", source=source), source)
    given = config.get("guidance")
    if isinstance(guidance, CFG) and not (isinstance(given, Mapping) and "uncond" in given):
        guidance.uncond = {"context": text.null(1)}
    return text


def check_section(key: str, value: Any, source: str) -> None:
    """``name`` is a string; ``train`` a mapping; a component section a name or a mapping with ``type``
    (``guidance`` may be null: none)."""
    if key == "name":
        ok, wanted = isinstance(value, str), "a string"
    elif key in ("train", "distill", "adapters", "text_encoder", "latent", "pinned"):
        what = {"train": "training", "distill": "distillation", "adapters": "adapter", "text_encoder": "text encoder",
                "latent": "latent space", "pinned": "pinned checkpoint"}[key]
        ok, wanted = value is None or isinstance(value, Mapping), f"a mapping of {what} settings"
    elif key == "guidance":  # null: sample unguided (`genlab sample RUN guidance=null`)
        ok, wanted = value is None or isinstance(value, (str, Mapping)), "null, a guidance name or a mapping"
    else:
        ok, wanted = isinstance(value, (str, Mapping)), "a component name or a mapping with 'type'"
    if not ok:
        raise ConfigError(f"{source}: {key}: expected {wanted}, got {show_value(value)}")


def item_shape(data: Any) -> tuple[int, ...]:
    """The shape of one item of data set ``data`` (``[D]`` or ``[C, H, W]``): from its ``data`` tensor
    (in-memory sets), its ``shape`` (sets that read items lazily), or its first item."""
    tensor = getattr(data, "data", None)
    if isinstance(tensor, Tensor):
        return tuple(tensor.shape[1:])
    shape = getattr(data, "shape", None)
    if shape is not None:
        return tuple(shape)
    item = data[0]
    return tuple((item[0] if isinstance(item, (tuple, list)) else item).shape)


def model_extra(config: dict, shape: tuple[int, ...], source: str = "config",
                text: TextConditioning | None = None) -> dict[str, Any]:
    """Arguments the shape of the model's input (``shape``: a data item or its latent) decides unless the
    config sets them: ``dim`` for vectors, ``in_channels`` (and ``input_size``) for images; with a text
    encoder, ``cross_attention_dim`` (its width, which a given value must equal)."""
    cfg = config.get("model", "mlp")
    cfg = {"type": cfg} if isinstance(cfg, str) else cfg
    params = inspect.signature(lookup("model", cfg.get("type", "mlp"), path="model.type", source=source)).parameters
    known = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0], "input_size": shape[-1]}
    if text is not None:
        known["cross_attention_dim"] = text.hidden_size
        if cfg.get("cross_attention_dim", text.hidden_size) != text.hidden_size:
            raise ConfigError(f"{source}: model.cross_attention_dim: {cfg['cross_attention_dim']} differs from the text "
                              f"encoder's width {text.hidden_size}; leave it out (the encoder sets it)")
    return {k: v for k, v in known.items() if k in params and k not in cfg}
