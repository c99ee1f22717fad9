"""``dft-kernels plan``: the memory of one training step for a model config and a GPU.

Assumptions (printed with the result): weights and gradients in the model dtype
(bf16 by default), optimizer state in fp32 (AdamW 8 bytes / trained parameter,
8-bit AdamW 2, plain SGD 0) updating those weights directly -- no fp32 master copy
unless ``master_weights`` (``--master-weights``: +4 bytes / trained parameter, the
usual mixed-precision layout); flash attention (no [T, T] scores stored), the loss
path from the library's own memory model (``dft_kernels.memory.loss_extra_bytes``).
Activations are an estimate (the tensors a Llama-style decoder layer keeps for its
backward), not a measurement.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..memory import loss_extra_bytes
from .inputs import UsageError

GiB = 2 ** 30
#: built-in configs (the fields of their Hugging Face config.json that the plan reads)
NAMED_CONFIGS = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "mistral-7b": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "gemma-2-2b": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True),
}
GPUS = {"a100-40gb": 40 * 10 ** 9, "a100-80gb": 80 * 10 ** 9, "h100-80gb": 80 * 10 ** 9, "h200": 141 * 10 ** 9}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd": 0}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def load_config(model: str, flag: str = "--model") -> dict:
    """A named config (case-insensitive) or a Hugging Face ``config.json`` path (or its
    directory); ``flag`` names the argument in errors."""
    if model.lower() in NAMED_CONFIGS:
        return dict(NAMED_CONFIGS[model.lower()], name=model)
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UsageError(f"{flag} {model!r} is neither a config.json nor a known name "
                         f"({', '.join(NAMED_CONFIGS)})")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {p} is not JSON ({e})") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else cfg
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if not isinstance(cfg.get(k), int)] if isinstance(cfg, dict) else list(need)
    if missing:
        raise UsageError(f"{flag} {p} lacks {', '.join(missing)}: give a decoder-only model's config.json")
    return dict(cfg, name=str(p))


def _params(cfg: dict) -> tuple[int, list]:
    """``(parameters, one decoder layer's linears as (in, out): q, k, v, o, gate, up, down)``."""
    V, D, I, L = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or D // H
    kv = (cfg.get("num_key_value_heads") or H) * hd
    q = H * hd
    layer_linears = [(D, q), (D, kv), (D, kv), (q, D), (D, I), (D, I), (I, D)]   # (in, out)
    per_layer = sum(i * o for i, o in layer_linears) + 2 * D
    head = 0 if cfg.get("tie_word_embeddings") else V * D
    return L * per_layer + V * D + head + D, layer_linears


def memory_plan(cfg: dict, *, tokens: int, k: int = 32, lora: int | None = None, optimizer: str = "adamw",
                grad_ckpt: bool = False, gpu: str = "a100-80gb", dtype: str = "bf16",
                master_weights: bool = False, kernels: str = "triton", teacher: dict | None = None,
                divergence: str = "forward_kl") -> dict:
    """Bytes of one training step.

    Args:
        cfg: model config fields (see :data:`NAMED_CONFIGS`). tokens: N, tokens per step (batch * length).
        k: teacher slots per position (0: plain cross-entropy). lora: LoRA rank on every linear of the decoder layers
            (None: full fine-tune; with LoRA the base and the lm_head are frozen).
        optimizer: "adamw", "adamw8bit" or "sgd". grad_ckpt: checkpoint every decoder layer.
        gpu: a key of :data:`GPUS`. dtype: weights / activations dtype, "bf16", "fp16" or "fp32".
        master_weights: an fp32 master copy of the trained weights next to the optimizer
            state (mixed precision); nothing extra with ``dtype="fp32"``.
        kernels: the loss path's kernels, "triton" (a GPU) or "torch" (the chunked PyTorch
            path: the CPU, ``impl="torch"``); see ``memory.loss_extra_bytes``.
        teacher: the config of an online teacher (dense distillation over the full vocab,
            ``fused_linear_distill_loss``; ``k`` is then not used): its weights are added
            (frozen, no gradients or optimizer state; its activations run without grad and
            are not kept), the loss path is the two-head model with the teacher's hidden size.
        divergence: the dense loss's divergence ("forward_kl", "reverse_kl", "jsd").
    Returns:
        dict: parameter counts, bytes per part (weights, gradients, optimizer, activations with
        and without checkpointing, the loss path naive / lean / fast), totals per loss path,
        the GPU bytes, ``fits`` and ``advice``.
    """
    if teacher is not None and teacher["vocab_size"] != cfg["vocab_size"]:
        raise UsageError(f"--teacher's vocab size {teacher['vocab_size']} differs from --model's "
                         f"{cfg['vocab_size']}: dense distillation needs one shared vocab")
    if teacher is None and k > cfg["vocab_size"]:
        raise UsageError(f"--k {k} is larger than the vocab size {cfg['vocab_size']} of --model")
    e = DTYPE_BYTES[dtype]
    V, D, I, L = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    params, layer_linears = _params(cfg)
    q, kv = layer_linears[0][1], layer_linears[1][1]      # the q and k projections' widths
    trained = L * sum(lora * (i + o) for i, o in layer_linears) if lora else params
    teacher_params = _params(teacher)[0] if teacher is not None else 0
    weights = params * e + (trained * e if lora else 0) + teacher_params * e
    grads = trained * e
    master = 4 if master_weights and e != 4 else 0
    optim = trained * (OPTIMIZER_BYTES[optimizer] + master)
    # kept for the backward per token per layer: 2 norm inputs + 2 normed, q / k / v, attention out,
    # gate / up / act / act*up (flash attention: no [T, T] scores)
    act_layer = (4 * D + q + 2 * kv + q + 4 * I) * e
    act_full = tokens * L * act_layer + tokens * D * e
    act_ckpt = tokens * L * D * e + tokens * act_layer + tokens * D * e
    act = act_ckpt if grad_ckpt else act_full
    dense = dict(teacher_hidden=teacher["hidden_size"], divergence=divergence) if teacher is not None else {}
    loss = {s: loss_extra_bytes(s, n_rows=tokens, hidden=D, vocab=V, k=0 if teacher is not None else k,
                                dtype_bytes=e, head_trains=not lora, kernels=kernels, **dense)
            for s in ("naive", "lean", "fast")}
    base = weights + grads + optim + act
    total = {s: base + b for s, b in loss.items()}
    cap = GPUS[gpu]
    fits = {s: t <= cap for s, t in total.items()}
    advice = []
    if not fits["lean"]:
        if not grad_ckpt and act_ckpt < act_full:
            advice.append(f"--grad-ckpt saves {(act_full - act_ckpt) / GiB:.1f} GiB of activations")
        if not lora:
            advice.append("--lora 16 trains adapters only (no full gradients / optimizer state)")
        if optimizer == "adamw":
            advice.append(f"--optimizer adamw8bit saves {trained * 6 / GiB:.1f} GiB")
        if master:
            advice.append(f"without --master-weights (pure {dtype} training) saves {trained * 4 / GiB:.1f} GiB")
        advice.append(f"fewer --tokens per step (now {tokens}; use gradient accumulation)")
    elif not fits["naive"]:
        advice.append("fits with dft_kernels' fused loss (lean / fast) but not with materialised logits")
    return {"model": cfg.get("name"), "tokens": tokens, "k": k if teacher is None else None, "lora": lora,
            "optimizer": optimizer,
            "kernels": kernels, "teacher": None if teacher is None else teacher.get("name"),
            "teacher_params": teacher_params, "divergence": divergence if teacher is not None else None,
            "master_weights": bool(master), "optimizer_bytes_per_param": OPTIMIZER_BYTES[optimizer] + master,
            "grad_ckpt": grad_ckpt, "dtype": dtype, "gpu": gpu, "gpu_bytes": cap, "params": params,
            "trained_params": trained,
            "bytes": {"weights": weights, "gradients": grads, "optimizer": optim, "activations": act,
                      "activations_no_ckpt": act_full, "activations_ckpt": act_ckpt},
            "loss_path": loss, "total": total, "fits": fits, "advice": advice}


def count(n: int) -> str:
    """A parameter count in the unit that suits it: 8.03 B, 125.4 M, 46.1 K, 512."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size >= 100 else f"{n / size:.2f} {unit}"
    return str(n)


def optimizer_layout(p: dict) -> str:
    """The optimizer-state layout the plan assumes, and the other one's flag."""
    base = {"adamw": "AdamW m + v in fp32", "adamw8bit": "8-bit AdamW m + v", "sgd": "plain SGD (no state)"}
    text = f"{base[p['optimizer']]}, {p.get('optimizer_bytes_per_param', 0)} B per trained parameter"
    if p["dtype"] == "fp32":
        return text + " (fp32 weights: no master copy needed)"
    if p.get("master_weights"):
        return text + f" incl. an fp32 master copy of the {p['dtype']} weights"
    return text + f", updating the {p['dtype']} weights directly (--master-weights: + an fp32 master copy, +4 B)"


def plan_text(p: dict) -> str:
    """The plan as a short table with a verdict per loss path."""
    def g(b):   # GiB for a real model, MiB / KiB for a small one (not "0.00 GiB")
        for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if b >= size or unit == "KiB":
                return f"{b / size:8.2f} {unit}"
    b = p["bytes"]
    k = f"K={p['k']}" if p["k"] else "K=0 (plain cross-entropy)"
    if p.get("teacher"):
        k = (f"dense {p['divergence']} from teacher {p['teacher']} ({count(p['teacher_params'])} parameters, "
             "frozen, in the weights)")
    lines = [f"model {p['model']}: {count(p['params'])} parameters, {count(p['trained_params'])} trained"
             f"{' (LoRA r=' + str(p['lora']) + ')' if p['lora'] else ''}; {p['tokens']} tokens/step, {k}, "
             f"{p['dtype']}, {p['optimizer']}{', grad checkpointing' if p['grad_ckpt'] else ''}",
             f"  weights          {g(b['weights'])}", f"  gradients        {g(b['gradients'])}",
             f"  optimizer state  {g(b['optimizer'])}   ({optimizer_layout(p)})",
             f"  activations      {g(b['activations'])}   (without checkpointing {g(b['activations_no_ckpt'])}, "
             f"with {g(b['activations_ckpt'])})"]
    lines.append(f"  (loss path: bytes beyond its inputs and returned gradients, {p.get('kernels', 'triton')} kernels)")
    for s in ("naive", "lean", "fast"):
        lines.append(f"  loss path {s:<6} {g(p['loss_path'][s])}   total {g(p['total'][s])}  -> "
                     f"{'fits' if p['fits'][s] else 'does not fit'} on {p['gpu']} ({p['gpu_bytes'] / GiB:.1f} GiB)")
    lines += [f"  to change: {a}" for a in p["advice"]]
    return "\n".join(lines)
