"""Online teacher for the Trainer (docs/design.md sec. 11): the teacher runs in eval mode
under no_grad; its last hidden states are captured at its lm_head like the student's and
turned into top-k targets (``DFTConfig(teacher="topk")``) or fed, with the student's, to
the dense two-head loss (``teacher="dense"``)."""
from __future__ import annotations

import torch

from ..distill import fused_linear_distill_loss, teacher_topk
from ..lm_head import logit_transforms, run_capturing_hidden
from .patch import _is_plain_linear, _unwrap, mask_padding

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


def _wrapped_head(model):
    """``(name, description, fix)`` of ``model``'s output embeddings when they are not a plain
    ``nn.Linear`` (a PEFT adapter layer such as LoRA on the lm_head, a quantised layer), else None:
    the online paths project with ``head.weight`` and would use the base head without the wrapper."""
    head = model.get_output_embeddings()
    if head is None or _is_plain_linear(head):
        return None
    cls = type(head)
    if cls.__module__.startswith("peft"):
        return (_head_name(model, head), f"a PEFT adapter layer ({cls.__module__}.{cls.__name__})",
                "merge the adapter into the weights first: teacher_model = teacher_model.merge_and_unload()")
    if isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.device.type == "meta":
        what = "an lm_head whose weight is not materialised (offloaded: on the meta device)"
    else:
        what = f"a {cls.__name__}, not a plain nn.Linear"
    return _head_name(model, head), what, "load the teacher with a plain, materialised lm_head (not wrapped, " \
                                          "quantised or offloaded), or build its targets offline (targets build)"


def check_teacher_and_student(teacher, student, mode: str) -> None:
    """Refuse (ValueError) what the online teacher would get wrong, before anything runs:
    the student itself (or a model sharing its parameters) as the teacher, a teacher whose lm_head
    is wrapped (a LoRA adapter on it would be ignored), in ``mode="dense"`` a wrapped student lm_head
    (the loss would use its base weight, the adapter would get no gradient), and different vocab sizes."""
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
    wrapped = _wrapped_head(t_model)
    if wrapped is not None:
        name, what, fix = wrapped
        raise ValueError(f"teacher_model's output embeddings {name!r} are {what}: the online teacher "
                         f"(teacher={mode!r}) projects its last hidden states with the head's base weight, so "
                         f"whatever the wrapper adds would be ignored. Fix: {fix}")
    if mode == "dense":
        wrapped = _wrapped_head(s_model)
        if wrapped is not None:
            name, what, _ = wrapped
            raise ValueError(f"the student's output embeddings {name!r} are {what}: DFTConfig(teacher='dense') "
                             "projects with the head's base weight, so the loss would use the base head and what "
                             "the wrapper adds (a LoRA adapter) would get no gradient. Do not put LoRA on the "
                             "lm_head (drop it from target_modules), or use teacher='topk' or offline targets, "
                             "whose loss is computed from the model's own logits")
    heads = (t_model.get_output_embeddings(), s_model.get_output_embeddings())
    if not all(isinstance(getattr(h, "weight", None), torch.Tensor) for h in heads):
        return                                          # no lm_head weight: OnlineTeacher / patch say so
    v_t, v_s = (h.weight.shape[0] for h in heads)
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
        head = self.model.get_output_embeddings()
        h = self.hidden(inputs).to(head.weight.device)
        t = teacher_topk(h, head.weight, self.k, bias=head.bias, temperature=self.temperature, softcap=self.softcap,
                         logit_scale=self.scale)
        return {**inputs, "target_index": t.index.to(device), "target_logprobs": t.logprobs.to(device)}

    def dense_loss(self, student, inputs: dict, num_items_in_batch, loss_kwargs: dict):
        """The dense two-head loss of the batch: (loss, student output, components)."""
        head_t = self.model.get_output_embeddings()
        h_t = self.hidden(inputs)
        labels = inputs.get("labels")
        ignore = loss_kwargs.get("ignore_index", -100)
        fwd = {n: v for n, v in inputs.items() if n not in ("labels", "target_index", "target_logprobs")}
        s_model = student.module if hasattr(student, "module") else student      # DDP
        head = s_model.get_output_embeddings()
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
            comps = fused_linear_distill_loss(
                h, head.weight, h_t.to(h.device), head_t.weight.to(h.device),
                None if shifted is None else shifted.to(h.device), bias=head.bias,
                teacher_bias=None if head_t.bias is None else head_t.bias.to(h.device),
                temperature=self.temperature, softcap=softcap, teacher_softcap=self.softcap,
                logit_scale=float(scale), teacher_logit_scale=self.scale, num_items_in_batch=num_items_in_batch,
                return_components=True, **{k: v for k, v in loss_kwargs.items() if k in keys})
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
