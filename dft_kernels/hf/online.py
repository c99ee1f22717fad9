"""Online teacher for the Trainer (docs/design.md sec. 11): the teacher runs in eval mode
under no_grad; its last hidden states are captured at its lm_head like the student's and
turned into top-k targets (``DFTConfig(teacher="topk")``) or fed, with the student's, to
the dense two-head loss (``teacher="dense"``)."""
from __future__ import annotations

import torch

from ..distill import fused_linear_distill_loss, teacher_topk
from .patch import run_capturing_hidden
from .transforms import logit_transforms

TEACHER_MODES = ("offline", "topk", "dense")


def capture_last_hidden(model, **inputs):
    """Run ``model(**inputs)`` with its lm_head fed one row only and return
    ``(output, hidden [B, T, D])``: the last hidden states, never the logits."""
    head = (model.module if hasattr(model, "module") else model).get_output_embeddings()     # DDP-wrapped or not
    return run_capturing_hidden(lambda: model(**inputs), head, who=type(model).__name__,
                                fix="the online teacher needs a causal LM that applies its lm_head once")


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
        kw = {n: inputs[n].to(emb) for n in ("input_ids", "attention_mask") if inputs.get(n) is not None}
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
