"""What a run was asked to do, as typed values: run_llama.py makes them once from the flags (defaults filled in,
values checked), and the modules below read them and never see the flags."""
import os
from dataclasses import dataclass
from typing import Any, Optional

DEFAULT_MODEL = "stories42M.pt"
CHECKPOINT_FORMAT = "minllama2-classifier"  # what a checkpoint and a training state say they are
STATE_FORMAT = "minllama2-training-state"


@dataclass(frozen=True)
class Fields:
    """Where a .jsonl object or a .csv/.tsv header keeps the sentence and its label."""
    text: str = "text"
    label: str = "label"


@dataclass(frozen=True)
class ModelFiles:
    model: str  # a llama2.c .pt or .bin, or a Hugging Face folder
    tokenizer: str  # its sentencepiece model


@dataclass(frozen=True)
class GenerationRun:
    flag: str  # the output flag, for messages
    temperature: float
    output: str


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint that finetune or lora wrote, as --filepath names it, with the base model and tokenizer that
    override the ones it names."""
    path: str
    saved: dict  # its contents, read once
    model: Optional[str] = None
    tokenizer: Optional[str] = None


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str
    max_new_tokens: int
    top_k: Optional[int]
    top_p: Optional[float]
    quantize: Optional[str]  # None, "int8" or "fp16"
    stop_at_eos: bool  # end where the model ends the story
    runs: tuple[GenerationRun, ...]  # the assignment's pair (T = 0 and 1), or one --temperature
    trained: Optional[TrainedModel] = None  # a language model that --task lm trained, instead of the base model
    input: Optional[str] = None  # prompts as JSONL ("prompt" or "instruction" lines), completed in batches
    output: Optional[str] = None  # where their completions go (JSONL)
    batch_size: int = 8


@dataclass(frozen=True)
class PerplexitySettings:
    input: str  # the text file to score
    stride: Optional[int]  # None: the model's window (windows that do not overlap)
    output: Optional[str]  # a JSON file for the result, or None
    trained: Optional[TrainedModel]  # a language model that --task lm trained, or None for the base model
    batch_size: int


@dataclass(frozen=True)
class DataSettings:
    train: str  # read by prompt only with --eval_train
    dev: Optional[str]  # optional (None) for the language model alone
    test: Optional[str]
    label_names: Optional[str]  # None for the language model
    dev_out: Optional[str]  # predictions of a classifier; None for the language model
    test_out: Optional[str]
    eval_train: bool
    batch_size: int
    max_sentence_len: Optional[int]
    fields: Fields = Fields()


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    quantize: Optional[str] = None  # the frozen base held in "nf4" or "int8" (QLoRA), or as loaded

    def as_record(self) -> dict[str, Any]:
        """As a checkpoint stores it (plain values: a list, not a tuple; no quantize key unless quantized, as before
        QLoRA, so that earlier runs still resume)."""
        record = dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=list(self.targets))
        return {**record, "quantize": self.quantize} if self.quantize else record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "LoRASettings":
        return cls(record["rank"], record["alpha"], record["dropout"], tuple(record["targets"]), record.get("quantize"))


@dataclass(frozen=True)
class RunFiles:
    """What a training run writes beside its data outputs, all named after --filepath."""
    checkpoint: str
    state: str
    metrics: str
    curves: str

    @classmethod
    def beside(cls, checkpoint: str) -> "RunFiles":
        stem = os.path.splitext(checkpoint)[0]
        return cls(checkpoint, checkpoint + ".state", stem + ".metrics.jsonl", stem + ".png")

    def outputs(self) -> list[tuple[str, str]]:
        """(flag, path) of each file, for the checks of output paths."""
        return [("--filepath", self.checkpoint), ("--filepath (training state)", self.state),
                ("--filepath (metrics)", self.metrics), ("--filepath (curves)", self.curves)]


@dataclass(frozen=True)
class TrainingSettings:
    option: str  # finetune or lora
    epochs: int
    lr: float
    hidden_dropout_prob: float
    lora: Optional[LoRASettings]  # None for full fine-tuning
    files: RunFiles
    resume: bool
    overwrite: bool
    micro_batch_size: Optional[int] = None  # None: the device's default (train.accumulate_gradients)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    fsdp: bool = False  # shard the model across torchrun's processes instead of replicating it
    task: str = "classify"  # or "lm": the language model itself, no head
    lr_scheduler: str = "constant"  # optimizer.SCHEDULES
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping
    train_on_prompt: bool = False  # --task lm: prompts train too, not only completions
    block_size: Optional[int] = None  # --task lm: the window (None: the model's max_seq_len)


@dataclass(frozen=True)
class ClassifySettings:
    checkpoint: str
    saved: dict  # the checkpoint's contents, read once
    input: str  # a file, or - for standard input
    output: Optional[str]  # None or -: standard output
    model: Optional[str]  # overrides of the base model and tokenizer the checkpoint names
    tokenizer: Optional[str]
    batch_size: int  # these two, and Settings.dtype, default to the training run's
    max_sentence_len: Optional[int]
    fields: Fields = Fields()


@dataclass(frozen=True)
class ExportSettings:
    output: str  # the folder to write
    lm_only: bool  # the language model alone (LlamaForCausalLM), not the classifier
    adapter: bool  # a LoRA classifier's adapters and head as a PEFT adapter, not merged
    overwrite: bool
    checkpoint: Optional[str]  # a trained classifier; None: the base model of Settings.model (lm_only)
    saved: Optional[dict]
    model: Optional[str]  # overrides of the base model and tokenizer the checkpoint names
    tokenizer: Optional[str]


@dataclass(frozen=True)
class Settings:
    """One run: the option and what it needs (the parts an option does not use are None)."""
    option: str
    use_gpu: bool
    dtype: str  # --dtype: auto, fp32, bf16 or fp16
    seed: int
    model: Optional[ModelFiles]  # None for classify: the checkpoint names its own
    outputs: tuple[tuple[str, str], ...]  # (flag, path) of every file the run writes
    generation: Optional[GenerationSettings] = None
    data: Optional[DataSettings] = None
    training: Optional[TrainingSettings] = None
    classify: Optional[ClassifySettings] = None
    export: Optional[ExportSettings] = None
    perplexity: Optional[PerplexitySettings] = None
    stored_dtype: tuple[Optional[str], str] = (None, "")  # (precision, "<model> is stored in"): --dtype auto's
    command: tuple[str, ...] = ()  # the flags as given
    run_record: Optional[str] = None  # <--output_dir>/run.json
