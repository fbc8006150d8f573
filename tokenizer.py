"""The tokenizer a model was trained with: a sentencepiece model (llama2.c's Llama 2 tokenizer.model, a custom one
like tok512.model), or the tokenizer.json that transformers 5 saves, read with Hugging Face's tokenizers library.
Both give the same ids for the same vocabulary; text is always text ("<s>" in a sentence is three characters, as
sentencepiece reads it, never the start token)."""
import json
import os
import shutil
from typing import List, Optional

from sentencepiece import SentencePieceProcessor

from utils import UsageError, require_file

TOKENIZER_MODEL = "tokenizer.model"  # Llama 2's 32000-piece model, the one stories15M/42M/110M use
_PROBE = "Once upon a time"  # any text: a post-processor's special tokens show around its ids


class _TokenizerJson:
    """tokenizer.json behind sentencepiece's method names, so that Tokenizer needs one code path."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise UsageError(f"--tokenizer {path}: reading tokenizer.json needs Hugging Face's tokenizers; run "
                             f"./setup.sh (or pip install tokenizers)") from None
        try:
            self.tokenizer = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own exception type
            raise UsageError(f"--tokenizer {path}: not a readable tokenizer.json ({e})") from e
        self.tokenizer.encode_special_tokens = True
        special = {"bos_token": "<s>", "eos_token": "</s>"}  # Llama's, unless tokenizer_config.json beside it says
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
                for key in special:
                    value = config.get(key) or special[key]
                    special[key] = value["content"] if isinstance(value, dict) else value
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
                raise UsageError(f"--tokenizer {path}: {config_path} beside it is not readable ({e})") from e
        self.special = {key: self.tokenizer.token_to_id(token) for key, token in special.items()}
        missing = [special[key] for key, token_id in self.special.items() if token_id is None]
        if missing:
            raise UsageError(f"--tokenizer {path}: no token {' or '.join(missing)} in its vocabulary; pass the "
                             f"tokenizer of a Llama model")

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def specials_around(self) -> tuple[List[int], List[int]]:
        """The ids its post-processor puts before and after a text's, as transformers' tokenizer(text) adds them
        (tokenizer_config.json's add_bos_token / add_eos_token do not change them in transformers 5 either)."""
        plain = self.encode(_PROBE)
        full = self.tokenizer.encode(_PROBE, add_special_tokens=True).ids
        start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)  # it only adds tokens
        return full[:start], full[start + len(plain):]

    def with_template(self, prefix: List[int], suffix: List[int]) -> str:
        """This tokenizer.json, its post-processor replaced by one that puts prefix and suffix around a text."""
        from tokenizers import processors

        pieces = [self.tokenizer.id_to_token(i) for i in prefix], [self.tokenizer.id_to_token(i) for i in suffix]
        single = " ".join([*pieces[0], "$A", *pieces[1]])
        pair = " ".join([*pieces[0], "$A", *pieces[1], *pieces[0], "$B:1", *pieces[1]])
        specials = sorted({(piece, i) for piece, i in zip(pieces[0] + pieces[1], prefix + suffix)})
        copy = self.tokenizer.from_str(self.tokenizer.to_str())
        copy.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        return copy.to_str()

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # as sentencepiece drops <s> and </s>

    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def bos_id(self) -> int:
        return self.special["bos_token"]

    def eos_id(self) -> int:
        return self.special["eos_token"]

    def piece_to_id(self, piece: str) -> int:
        found = self.tokenizer.token_to_id(piece)
        return -1 if found is None else found

    def id_to_piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)


def _sentencepiece(path: str) -> SentencePieceProcessor:
    model = SentencePieceProcessor()
    try:
        model.Load(path)
    except (OSError, RuntimeError) as e:
        raise UsageError(f"tokenizer {path}: not a sentencepiece model; pass a .model (or tokenizer.json) file "
                         f"with --tokenizer") from e
    return model


class Tokenizer:
    def __init__(self, tokenizer_model: Optional[str] = None):
        model_path = tokenizer_model or TOKENIZER_MODEL
        require_file("--tokenizer", model_path, "run ./setup.sh, or pass --tokenizer")
        self.model = _TokenizerJson(model_path) if model_path.endswith(".json") else _sentencepiece(model_path)
        self.model_path = model_path
        self.n_words: int = self.model.vocab_size()
        self.bos_id: int = self.model.bos_id()
        self.eos_id: int = self.model.eos_id()
        # sentencepiece's own pad id is -1, which cannot index an embedding; the byte piece <0x00> never
        # occurs in text, and padded positions are masked out anyway.
        self.pad_id: int = max(self.model.piece_to_id("<0x00>"), 0)
        # What goes around one text (a prompt, a document, a sentence), as transformers' tokenizer(text) puts it:
        # <s> first with sentencepiece (llama2.c's and Llama 2's own), a tokenizer.json's post-processor's tokens.
        self.prefix, self.suffix = (self.model.specials_around() if isinstance(self.model, _TokenizerJson)
                                    else ([self.bos_id], []))

    @property
    def file_name(self) -> str:
        """What a Hugging Face folder calls this tokenizer's file."""
        return "tokenizer.json" if self.model_path.endswith(".json") else "tokenizer.model"

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        tokens = self.model.encode(s)
        return [self.bos_id] * bos + tokens + [self.eos_id] * eos

    def encode_text(self, s: str) -> List[int]:
        """s as the model reads a whole text: between the special tokens that this tokenizer puts around one."""
        return self.prefix + self.model.encode(s) + self.suffix

    def decode(self, tokens: List[int]) -> str:
        return self.model.decode(tokens)

    def write_file(self, path: str, suffix: List[int]) -> None:
        """This tokenizer's file at path, made to end a text with suffix (a classifier's </s>, which its head reads)."""
        if isinstance(self.model, _TokenizerJson) and suffix != self.suffix:
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.model.with_template(self.prefix, suffix))
        else:
            shutil.copyfile(self.model_path, path)

    def piece(self, token_id: int) -> str:
        return self.model.id_to_piece(token_id)

    def check_vocab(self, vocab_size: int, checkpoint: str) -> None:
        """A tokenizer of another vocabulary gives token ids the model never learned: refuse it."""
        if self.n_words != vocab_size:
            raise UsageError(f"tokenizer {self.model_path} has {self.n_words} pieces but checkpoint {checkpoint} has "
                             f"a vocabulary of {vocab_size}; pass the checkpoint's tokenizer with --tokenizer")
