"""Background slot statistics: the IDF side of the TF-IDF slot ranking.

For every memory layer, df[i] = number of background documents in which slot i was accessed; an
access is one (token, head, top-k index) triple at a real (non-padding) position. The document unit
is a setting:
- "sequence": each background sequence (a text, cut to `seq_len` tokens) is one document;
- "batch": each batch of `batch_size` sequences is one document, as in the paper (|B| background
  batches). With a small memory most slots are read by some token of almost every batch, so per-batch
  df saturates (IDF ~ 0 for most slots) unless N is large; hence the default below.

Saved as `background.safetensors` beside the model: one int64 tensor per memory layer (`df.<layer>`)
and metadata (num_docs, unit, base_id = sha256 of the model's model.safetensors, seq_len, batch_size,
num_tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BACKGROUND_FILE = "background.safetensors"
UNITS = ("sequence", "batch")
DEFAULT_UNIT = "sequence"  # the benchmark may switch it; see the module docstring on saturation
DEFAULT_SEQ_LEN = 128  # the pretraining row length of the default model
DEFAULT_BATCH_SIZE = 16


@dataclass
class BackgroundStats:
    df: dict[int, torch.Tensor]  # {layer_idx: LongTensor (N,)} documents that accessed each slot
    num_docs: int  # |B|: number of background documents (sequences or batches, per `unit`)
    unit: str = DEFAULT_UNIT
    base_id: str = ""  # sha256 of the base model's model.safetensors
    meta: dict = field(default_factory=dict)  # seq_len, batch_size, num_tokens

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"background unit {self.unit!r} is not one of {UNITS}")
        for layer, df in self.df.items():
            if df.dtype != torch.long or df.dim() != 1:
                raise ValueError(
                    f"df of layer {layer} must be a 1-D int64 tensor, got {df.dtype} {tuple(df.shape)}"
                )
            if len(df) and int(df.max()) > self.num_docs:
                raise ValueError(f"df of layer {layer} reaches {int(df.max())} > {self.num_docs} documents")

    def idf(self, layer: int) -> torch.Tensor:
        """log((|B| + 1) / (df + 1)) per slot, float32 (N,)."""
        return torch.log(torch.tensor(self.num_docs + 1.0) / (self.df[layer].float() + 1.0))

    def save(self, path: str | Path) -> Path:
        """Write to `path` (a model directory or a .safetensors file); returns the file path."""
        path = Path(path)
        if path.is_dir():
            path = path / BACKGROUND_FILE
        tensors = {f"df.{layer}": df.contiguous() for layer, df in self.df.items()}
        metadata = {
            "num_docs": str(self.num_docs),
            "unit": self.unit,
            "base_id": self.base_id,
            **{k: str(v) for k, v in self.meta.items()},
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, expected_base_id: str | None = None) -> BackgroundStats:
        """Read from a model directory or a file; `expected_base_id` guards against a foreign model."""
        path = Path(path)
        if path.is_dir():
            path = path / BACKGROUND_FILE
        if not path.exists():
            raise FileNotFoundError(f"no background statistics at {path}; run `memfit background`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
        df = {int(k.split(".", 1)[1]): v.long() for k, v in tensors.items() if k.startswith("df.")}
        base_id = metadata.pop("base_id", "")
        if expected_base_id is not None and base_id != expected_base_id:
            raise ValueError(
                f"background statistics at {path} belong to base {base_id[:12] or '?'}, "
                f"not {expected_base_id[:12]}; recompute them with `memfit background`"
            )
        meta: dict = {}
        for k, v in metadata.items():
            if k not in ("num_docs", "unit"):
                meta[k] = int(v) if v.isdigit() else v
        return cls(
            df=dict(sorted(df.items())),
            num_docs=int(metadata["num_docs"]),
            unit=metadata.get("unit", DEFAULT_UNIT),
            base_id=base_id,
            meta=meta,
        )


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a model directory: [model.safetensors], or the shards that
    model.safetensors.index.json names (sorted); [] when it has neither."""
    d = Path(model_dir)
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if not index.exists():
        return []
    names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    missing = [n for n in names if not (d / n).exists()]
    if missing or not names:
        raise FileNotFoundError(f"{index} names shards that are missing: {missing[:3] or 'none listed'}")
    return [d / n for n in names]


def model_base_id(model_dir: str | Path) -> str:
    """sha256 over the bytes of the weight files in order (`weight_files`): for one model.safetensors
    its sha256. Identifies the base a background, and a store, belongs to."""
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no model.safetensors (or sharded index) in {model_dir}")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def chunk_texts(tokenizer, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Token id sequences of at most `seq_len`: each text is tokenised and cut into pieces (no specials)."""
    from .tokenizer import encode_texts

    seqs = []
    for ids in encode_texts(tokenizer, list(texts)):
        for s in range(0, len(ids), seq_len):
            piece = ids[s : s + seq_len]
            if piece:
                seqs.append(piece)
    return seqs


def pad_right(batch: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences -> (ids, attention mask), both (B, T) int64, right-padded with `pad`; the mask
    is 1 at real tokens only, so positions count real tokens."""
    T = max(len(s) for s in batch)
    ids = torch.full((len(batch), T), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, s in enumerate(batch):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def count_accesses(
    indices: torch.Tensor, attention_mask: torch.Tensor, num_slots: int, unit: str
) -> tuple[torch.Tensor, int]:
    """Per-slot document counts for one batch: (df increment (N,), number of documents).

    indices: (B, T, H, k) slot ids; attention_mask: (B, T), 0 at padding (those accesses do not count).
    unit "sequence": each row is a document; unit "batch": the whole batch is one document.
    """
    B = indices.shape[0]
    keep = attention_mask.bool().to(indices.device)[:, :, None, None].expand_as(indices)  # (B, T, H, k)
    flat = torch.where(keep, indices, torch.full_like(indices, num_slots)).reshape(B, -1)  # (B, T*H*k)
    hit = torch.zeros(B, num_slots + 1, dtype=torch.bool, device=indices.device)  # column N: padding
    hit.scatter_(1, flat, True)
    hit = hit[:, :num_slots]  # (B, N)
    if unit == "sequence":
        real = attention_mask.bool().any(-1).to(indices.device)  # rows with at least one real token
        return hit[real].sum(0).long(), int(real.sum())
    if unit == "batch":
        return hit.any(0).long(), 1
    raise ValueError(f"background unit {unit!r} is not one of {UNITS}")


@torch.no_grad()
def compute_background(
    model,
    tokenizer,
    texts: Sequence[str],
    unit: str = DEFAULT_UNIT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    base_id: str = "",
    progress: bool = False,
) -> BackgroundStats:
    """Run the model over the background texts and count, per memory slot, the documents that read it."""
    if unit not in UNITS:
        raise ValueError(f"background unit {unit!r} is not one of {UNITS}")
    seqs = chunk_texts(tokenizer, texts, seq_len)
    if not seqs:
        raise ValueError("no background text to count")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    modules = model.memory_modules()
    df = {layer: torch.zeros(m.num_slots, dtype=torch.long) for layer, m in modules.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    num_docs = num_tokens = 0
    batches = range(0, len(seqs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(seqs) / batch_size), desc="background", unit="batch")
    for start in batches:
        ids, mask = pad_right(seqs[start : start + batch_size], pad)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        for layer, indices in zip(modules, out.memory_indices):
            inc, docs = count_accesses(indices, mask, modules[layer].num_slots, unit)
            df[layer] += inc.cpu()
        num_docs += docs
        num_tokens += int(mask.sum())
    model.train(was_training)
    return BackgroundStats(
        df=df,
        num_docs=num_docs,
        unit=unit,
        base_id=base_id,
        meta={
            "seq_len": seq_len,
            "batch_size": batch_size,
            "num_tokens": num_tokens,
            "num_sequences": len(seqs),
        },
    )


def compute_for_model_dir(
    model_dir: str | Path,
    texts: Sequence[str] | None = None,
    unit: str | None = None,
    seed: int = 0,
    progress: bool = True,
    served_facts: int | None = None,
) -> BackgroundStats:
    """Load a model directory, compute its background statistics (default texts: the corpus's
    background split) and save them beside the model."""
    import json

    from .loading import load

    model_dir = Path(model_dir)
    report_file = model_dir / "training_report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    preset = report.get("preset_settings") or {}
    seq_len = int(preset.get("seq_len", DEFAULT_SEQ_LEN))
    if served_facts is not None:
        preset = {**preset, "background_served_facts": served_facts}
    if texts is None:  # what `memfit pretrain` counted: the background split + format-matched facts + served
        from memlm.data import build_corpus
        from memlm.pretrain import background_texts

        seed = int(report.get("seed", seed))
        corpus = build_corpus(
            seed,
            max_wiki=preset.get("max_wiki"),
            max_probe=preset.get("max_probe"),
            **({"probe_cities": int(preset["probe_cities"])} if "probe_cities" in preset else {}),
        )
        texts = background_texts(corpus, preset, seed)
    model, tokenizer = load(model_dir)
    stats = compute_background(
        model,
        tokenizer,
        texts,
        unit=unit or preset.get("background_unit") or DEFAULT_UNIT,
        seq_len=seq_len,
        base_id=model_base_id(model_dir),
        progress=progress,
    )
    stats.meta["served_facts"] = int(preset.get("background_served_facts", 0) or 0)
    stats.save(model_dir)
    return stats
