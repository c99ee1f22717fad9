"""Online teacher for the Trainer (docs/design.md sec. 11): the teacher runs in eval mode
under no_grad; its last hidden states are captured at its lm_head like the student's and
turned into top-k targets (``DFTConfig(teacher="topk")``) or fed, with the student's, to
the dense two-head loss (``teacher="dense"``). Both heads are read by
:func:`dft_kernels.lm_head.resolve_head`: a low-rank correction (a PEFT LoRA or
``modules_to_save`` lm_head, a style head) goes to the fused calls as ``lora_A`` /
``lora_B`` (the teacher's without dropout), so the student's adapter trains in dense mode
too; a head the fused path cannot read (quantised, offloaded) is refused."""
from __future__ import annotations

import torch

from ..distill import fused_linear_distill_loss, teacher_topk
from ..lm_head import Fallback, HeadParts, logit_transforms, resolve_head, run_capturing_hidden
from .patch import _unwrap, mask_padding

TEACHER_MODES = ("offline", "topk", "dense")


def capture_last_hidden(model, **inputs):
    """Run ``model(**inputs)`` with its lm_head fed one row only and return
    ``(output, hidden [B, T, D])``: the last hidden states, never the logits."""
    head = (model.module if hasattr(model, "module") else model).get_output_embeddings()     # DDP-wrapped or not
    return run_capturing_hidden(lambda: model(**inputs), head, who=type(model).__name__,
                                fix="the online teacher needs a causal LM that applies its lm_head once")


def _head_name(model, head) -> str:
    """The module name of ``head`` inside ``model`` (e.g. "lm_head"), for error messages."""
    for name, module in model.named_modules():
        if module is head:
            return name or type(head).__name__
    return type(head).__name__


def head_parts(model, role: str, mode: str) -> HeadParts:
    """``model``'s output embeddings as the fused calls take them (:func:`resolve_head`);
    ValueError naming the module, what it is and the fix when the fused path cannot read
    them (a quantised or offloaded head, another wrapper). ``role``: "teacher_model's" or
    "the student's", for the messages."""
    head = model.get_output_embeddings()
    parts = resolve_head(head, who=f"DFTConfig(teacher={mode!r})")
    if isinstance(parts, Fallback):
        raise ValueError(f"{role} output embeddings {_head_name(model, head)!r} are {parts.reason}: the online teacher "
                         f"(teacher={mode!r}) projects the last hidden states with the head's weight (never the "
                         f"[N, V] logits) and cannot compute this head. Fix: {parts.fix}")
    return parts


def _vocab_rows(head) -> int | None:
    """The vocab size of an output embedding whatever it is (its weight's rows), or None."""
    try:
        parts = resolve_head(head)
    except ValueError:
        parts = None
    w = parts.weight if isinstance(parts, HeadParts) else getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def check_teacher_and_student(teacher, student, mode: str) -> None:
    """Refuse (ValueError) what the online teacher would get wrong, before anything runs:
    the student itself (or a model sharing its parameters) as the teacher, a teacher lm_head the
    fused path cannot read (:func:`head_parts`: quantised, offloaded, another wrapper), in
    ``mode="dense"`` such a student lm_head, and different vocab sizes. A low-rank correction
    (PEFT LoRA, ``modules_to_save``, a style head) on either head is computed, not refused."""
    if not isinstance(teacher, torch.nn.Module) or not callable(getattr(teacher, "get_output_embeddings", None)):
        raise TypeError(f"teacher_model must be a Hugging Face causal LM, got {type(teacher).__name__}")
    s_model, t_model = _unwrap(student), _unwrap(teacher)
    if teacher is student or s_model is t_model:
        raise ValueError("teacher_model is the student model itself: the teacher would be frozen and put in eval "
                         "mode with the student, and would change as the student trains. Pass a separate teacher "
                         "(e.g. teacher_model=copy.deepcopy(model) before training, or load it again)")
    s_params = {id(p) for p in s_model.parameters()}
    shared = [n for n, p in t_model.named_parameters() if id(p) in s_params]
    if shared:
        raise ValueError(f"teacher_model shares {len(shared)} parameter(s) with the student (e.g. {shared[0]!r}; "
                         "a PEFT student wraps its base model in place): the teacher would be frozen with the student "
                         "and run the student's adapters. Pass a separate teacher (e.g. teacher_model="
                         "copy.deepcopy(model) before wrapping it, or load it again)")
    v_t = head_parts(t_model, "teacher_model's", mode).weight.shape[0]
    if mode == "dense":
        v_s = head_parts(s_model, "the student's", mode).weight.shape[0]
    else:       # topk: the student's loss is the patch's, which reads its head (or falls back to its logits)
        v_s = _vocab_rows(s_model.get_output_embeddings())
        if v_s is None:
            return                                      # no lm_head weight: the patch says so
    if v_t != v_s:
        raise ValueError(f"teacher_model has a vocab of {v_t} (its lm_head rows), the student {v_s}: the teacher's "
                         "ids and the student's would not be the same tokens (and a student id past the teacher's "
                         "vocab cannot be embedded). Use a teacher that shares the student's tokenizer, padded to "
                         "one vocab size (model.resize_token_embeddings(n) on the smaller one)")


class OnlineTeacher:
    """A frozen teacher that produces targets or hidden states per batch.

    Args:
        model: a Hugging Face causal LM; put in eval mode, its parameters frozen. Placed on
            ``device`` unless it has its own ``hf_device_map``.
        mode: "topk" or "dense"; k: slots of the top-k targets; temperature: of the targets.
    """

    def __init__(self, model, mode: str, k: int, temperature: float, device=None):
        if mode not in TEACHER_MODES[1:]:
            raise ValueError(f"teacher={mode!r}: an online teacher needs DFTConfig(teacher='topk' or 'dense')")
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
            raise TypeError(f"teacher_model must be a Hugging Face causal LM, got {type(model).__name__}")
        self.model, self.mode, self.k, self.temperature = model.eval(), mode, int(k), float(temperature)
        for p in model.parameters():
            p.requires_grad_(False)
        if device is not None and getattr(model, "hf_device_map", None) is None:
            model.to(device)
        softcap, scale, _ = logit_transforms(model)        # read and checked once
        if isinstance(scale, torch.Tensor):
            scale = float(scale)
        self.softcap, self.scale = softcap, float(scale)

    @torch.no_grad()
    def hidden(self, inputs: dict) -> torch.Tensor:
        """The teacher's last hidden states [B, T, D_t] for the batch's ``input_ids``."""
        emb = self.model.get_input_embeddings().weight.device
        # the student's positions too (position_ids: packed or left-padded batches)
        kw = {n: inputs[n].to(emb) for n in ("input_ids", "attention_mask", "position_ids")
              if inputs.get(n) is not None}
        self.model.eval()
        _, h = capture_last_hidden(self.model, use_cache=False, **kw)
        return h

    def targets(self, inputs: dict, device) -> dict:
        """``inputs`` with ``target_index`` / ``target_logprobs`` [B, T, k] from the teacher."""
        parts = head_parts(self.model, "teacher_model's", self.mode)     # a low-rank correction included
        h = self.hidden(inputs).to(parts.weight.device)
        t = teacher_topk(h, parts.weight, self.k, bias=parts.bias, temperature=self.temperature, softcap=self.softcap,
                         logit_scale=self.scale, **parts.lora_kwargs(dropout=False))     # eval: no dropout
        return {**inputs, "target_index": t.index.to(device), "target_logprobs": t.logprobs.to(device)}

    def dense_loss(self, student, inputs: dict, num_items_in_batch, loss_kwargs: dict):
        """The dense two-head loss of the batch: (loss, student output, components)."""
        t_parts = head_parts(self.model, "teacher_model's", self.mode)
        h_t = self.hidden(inputs)
        labels = inputs.get("labels")
        ignore = loss_kwargs.get("ignore_index", -100)
        fwd = {n: v for n, v in inputs.items() if n not in ("labels", "target_index", "target_logprobs")}
        s_model = student.module if hasattr(student, "module") else student      # DDP
        head = s_model.get_output_embeddings()
        parts = head_parts(s_model, "the student's", self.mode)    # a LoRA / style head: its adapter trains
        softcap, scale, _ = logit_transforms(s_model)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:] if labels is not None else None
        shifted, _ = mask_padding(inputs.get("attention_mask"), shifted, None, ignore)   # left padding too
        keys = ("divergence", "beta", "lam", "accuracy", "ignore_index", "impl", "strategy", "memory_budget")
        hidden, result = [], []

        def take_hidden(module, args, kwargs):       # runs before run_capturing_hidden's hook cuts the input
            hidden.append(args[0] if args else kwargs["input"])

        def put_loss(module, args, output):
            # the loss is computed inside the student's forward and returned in its output: DDP with
            # find_unused_parameters=True (the Trainer's default) marks every parameter the output
            # does not reach as unused, and would fail in backward ("marked as ready twice")
            h = hidden[-1]
            w_t = t_parts.weight.to(h.device)
            t_lora = {k: v.to(h.device) if isinstance(v, torch.Tensor) else v
                      for k, v in t_parts.lora_kwargs("teacher_", dropout=False).items()}
            comps = fused_linear_distill_loss(
                h, parts.weight, h_t.to(h.device), w_t,
                None if shifted is None else shifted.to(h.device), bias=parts.bias,
                teacher_bias=None if t_parts.bias is None else t_parts.bias.to(h.device),
                temperature=self.temperature, softcap=softcap, teacher_softcap=self.softcap,
                logit_scale=float(scale), teacher_logit_scale=self.scale, num_items_in_batch=num_items_in_batch,
                return_components=True, **parts.lora_kwargs(), **t_lora,
                **{k: v for k, v in loss_kwargs.items() if k in keys})
            result.append(comps)
            if isinstance(output, dict):
                output["loss"] = comps.loss
            return output

        handles = [head.register_forward_pre_hook(take_hidden, with_kwargs=True),
                   s_model.register_forward_hook(put_loss)]
        try:
            out, _ = capture_last_hidden(student, **{"use_cache": False, **fwd})
        finally:
            for handle in handles:
                handle.remove()
        return result[-1].loss, out, result[-1]
