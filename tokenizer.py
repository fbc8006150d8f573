"""The sentencepiece tokenizer that a llama2.c model was trained with (Llama 2's, or a custom one)."""
from typing import List, Optional

from sentencepiece import SentencePieceProcessor

from utils import UsageError, require_file

TOKENIZER_MODEL = "tokenizer.model"  # Llama 2's 32000-piece model, the one stories15M/42M/110M use


class Tokenizer:
    def __init__(self, tokenizer_model: Optional[str] = None):
        model_path = tokenizer_model or TOKENIZER_MODEL
        require_file("--tokenizer", model_path, "run ./setup.sh, or pass --tokenizer")
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"tokenizer {model_path}: not a sentencepiece model; pass a .model file "
                             f"with --tokenizer") from e
        self.model_path = model_path
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        # sentencepiece's own pad id is -1, which cannot index an embedding; the byte piece <0x00> never
        # occurs in text, and padded positions are masked out anyway.
        self.pad_id: int = max(self.sp_model.piece_to_id("<0x00>"), 0)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        tokens = self.sp_model.encode(s)
        return [self.bos_id] * bos + tokens + [self.eos_id] * eos

    def decode(self, tokens: List[int]) -> str:
        return self.sp_model.decode(tokens)

    def check_vocab(self, vocab_size: int, checkpoint: str) -> None:
        """A tokenizer of another vocabulary gives token ids the model never learned: refuse it."""
        if self.n_words != vocab_size:
            raise UsageError(f"tokenizer {self.model_path} has {self.n_words} pieces but checkpoint {checkpoint} has "
                             f"a vocabulary of {vocab_size}; pass the checkpoint's tokenizer with --tokenizer")
