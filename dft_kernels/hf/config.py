"""``DFTConfig``: every DFT option of the Hugging Face integration in one place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..options import LOSS_DEFAULTS, STRATEGY_DEFAULTS, check_options, check_strategy

#: fields of DFTConfig that are not keywords of the loss functions
_ADAPTER_FIELDS = ("skip_logits", "check", "log_components", "teacher", "k")


@dataclass
class DFTConfig:
    """Options of the DFT loss (docs/design.md sec. 3-5) and of the adapter.

    Loss options -- ``lam``, ``divergence``, ``beta``, ``tail``, ``accuracy``,
    ``temperature``, ``ignore_index``, ``impl``, ``validate``, ``chunk_elems``, ``strategy``,
    ``memory_budget`` -- mean what they mean in :func:`dft_kernels.fused_linear_dft_loss`, with its defaults
    (``options.LOSS_DEFAULTS``). The softcap is not an option: it comes from the
    model (``final_logit_softcapping``).

    Adapter options:

    - ``skip_logits``: ``None`` (default) computes the loss with the fused
      linear path and returns ``logits=None`` in training mode, and from the
      model's own logits in eval mode; ``True`` / ``False`` force one of the two.
    - ``check``: on the first fused call, compare one row of the model's own
      logits with what the fused loss sees, and raise if the model transforms
      its logits in a way the adapter does not reproduce.
    - ``log_components``: :class:`~dft_kernels.hf.DFTTrainer` logs the
      divergence and accuracy terms separately.
    - ``teacher``: "offline" (targets in the batches), or with ``DFTTrainer(...,
      teacher_model=m)`` "topk" (the live teacher's top-``k`` targets) or "dense" (the
      full-vocab two-head loss, :func:`dft_kernels.fused_linear_distill_loss`);
      docs/design.md sec. 11. Both read the heads as the patch does: a low-rank lm_head (PEFT
      LoRA, ``modules_to_save``, a style head) on the teacher or the student is computed; a
      head the fused path cannot read (quantised, offloaded) is refused on the teacher and,
      with "dense", on the student ("topk" falls back to the student's own logits).
    """

    lam: float = LOSS_DEFAULTS["lam"]
    divergence: str = LOSS_DEFAULTS["divergence"]
    beta: float = LOSS_DEFAULTS["beta"]
    tail: str = LOSS_DEFAULTS["tail"]
    accuracy: str = LOSS_DEFAULTS["accuracy"]
    temperature: float = LOSS_DEFAULTS["temperature"]
    ignore_index: int = LOSS_DEFAULTS["ignore_index"]
    impl: str = LOSS_DEFAULTS["impl"]
    validate: bool = LOSS_DEFAULTS["validate"]
    chunk_elems: int | None = None
    strategy: str = STRATEGY_DEFAULTS["strategy"]
    memory_budget: int = STRATEGY_DEFAULTS["memory_budget"]
    skip_logits: bool | None = None
    check: bool = True
    log_components: bool = True
    teacher: str = "offline"
    k: int = 32

    def __post_init__(self):
        check_options(lam=self.lam, divergence=self.divergence, beta=self.beta, tail=self.tail,
                      accuracy=self.accuracy, temperature=self.temperature, softcap=None,
                      reduction="mean", impl=self.impl)
        check_strategy(self.strategy, self.memory_budget)
        if self.teacher not in ("offline", "topk", "dense"):
            raise ValueError(f"teacher={self.teacher!r} must be 'offline', 'topk' or 'dense'")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r} must be an int >= 1 (teacher slots per position)")
        if self.skip_logits not in (None, True, False):
            raise ValueError(f"skip_logits={self.skip_logits!r} must be None (auto), True or False")

    def loss_kwargs(self) -> dict:
        """The keywords of :func:`dft_kernels.fused_linear_dft_loss` this config sets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _ADAPTER_FIELDS}

    def patch_kwargs(self) -> dict:
        """The keywords of :func:`dft_kernels.hf.patch` this config sets."""
        return {**self.loss_kwargs(), "skip_logits": self.skip_logits, "check": self.check}
