"""The training loop on accelerate: one CPU process or many GPUs with the same code, for any
objective (:class:`genlab.objectives.Objective`): the Trainer knows nothing of diffusion. It trains
the modules the objective trains, with one AdamW per optimizer the objective declares, stepped in the
order of its schedule, keeps EMA copies of the modules it names, and moves frozen ones to the device.

Data comes through ``torch.utils.data`` (:func:`genlab.data.loading.training_batches`): batch k of a
rank is a function of (seed, k, rank), and step s reads batches s * grad_accum ... onwards, so a
resumed run, mid-epoch included, reads what an uninterrupted one would have. Every other random draw
of step s (noise, times; dropout through the global generator) comes from a generator seeded with
(seed, s, micro-batch, rank).

The run directory belongs to the Trainer from its checks to its last file (:mod:`genlab.core.rundir`):
a fresh run needs a new or empty directory, a resumed one its newest intact checkpoint, a config that
differs from the run's only in :data:`RESUMABLE` keys, and weights that fit the model; all of that is
checked before anything is written, then the directory is locked and cleaned of temporaries.

Non-finite policy: a step whose loss (or, without fp16 loss scaling, gradients: their clipped norm, or
any element where nothing is clipped) is not finite is skipped and counted; ``train.max_bad_steps``
skipped steps in a row stop the run with a :class:`~genlab.core.errors.NonFiniteError`; a checkpoint
never holds a non-finite tensor.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from ..core.checkpoint import (check_fits, checkpoints, intact_checkpoint, latest_checkpoint, load_optimizer,
                               load_state, load_weights, save_checkpoint)
from ..core.config import save_config
from ..core.errors import GenlabError, NonFiniteError
from ..core.rundir import RunLock, check_run_dir, is_main_rank
from ..data.loading import training_batches
from .ema import EMA
from .evaluation import evaluate
from .experiment import Experiment
from .plots import plot_losses
from .resume import check_resume_config, weights_file
from .steps import (adamw, gradients_finite, lr_at, optimizer_step, seed_global_generators, step_generator,
                    step_seed)


_PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # clip by torch's own


class Trainer:
    """Trains the modules of ``exp.objective``; writes checkpoints, loss curve, samples and metrics to
    ``out_dir``, which it owns (locked) until :meth:`close`. ``resume=True`` continues from the newest
    intact checkpoint there (``resumed_from``); otherwise the directory must be new or empty.

    ``modules`` are the objective's modules as trained (trained ones wrapped by accelerate), ``opts``
    its optimizers by name, ``emas`` the EMA copies by module name; ``model``, ``opt`` and ``ema`` are
    those of the ``"model"`` module and its optimizer.
    """

    def __init__(self, exp: Experiment, out_dir: str | Path, progress: bool = True, resume: bool = False) -> None:
        self.exp, self.out, self.progress = exp, Path(out_dir), progress
        self._declared()
        self.resumed_from = self._checked_start(resume)  # nothing is written before this passes
        seen = checkpoints(self.out)
        self.lock = RunLock(self.out, purpose="training")
        try:
            if is_main_rank():  # again, under the lock: no run slipped in since
                self._checked_again(resume, seen)
            self._setup()
            if self.resumed_from is not None:
                self._load(self.resumed_from)
            self.batches = self._batches()
        except BaseException:
            self.close()
            raise

    def _declared(self) -> None:
        """The objective's modules, frozen ones, optimizers and EMA, checked against each other."""
        obj, who = self.exp.objective, type(self.exp.objective).__name__
        self.raw = obj.modules()
        self.trained = [n for n in self.raw if n not in obj.frozen]
        self.opt_modules = obj.optimizers()
        for opt, names in self.opt_modules.items():
            wrong = [n for n in names if n not in self.trained]
            if wrong or not names:
                raise GenlabError(f"{who}: optimizer '{opt}' updates {names!r}; it must name trained modules "
                                  f"({', '.join(self.trained)})")
        unused = set(self.trained) - {n for names in self.opt_modules.values() for n in names}
        if unused:
            raise GenlabError(f"{who}: trained module(s) {sorted(unused)} belong to no optimizer; freeze them or "
                              "give them one")
        bad_ema = [n for n in obj.ema_modules() if n not in self.trained]
        if bad_ema:
            raise GenlabError(f"{who}: EMA of {bad_ema}, which are not trained modules")
        for name, (source, _) in obj.targets().items():
            if source not in self.trained or name in self.raw:
                raise GenlabError(f"{who}: target '{name}' of '{source}': the source must be a trained module and "
                                  "the name a new one")

    def _checked_start(self, resume: bool) -> Path | None:
        """The checkpoint to resume from (None for a fresh run), every check passed; writes nothing."""
        if is_main_rank():
            check_run_dir(self.out, resume=resume, has_checkpoint=latest_checkpoint(self.out) is not None)
        if not resume:
            return None
        ckpt = intact_checkpoint(self.out)
        if ckpt is None:
            raise GenlabError(f"--out {self.out}: holds no checkpoint to resume from")
        check_resume_config(ckpt, self.exp.resolved())
        for name in self.trained:
            check_fits(ckpt / weights_file(name), self.raw[name])
        for name in self.exp.objective.ema_modules():
            check_fits(ckpt / weights_file(name, ema=True), self.raw[name])
        for name, (source, _) in self.exp.objective.targets().items():
            check_fits(ckpt / f"target_{name}.safetensors", self.raw[source])
        return ckpt

    def _checked_again(self, resume: bool, seen: list[Path]) -> None:
        """:meth:`_checked_start` under the lock: the directory checked again and, where its checkpoints are
        not the ``seen`` ones, all of it (else they are not hashed twice); GenlabError if another run's
        checkpoint came in meanwhile and would now be the one to resume from."""
        if checkpoints(self.out) == seen:
            check_run_dir(self.out, resume=resume, has_checkpoint=bool(seen))
            return
        ckpt = self._checked_start(resume)
        if ckpt != self.resumed_from:
            raise GenlabError(f"--out {self.out}: another run wrote {ckpt} while this one started; start again")

    def _setup(self) -> None:
        exp, tc, obj = self.exp, self.exp.train, self.exp.objective
        # accelerate keeps one precision per process: let a later Trainer in the same process (a
        # notebook, a test) choose its own; the distributed state is kept
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available())
        self.emas = {n: EMA(self.raw[n], tc.ema_decay) for n in obj.ema_modules()}
        self.targets = {n: EMA(self.raw[src], decay, warmup=False) for n, (src, decay) in obj.targets().items()}
        opts = {name: adamw([p for n in names for p in self.raw[n].parameters()], tc.lr, tc.weight_decay,
                            (tc.adam_beta1, tc.adam_beta2))
                for name, names in self.opt_modules.items()}
        trained = [torch.compile(self.raw[n]) if tc.compile else self.raw[n] for n in self.trained]
        prepared = self.acc.prepare(*trained, *opts.values())
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        self.modules = dict(zip(self.trained, prepared[: len(trained)]))
        self._unwrapped = {n: self.acc.unwrap_model(self.modules[n]) for n in self.trained}
        self.params = {name: [p for n in names for p in self.modules[n].parameters()]  # as prepared (FSDP flattens)
                       for name, names in self.opt_modules.items()}
        for name in obj.frozen:
            self.modules[name] = self.raw[name].to(self.acc.device).eval().requires_grad_(False)
        self.opts = dict(zip(opts, prepared[len(trained):]))
        for ema in self.emas.values():
            ema.model.to(self.acc.device)
        for name, target in self.targets.items():
            self.modules[name] = target.model.to(self.acc.device)
        self.model, self.opt, self.ema = self.modules.get("model"), self.opts.get("model"), self.emas.get("model")
        self.step, self.losses, self.skipped = 0, [], 0
        self.writer = self._tensorboard() if tc.tensorboard and self.acc.is_main_process else None
        if self.acc.is_main_process:
            save_config(exp.resolved(), self.out / "config.yaml")

    def _batches(self) -> Any:
        """Training batches from the one this step reads first (see the module's docstring)."""
        tc = self.exp.train
        loader = training_batches(self.exp.data, tc.batch_size, seed=tc.seed, rank=self.acc.process_index,
                                  world=self.acc.num_processes, start=self.step * tc.grad_accum,
                                  num_workers=tc.num_workers, labels=self.exp.num_classes is not None,
                                  device=self.acc.device)
        return iter(loader)

    def close(self) -> None:
        """Release the run directory (the process's end does it too)."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if hasattr(self, "lock"):
            self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise GenlabError("train.tensorboard: true needs the tensorboard package (pip install tensorboard)") from e
        return SummaryWriter(str(self.out / "tensorboard"))

    def _load(self, ckpt: Path) -> None:
        for name in self.trained:  # into the module itself: also under torch.compile
            self.unwrapped(name).load_state_dict(load_weights(ckpt / weights_file(name)))
        for name, ema in self.emas.items():
            ema.model.load_state_dict(load_weights(ckpt / weights_file(name, ema=True)))
        saved = load_optimizer(ckpt)
        if "param_groups" in saved:  # written when a run had one optimizer and no names
            saved = {"model": saved}
        for name, opt in self.opts.items():
            opt.load_state_dict(saved[name])
        state = load_state(ckpt)
        updates = state["ema_updates"]
        for name, ema in self.emas.items():
            ema.updates = updates[name] if isinstance(updates, dict) else updates
        for name, target in self.targets.items():
            target.model.load_state_dict(load_weights(ckpt / f"target_{name}.safetensors"))
            target.updates = state["target_updates"][name]
        self.step, self.losses = state["step"], state.get("losses", [])
        self.skipped = state.get("skipped_steps", 0)

    def unwrapped(self, name: str = "model") -> torch.nn.Module:
        """Trained module ``name`` without accelerate's and torch.compile's wrappers."""
        module = self._unwrapped[name] if name in self._unwrapped else self.acc.unwrap_model(self.modules[name])
        return getattr(module, "_orig_mod", module)  # torch.compile's wrapper

    def save(self) -> None:
        """Checkpoint ``checkpoints/step_N``; NonFiniteError (nothing written) if a weight is not finite."""
        if not self.acc.is_main_process:
            return
        state = {"step": self.step, "ema_updates": {n: e.updates for n, e in self.emas.items()},
                 "target_updates": {n: t.updates for n, t in self.targets.items()},
                 "losses": self.losses, "skipped_steps": self.skipped}
        weights = {weights_file(n): self.unwrapped(n).state_dict() for n in self.trained}
        weights.update({weights_file(n, ema=True): e.model.state_dict() for n, e in self.emas.items()})
        weights.update({f"target_{n}.safetensors": t.model.state_dict() for n, t in self.targets.items()})
        model = weights.pop("model.safetensors", {})
        ema = weights.pop("ema.safetensors", None)
        try:
            save_checkpoint(self.out / "checkpoints" / f"step_{self.step:07d}", model=model, ema=ema,
                            optimizer={n: o.state_dict() for n, o in self.opts.items()},
                            config=self.exp.resolved(), state=state, extra=weights)
        except NonFiniteError as e:
            last = latest_checkpoint(self.out)
            raise NonFiniteError(f"step {self.step}: the model diverged, {e}; the newest checkpoint is "
                                 f"{last or 'none'}; lower train.lr or set train.grad_clip") from None

    def micro_loss(self, micro: int, batch: dict[str, torch.Tensor] | None = None,
                   optimizer: str = "model") -> torch.Tensor:
        """The loss of micro-batch ``micro`` of this step for ``optimizer`` (``batch``: the next one read)."""
        tc = self.exp.train
        batch = next(self.batches) if batch is None else batch
        g = step_generator(tc.seed, self.step, micro, self.acc.process_index, batch["x"].device)
        # draws that modules make from the global generators (dropout, class dropout) are then a
        # function of the step too, so that a resumed run repeats them
        seed_global_generators(step_seed(tc.seed, self.step, micro, self.acc.process_index) ^ 0x5DEECE66D,
                               batch["x"].device)
        if self.exp.text is not None:  # captions -> cross-attention context (caption dropout: global generator)
            batch = self.exp.text.condition(batch)
        if self.exp.latent is not None:  # images -> latents of the frozen autoencoder (posterior draws: g)
            batch = self.exp.latent.encode(batch, g)
        with self.acc.autocast():
            out = self.exp.objective.loss(self.modules, batch, g, optimizer)
        return out[0] if isinstance(out, tuple) else out

    def train_step(self) -> float:
        """One step of every optimizer the schedule names, each over ``grad_accum`` micro-batches (the
        same batches for each); NaN, and no update of any, if a loss or a gradient norm (without fp16
        loss scaling, which skips such steps itself) is not finite. Returns the summed loss."""
        tc, total = self.exp.train, 0.0
        self.exp.objective.at_step(self.step, tc.steps)
        batches = [next(self.batches) for _ in range(tc.grad_accum)]
        for name in self.exp.objective.schedule(self.step):
            opt, params = self.opts[name], self.params[name]
            for group in opt.param_groups:
                group["lr"] = lr_at(self.step, self.exp)
            for micro, batch in enumerate(batches):
                last = micro == tc.grad_accum - 1
                with contextlib.ExitStack() as stack:
                    if not last:  # gradients are all-reduced once, after the last micro-batch
                        for n in self.opt_modules[name]:
                            stack.enter_context(self.acc.no_sync(self.modules[n]))
                    loss = self.micro_loss(micro, batch, name)
                    if tc.grad_accum > 1:  # (a division by 1 would cost an op forward and two backward)
                        loss = loss / tc.grad_accum
                    value = loss.item()  # one read of the loss (a device sync), for the check and the sum
                    if not math.isfinite(value):
                        self._zero_grad()
                        return float("nan")
                    self.acc.backward(loss)
                total += value
            if not self._clip_gradients(params, tc.grad_clip):
                self._zero_grad()
                return float("nan")
            if self.acc.scaler is None and self.acc.distributed_type in _PLAIN:
                optimizer_step(opt.optimizer)  # accelerate's wrapper adds package look-ups here
            else:
                opt.step()
            self._zero_grad()
        for name, ema in self.emas.items():
            ema.update(self.unwrapped(name))
        for name, (source, decay) in self.exp.objective.targets().items():
            self.targets[name].decay = decay  # a schedule mu(k) of the step (see Objective.at_step)
            self.targets[name].update(self.unwrapped(source))
        return total

    def _clip_gradients(self, params: list[torch.nn.Parameter], max_norm: float | None) -> bool:
        """Clip the gradients of ``params`` to total norm ``max_norm`` (None: no clipping); False where
        they are not finite (the step is then skipped; under fp16 loss scaling the scaler does that
        itself, and this says True). accelerate's ``clip_grad_norm_`` by torch's directly where the two
        are the same (no FSDP, DeepSpeed or XLA): accelerate's generic path looks packages up on every
        call, which cost more than a small model's whole step."""
        if self.acc.distributed_type not in _PLAIN:
            norm = self.acc.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)
        else:
            self.acc.unscale_gradients()
            if max_norm is None:  # the check alone
                scaled = self.acc.scaler is not None
                return scaled or gradients_finite([p.grad for p in params if p.grad is not None])
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.acc.scaler is not None or norm is None or math.isfinite(norm.item())

    def _zero_grad(self) -> None:
        """Every optimizer's gradients to None (where accelerate's wrapper adds nothing, directly: the
        optimizer's ``zero_grad`` costs a small model's step about 40 us more)."""
        for opt in self.opts.values():
            if self.acc.distributed_type not in _PLAIN:
                opt.zero_grad(set_to_none=True)
                continue
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def fit(self) -> None:
        tc, bad, running = self.exp.train, 0, []
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress or not self.acc.is_main_process,
                   desc="train", dynamic_ncols=True, mininterval=1.0)
        for name in self.trained:
            self.modules[name].train()
        while self.step < tc.steps:
            loss = self.train_step()
            self.step += 1
            bar.update(1)
            if math.isfinite(loss):
                bad, running = 0, running + [loss]
            else:
                bad, self.skipped = bad + 1, self.skipped + 1
                warnings.warn(f"step {self.step}: non-finite loss or gradient, step skipped ({bad} in a row)",
                              stacklevel=1)
                if bad >= tc.max_bad_steps:
                    raise NonFiniteError(
                        f"{bad} non-finite losses or gradients in a row at step {self.step} (train.max_bad_steps): "
                        f"stopped; the newest checkpoint is {latest_checkpoint(self.out) or 'none'}; lower "
                        "train.lr, set train.grad_clip or check the data")
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                self.log(sum(running) / max(1, len(running)), bar)
                running = []
            if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                try:
                    self.evaluate(name=f"samples/step_{self.step:07d}")
                except NonFiniteError as e:  # a picture along the way: say so, keep training
                    warnings.warn(f"step {self.step}: {e}", stacklevel=1)
            if self.step == tc.steps:  # what the family fits once trained goes into the final checkpoint
                self.exp.objective.finish(self.sampling_modules())
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save()
        bar.close()

    def log(self, loss: float, bar: Any) -> None:
        self.losses.append([self.step, loss])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_at(self.step - 1, self.exp):.2e}")
        if self.acc.is_main_process:
            plot_losses(self.losses, self.out / "loss.png")
            if self.writer is not None:
                self.writer.add_scalar("loss", loss, self.step)

    def sampling_modules(self) -> dict[str, torch.nn.Module]:
        """The modules samples are drawn with: EMA copies where there are, the others as trained."""
        return {n: self.emas[n].model if n in self.emas else self.unwrapped(n) if n in self.trained else m
                for n, m in self.modules.items()}

    def evaluate(self, seed: int = 1234, name: str = "samples", rows: bool = False) -> dict[str, Any]:
        """Sample with the EMA modules, write ``{name}.png`` and ``{name}.json``; returns the metrics
        (``rows``: also the objective's references and ``train.eval_steps``, see :func:`evaluate`).
        NonFiniteError if the samples are not finite (nothing written)."""
        if not self.acc.is_main_process:
            return {}
        return evaluate(self.exp, self.sampling_modules(), self.out, name, seed, self.step, rows=rows)
