"""Join tokenized examples with targets stored by ``dk.targets.build``.

``DFTTargetsDataset`` is a map-style torch Dataset: item i is example i with its
teacher targets, read from the shard that holds it (memory-mapped, only the rows of
that example). Pad the items with ``dk.hf.DFTDataCollator``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import targets as _t
from .validation import validate_target_data

ITEM_KEYS = ("input_ids", "attention_mask", "labels", "target_index", "target_logprobs")


def _ids(example, i: int) -> torch.Tensor:
    if not hasattr(example, "__getitem__") or "input_ids" not in example:
        raise TypeError(f"examples[{i}] must be a dict with 'input_ids' (and optionally 'labels'), "
                        f"got {type(example).__name__}")
    x = example["input_ids"]
    if isinstance(x, (list, tuple)) and len(x) == 0:
        return torch.empty(0, dtype=torch.long)
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"examples[{i}]['input_ids'] must be a 1-D sequence of token ids (one unpadded "
                        f"example), got shape {tuple(t.shape)} dtype {t.dtype}")
    return t.to(torch.long)


class DFTTargetsDataset(torch.utils.data.Dataset):
    """Tokenized ``examples`` joined with the targets in ``targets_dir``.

    ``examples``: a sequence (len + indexing; a list or a ``datasets.Dataset``) of
    dicts with ``input_ids`` (one unpadded sequence) and optionally ``labels``, in
    the order the targets were built from. ``vocab_size``: the student's vocab; a
    manifest ``vocab_size`` larger than it raises ValueError up front, and so does a
    ``tokenizer`` (the student's) whose :func:`~dft_kernels.targets.fingerprint_tokenizer`
    differs from the manifest's ``tokenizer_fingerprint``.

    On construction the manifest is read, every shard's header is checked (a
    truncated or corrupted file raises ValueError naming it) and the sha256 of each
    shard's examples' input_ids is compared with the one the shard stores (a
    mismatch raises ValueError naming the shard file and the first example that
    differs). ``verify="full"`` also reads every shard whole and checks the stored
    hash of its index / log-probs. Every item's targets are checked on CPU (ids in
    [-1, vocab), log-probs <= 0, top-K mass <= 1 + 1e-3: logits or probabilities
    raise ValueError naming the example); docs/design.md sec. 7.

    Items are dicts with exactly the keys ``input_ids`` (LongTensor [T]),
    ``attention_mask`` (ones [T]), ``labels`` ([T], = input_ids unless the example
    has labels), ``target_index`` (IntTensor [T, K]) and ``target_logprobs``
    (float32 [T, K]); row t of the targets is the teacher's distribution for the
    token after position t (docs/design.md sec. 2)."""

    def __init__(self, examples, targets_dir, vocab_size: int | None = None, *, verify: str = "ids",
                 tokenizer=None):
        if verify not in ("ids", "full"):
            raise ValueError(f"verify={verify!r} must be 'ids' (headers + input_ids hash) or 'full' "
                             "(also the hash of every shard's data)")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size={vocab_size!r} must be None or a positive int (the student's vocab)")
        if not hasattr(examples, "__len__") or not hasattr(examples, "__getitem__"):
            raise TypeError("examples must be a sequence of dicts with 'input_ids' (a list or a datasets.Dataset)")
        self.examples = examples
        self.targets_dir = Path(targets_dir)
        self.vocab_size = vocab_size
        man = _t.read_manifest(self.targets_dir)
        self.manifest = man
        if not man.get("complete"):
            raise ValueError(f"the build in {str(self.targets_dir)!r} is incomplete (interrupted?): re-run the "
                             "same build to finish it (finished shards are kept)")
        if man.get("n_sequences") != len(examples):
            raise ValueError(f"examples has {len(examples)} examples but the targets in "
                             f"{str(self.targets_dir)!r} were built for {man.get('n_sequences')} sequences: "
                             "pass the examples the targets were built from, in the same order")
        self._check_student(man, vocab_size, tokenizer)
        self.k = int(man["k"])
        self._loc: list[tuple[int, int, int]] = []   # example -> (shard, first row, length)
        self._paths: list[Path] = []
        for s, entry in enumerate(man["shards"]):
            path = self.targets_dir / entry["file"]
            self._paths.append(path)
            handle, meta = _t.read_header(path)
            try:
                shapes = {n: handle.get_slice(n).get_shape() for n in ("index", "logprobs", "input_ids", "lengths")}
            except Exception as e:  # noqa: BLE001 - a missing tensor or a bad header
                raise _missing_tensors(path, handle) or _t.shard_error(path, str(e)) from None
            _t.check_shard_k(path, meta.get("k"), self.k)
            n_pos, n_seq = meta.get("n_positions"), meta.get("n_sequences")
            if shapes["index"] != [n_pos, self.k] or shapes["logprobs"] != [n_pos, self.k] \
                    or shapes["input_ids"] != [n_pos] or shapes["lengths"] != [n_seq]:
                raise _t.shard_error(path, "tensor shapes disagree with its metadata")
            if meta.get("input_ids_sha256") != entry.get("input_ids_sha256") or meta.get("k") != self.k:
                raise _t.shard_error(path, "its metadata disagrees with manifest.json")
            first = entry["first_sequence"]
            if first != len(self._loc):
                raise ValueError(f"{str(self.targets_dir / _t.MANIFEST)!r} lists {entry['file']} at sequence "
                                 f"{first}, expected {len(self._loc)}: re-run the build")
            seqs = [_ids(examples[first + j], first + j) for j in range(n_seq)]
            if verify == "full":
                _t.read_shard(path, check_data=True)
            if _t.input_ids_sha256(seqs) != meta.get("input_ids_sha256"):
                self._explain_mismatch(path, first, seqs)
            row = 0
            for x in seqs:
                self._loc.append((s, row, len(x)))
                row += len(x)
        self._handles: dict[int, object] = {}

    def _check_student(self, man: dict, vocab_size, tokenizer) -> None:
        """The targets' vocab and tokenizer against the student's, before any item is read."""
        where = str(self.targets_dir)
        built = man.get("vocab_size")
        if vocab_size is not None and isinstance(built, int) and built > vocab_size:
            raise ValueError(f"the targets in {where!r} were built by a teacher with vocab_size={built}, the student "
                             f"has vocab_size={vocab_size}: the teacher's ids do not fit the student. Build targets "
                             "with a teacher that shares the student's tokenizer")
        if tokenizer is not None:
            recorded = man.get("tokenizer_fingerprint")
            if recorded is None:
                raise ValueError(f"tokenizer= was given but the targets in {where!r} record no tokenizer "
                                 "fingerprint (built without one): rebuild them with tokenizer=, or drop tokenizer=")
            if _t.fingerprint_tokenizer(tokenizer) != recorded:
                raise ValueError(f"the tokenizer differs from the one the targets in {where!r} were built with (its "
                                 "token -> id map): the teacher's ids would mean other tokens. Use the teacher's "
                                 "tokenizer, or rebuild the targets")

    def _explain_mismatch(self, path: Path, first: int, seqs) -> None:
        tensors, _ = _t.read_shard(path, check_data=False)
        stored = torch.split(tensors["input_ids"], tensors["lengths"].tolist())
        for j, (a, b) in enumerate(zip(seqs, stored)):
            if not torch.equal(a, b.long()):
                raise ValueError(
                    f"example {first + j} (input_ids of length {len(a)}) does not match sequence {j} of "
                    f"{str(path)!r} (length {len(b)}): the targets were built from other data or another "
                    "tokenization/order; rebuild the targets for these examples")
        raise ValueError(f"the examples {first}..{first + len(seqs) - 1} do not match the input_ids hash of "
                         f"{str(path)!r}: rebuild the targets for these examples")

    def __len__(self) -> int:
        return len(self._loc)

    def as_hf_dataset(self):
        """This dataset as a ``datasets.IterableDataset`` (what TRL's SFTTrainer takes),
        reading one item at a time: nothing is loaded up front.

        Returns:
            a ``datasets.IterableDataset`` of the items as lists: ``input_ids``,
            ``attention_mask``, ``labels`` [T] (int64), ``target_index`` [T, K] (int32),
            ``target_logprobs`` [T, K] (float32). It has no length: give the trainer
            ``max_steps``."""
        import datasets
        seq = datasets.Sequence
        features = datasets.Features({
            "input_ids": seq(datasets.Value("int64")), "attention_mask": seq(datasets.Value("int64")),
            "labels": seq(datasets.Value("int64")), "target_index": seq(seq(datasets.Value("int32"))),
            "target_logprobs": seq(seq(datasets.Value("float32")))})
        return datasets.IterableDataset.from_generator(_items_as_lists, features=features,
                                                       gen_kwargs={"dataset": self})

    def __getstate__(self):  # file handles do not cross process boundaries (DataLoader workers)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, s: int):
        h = self._handles.get(s)
        if h is None:
            h, _ = _t.read_header(self._paths[s])
            self._handles[s] = h
        return h

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not isinstance(i, int) and not (isinstance(i, torch.Tensor) and i.dim() == 0):
            raise TypeError(f"DFTTargetsDataset indices are ints, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        s, row, n = self._loc[i]
        ex = self.examples[i]
        input_ids = _ids(ex, i)
        h = self._handle(s)
        try:
            index = h.get_slice("index")[row:row + n]
            logprobs = h.get_slice("logprobs")[row:row + n]
        except Exception as e:  # noqa: BLE001
            raise _t.shard_error(self._paths[s], str(e)) from None
        try:  # cheap on CPU, every item: ids in range, log-probs <= 0, mass <= 1 + 1e-3
            validate_target_data(index, logprobs, self.vocab_size or self.manifest.get("vocab_size"))
        except ValueError as e:
            raise ValueError(f"example {i} ({self._paths[s].name}): {e}") from None
        labels = ex["labels"] if "labels" in ex and ex["labels"] is not None else None
        if labels is None:
            labels = input_ids.clone()
        else:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != input_ids.shape:
                raise ValueError(f"examples[{i}]['labels'] has shape {tuple(labels.shape)}, input_ids "
                                 f"{tuple(input_ids.shape)}: they must match (unshifted, HF convention)")
        return {"input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": labels,
                "target_index": index.to(torch.int32),
                "target_logprobs": logprobs.to(torch.float32)}


def _missing_tensors(path: Path, handle) -> ValueError | None:
    """A clear error for a safetensors file that is not a build shard, else None."""
    try:
        missing = [n for n in ("index", "logprobs", "input_ids", "lengths") if n not in set(handle.keys())]
    except Exception:  # noqa: BLE001
        return None
    if not missing:
        return None
    return ValueError(f"{str(path)!r} is not a build shard: it lacks the tensors {missing} (a file written by "
                      "SparseTargets.save holds index / logprobs only). A dataset directory needs shards with the "
                      "input_ids they were computed for: blend build directories with `dft-kernels targets blend`, or "
                      "build them with dk.targets.build")


def _items_as_lists(dataset):
    for i in range(len(dataset)):
        yield {k: v.tolist() for k, v in dataset[i].items()}
