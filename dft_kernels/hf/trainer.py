"""``DFTTrainerMixin`` / ``DFTTrainer``: a transformers Trainer that trains with the DFT loss."""
from __future__ import annotations

import math
import warnings

import torch
import transformers

from .collator import DFTDataCollator
from .config import DFTConfig
from ..options import LOSS_DEFAULTS
from ..validation import flush_checks, raise_when
from .patch import _STATE_ATTR, _unwrap, is_patched, last_loss_components, patch

_COMPONENTS = ("divergence", "accuracy")
_MASSES = ("teacher_mass", "student_mass")
_KEEP_COLUMNS = ("input_ids", "attention_mask", "labels", "target_index", "target_logprobs")


class DFTTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first in the bases, e.g.
    ``class MySFT(DFTTrainerMixin, trl.SFTTrainer)``) to train with the DFT loss.

    ``dft_config`` (a :class:`DFTConfig`, or a dict of its fields) holds every DFT
    option. The model is patched with :func:`dft_kernels.hf.patch` (a model that is
    already patched keeps its options when ``dft_config`` is None); the default data
    collator is :class:`DFTDataCollator`. The loss is the patched model's, so
    ``num_items_in_batch`` (gradient accumulation) is honoured. The divergence and
    the accuracy term (``loss = dft_divergence + lam * dft_accuracy``) are logged
    separately, with the mean teacher / student mass on the teacher's slots, in
    training logs and as ``eval_dft_*`` in evaluation metrics.

    ``compute_loss`` calls ``transformers.Trainer.compute_loss`` directly, skipping a
    subclass's own version in between (TRL's SFTTrainer computes token accuracy and
    entropy from logits, which the fused path does not return).
    """

    def __init__(self, *args, dft_config: DFTConfig | dict | None = None, teacher_model=None, **kwargs):
        if isinstance(dft_config, dict):
            dft_config = DFTConfig(**dft_config)
        if dft_config is not None and not isinstance(dft_config, DFTConfig):
            raise TypeError(f"dft_config must be a DFTConfig or a dict of its fields, got {type(dft_config).__name__}")
        if dft_config is not None and dft_config.ignore_index != -100:
            raise ValueError(f"DFTConfig(ignore_index={dft_config.ignore_index}) must be -100 with a Trainer: the "
                             "Trainer counts labels != -100 for num_items_in_batch (gradient accumulation)")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func cannot be combined with the DFT loss: the patched model computes it; "
                             "drop compute_loss_func")
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(targs, "label_smoothing_factor", 0) not in (0, 0.0, None):
            raise ValueError("label_smoothing_factor must be 0 with the DFT loss (the Trainer would replace the "
                             "DFT loss with its label-smoothed cross-entropy)")
        model = kwargs.get("model", args[0] if args else None)
        mode = dft_config.teacher if dft_config is not None else "offline"
        if (teacher_model is None) != (mode == "offline"):
            raise ValueError(f"DFTConfig(teacher={mode!r}) with teacher_model={type(teacher_model).__name__}: pass "
                             "teacher_model together with teacher='topk' or 'dense', neither for offline targets")
        if teacher_model is not None and isinstance(model, torch.nn.Module):
            from .online import check_teacher_and_student     # before the teacher is frozen or anything runs
            check_teacher_and_student(teacher_model, model, mode)
        tok = kwargs.get("processing_class", kwargs.get("tokenizer"))
        if kwargs.get("data_collator") is None and not (len(args) > 2 and args[2] is not None):
            kwargs["data_collator"] = DFTDataCollator(tok)
        self.dft_config = dft_config
        # patch before the Trainer inspects the forward (signature columns, loss kwargs)
        if isinstance(model, torch.nn.Module):
            self._dft_patch(model, dft_config)
        super().__init__(*args, **kwargs)
        if self.model is not None:
            self._dft_patch(self.model, dft_config)
        if dft_config is not None:  # reverse KL / JSD on sampled targets: warn once (docs/design.md sec. 12)
            from ..targets.sampling import warn_if_biased
            evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
            for ds in [self.train_dataset, *evals]:
                warn_if_biased(getattr(ds, "manifest", None), dft_config.divergence, dft_config.beta)
        if teacher_model is None:
            self._dft_check_temperature()
        # the patched forward takes num_items_in_batch; its labels are shifted like ForCausalLMLoss's, so the
        # Trainer must count labels[..., 1:] (it does not for every model class, e.g. GPT-2's)
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "_loss_shifts_labels"):
            self._loss_shifts_labels = True
        self._dft_teacher = None
        if teacher_model is not None:
            from .online import OnlineTeacher, check_teacher_and_student
            if not isinstance(model, torch.nn.Module):      # made by model_init: check it now
                check_teacher_and_student(teacher_model, self.model, mode)
            self._dft_teacher = OnlineTeacher(teacher_model, mode, dft_config.k, dft_config.temperature,
                                              device=self.args.device)
        self._dft_train = _Accumulator()
        self._dft_eval = _Accumulator()
        self._dft_last_step = 0
        self.add_callback(_SyncLoggedStep(self))     # resume: count steps from the checkpoint's global step

    def _dft_check_temperature(self) -> None:
        """Offline targets built at one temperature, trained at another: warn once (legal, but the
        loss tempers only the student, so it is pushed towards p_teacher ** (tau / T_built))."""
        tau = self.dft_config.temperature if self.dft_config is not None else None
        if tau is None:
            state = getattr(_unwrap(self.model), "__dict__", {}).get(_STATE_ATTR) if self.model is not None else None
            tau = state.loss_kwargs.get("temperature", 1.0) if state is not None else 1.0
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for ds in [self.train_dataset, *evals]:
            man = getattr(ds, "manifest", None)
            built = man.get("temperature") if isinstance(man, dict) else None
            if isinstance(built, bool) or not isinstance(built, (int, float)) or math.isclose(built, tau, rel_tol=1e-6):
                continue
            where = getattr(ds, "targets_dir", None)
            warnings.warn(
                f"the targets{f' in {str(where)!r}' if where is not None else ''} were built at temperature "
                f"{built:g} (the teacher's) but the loss trains at DFTConfig(temperature={tau:g}) (the student's): "
                f"offline targets are not retempered, so the student is pushed towards p_teacher ** "
                f"({tau:g} / {built:g}), not the teacher's distribution. Rebuild the targets at the training "
                f"temperature (dft-kernels targets build ... --temperature {tau:g}), or train with "
                f"DFTConfig(temperature={built:g}); top-k targets can be retempered in memory with "
                f"SparseTargets.retemper({built:g} / {tau:g})", UserWarning, stacklevel=3)
            return                                   # once per trainer

    def call_model_init(self, trial=None):
        # models made by model_init (hyper-parameter search) are patched like a passed model
        model = super().call_model_init(trial)
        self._dft_patch(model, getattr(self, "dft_config", None))
        return model

    @staticmethod
    def _dft_patch(model, cfg) -> None:
        if cfg is not None:
            patch(model, cfg)
        elif not is_patched(model):
            patch(model, DFTConfig())

    def _set_signature_columns_if_needed(self):
        # keep the target columns when the Trainer drops dataset columns the forward does not take
        # (TRL's SFTTrainer keeps a fixed list: input_ids, labels, seq_lengths)
        super()._set_signature_columns_if_needed()
        cols = getattr(self, "_signature_columns", None)
        if isinstance(cols, list):
            cols.extend(c for c in _KEEP_COLUMNS if c not in cols)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}      # no KV cache to build while training
        comps = None
        if self._dft_teacher is not None and self._dft_teacher.mode == "dense":
            loss, outputs, comps = self._dft_teacher.dense_loss(model, inputs, num_items_in_batch,
                                                                self.dft_config.loss_kwargs())
            if getattr(self.args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
                # as transformers.Trainer.compute_loss does: the loss is a sum over the global token count,
                # and DDP averages the ranks' gradients
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.args.n_gpu if self.args.n_gpu > 1 else self.accelerator.num_processes // tp)
        else:
            if self._dft_teacher is not None:
                inputs = self._dft_teacher.targets(inputs, self.args.device)
            loss, outputs = transformers.Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                              num_items_in_batch=num_items_in_batch)
        if model.training and torch.is_grad_enabled():
            self._dft_check_step_trains(model, inputs, loss)
        if self.dft_config is None or self.dft_config.log_components:
            comps = comps if comps is not None else last_loss_components(self.accelerator.unwrap_model(model))
            if comps is not None:
                if model.training:
                    # make the parts add up like the Trainer's logged loss: scaled for gradient accumulation
                    scale = 1.0
                    if num_items_in_batch is None:
                        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps",
                                              self.args.gradient_accumulation_steps)
                    elif getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
                        scale = float(loss.detach() / comps.loss.detach()) if float(comps.loss.detach()) != 0 else 1.0
                    self._dft_train.add(comps, scale)
                else:
                    self._dft_eval.add(comps, 1.0)
        return (loss, outputs) if return_outputs else loss

    def _dft_check_step_trains(self, model, inputs, loss) -> None:
        """A training step whose loss cannot depend on the parameters raises ValueError
        (docs/design.md sec. 7): a loss without grad (checked now, free), or ``lam = 0`` with
        targets given and counted positions, none of them with a valid target slot (a
        device-side flag: raised at once on CPU, at the next loss call or log on CUDA).
        A batch without a counted position is not an error."""
        if isinstance(loss, torch.Tensor) and not loss.requires_grad:
            raise ValueError("the DFT loss of this training step does not depend on the model's parameters (no "
                             "labels and no targets in the batch? every parameter frozen?): check that the data "
                             "collator keeps labels / target_index and that some parameters require grad")
        if inputs.get("target_index") is None:
            return                       # no targets: the loss is the accuracy term at weight 1
        state = _unwrap(self.accelerator.unwrap_model(model)).__dict__.get(_STATE_ATTR)
        comps = state.last_components if state is not None else None
        if comps is None or state.loss_kwargs.get("lam", LOSS_DEFAULTS["lam"]) != 0:
            return
        # teacher_mass is the mean over counted positions with a valid slot: NaN when there is none
        flag = ((comps.n_tokens > 0) & torch.isnan(comps.teacher_mass)).reshape(1)
        raise_when(flag, lambda _: "lam=0 and no counted position of a training batch has a valid target slot "
                                   "(every slot empty, id -1 or log-prob -inf): the step trains nothing. Check the "
                                   "targets (dft-kernels targets inspect) and the collator, or set lam > 0 to "
                                   "train on the labels too")

    def evaluate(self, *args, **kwargs):
        self._dft_eval.reset()
        return super().evaluate(*args, **kwargs)

    def log(self, logs, *args, **kwargs):
        flush_checks()      # the data checks still pending on the device (docs/design.md sec. 7)
        if self.dft_config is None or self.dft_config.log_components:
            if "loss" in logs and self._dft_train.n:
                steps = max(1, self.state.global_step - self._dft_last_step)
                self._dft_last_step = self.state.global_step
                logs.update(self._dft_train.pop(self, prefix="dft_", sum_steps=steps))
            elif any(k.startswith("eval_") for k in logs) and self._dft_eval.n:
                logs.update(self._dft_eval.pop(self, prefix="eval_dft_", sum_steps=None))
        return super().log(logs, *args, **kwargs)


class DFTTrainer(DFTTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with the DFT loss: ``DFTTrainer(model, args, train_dataset=...,
    dft_config=DFTConfig(lam=0.2, ...))``. See :class:`DFTTrainerMixin`."""


class _SyncLoggedStep(transformers.TrainerCallback):
    """At the start of ``train()`` (after a checkpoint's state is loaded) the logged
    components count steps from the current global step, like the Trainer's loss."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._dft_last_step = state.global_step
        self.trainer._dft_train.reset()


class _Accumulator:
    """Detached running sums of the loss components (no host sync until logged)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = {}
        self.n = 0

    def add(self, comps, scale: float) -> None:
        for k in _COMPONENTS:
            v = getattr(comps, k).detach().float() * scale
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        for k in _MASSES:
            v = getattr(comps, k).detach().float()
            ok = torch.isfinite(v)
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v, torch.zeros_like(v))
            self.sums[k + "_n"] = self.sums.get(k + "_n", 0.0) + ok.float()
        self.n += 1

    def pop(self, trainer, *, prefix: str, sum_steps: int | None) -> dict:
        """Training: components summed over micro-batches / optimizer steps (like the
        Trainer's loss); evaluation: mean over batches. Masses: mean over batches."""
        out = {}
        world = getattr(trainer.args, "world_size", 1)

        def mean_over_ranks(t):
            t = torch.as_tensor(t, dtype=torch.float32, device=trainer.args.device).reshape(1)
            if world > 1:
                t = trainer.accelerator.gather(t).mean()
            return float(t.sum())

        for k in _COMPONENTS:
            total = mean_over_ranks(self.sums[k])
            out[prefix + k] = total / (sum_steps if sum_steps is not None else self.n)
        for k in _MASSES:
            cnt = mean_over_ranks(self.sums[k + "_n"])
            if cnt > 0:
                out[prefix + k] = mean_over_ranks(self.sums[k]) / cnt
        out = {k: v for k, v in out.items() if math.isfinite(v)}
        self.reset()
        return out


__all__ = ["DFTTrainer", "DFTTrainerMixin"]
