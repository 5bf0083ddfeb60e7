"""The recipe: one typed, validated description of a conversion run.

``bitconvert quantize`` builds one from its flags; ``bitconvert run`` reads one from YAML. Every
field has a default, so the smallest recipe is ``model: <name>``. Validation happens once, before
any work starts; unknown keys are errors (see :mod:`bitconvert.recipes.loading` for the messages).
"""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bitconvert.mod import MoDConfig
from bitconvert.quant.spec import QuantSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConvertConfig(QuantSpec):
    """Which layers become BitLinear and how they quantize (see QuantSpec for the quantizer fields).

    For ``b1.58`` the defaults are the measured best of docs/benchmarks.md rather than the BitNet paper's (one
    absmean scale per tensor, which QuantSpec keeps): the TWN fit with one scale per output row. Other variants
    keep QuantSpec's defaults, which are the only ones ``onebit`` takes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight_scale: Literal["tensor", "channel", "group"] = Field(
        default="channel", description="one scale per tensor, per output row, or per group of inputs (b1.58's "
                                       "default; other variants: tensor). channel ties groups of 64 under the twn "
                                       "fit (ablation round 7) and is what GGUF's TQ2_0 holds exactly when a row's "
                                       "inputs are a multiple of 256; tensor is what plain transformers loads")
    group_size: int = Field(default=64, gt=0, description="inputs per scale when weight_scale is group")
    ternary_fit: Literal["absmean", "twn", "learned"] = Field(
        default="twn", description="b1.58 codes and scale per block: twn = Ternary Weight Networks' (0 below 0.7 "
                                   "mean abs(w), scale the mean abs of the rest; the default, ablation rounds 5-7), "
                                   "absmean = BitNet's (scale mean abs(w), round), learned = twn's scale to start, "
                                   "then trained with the weights (LSQ, as ParetoQ does); other variants: absmean")

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data):
        # the measured defaults are b1.58's; a variant that is asked for without them keeps QuantSpec's
        if isinstance(data, dict) and data.get("variant", "b1.58") != "b1.58":
            data = {**{key: QuantSpec.model_fields[key].default for key in ("weight_scale", "ternary_fit")}, **data}
        return data

    skip: list[str] = Field(default_factory=list, description="module names, dotted suffixes or regexes kept in full precision")
    mixture_of_depths: MoDConfig | None = Field(
        default=None, description="route only some tokens through every other block (docs/variants.md); null = off")

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(**self.model_dump(exclude={"skip", "mixture_of_depths"}))


class GenerateSource(Strict):
    """Text sampled from the teacher itself: distillation with no data at all."""

    tokens: int = Field(default=200_000, gt=0, description="how many tokens to sample (cached in the run folder)")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_p: float = Field(default=0.95, gt=0, le=1, description="nucleus sampling threshold")
    sequence_length: int = Field(default=256, gt=8, description="tokens sampled per sequence")
    batch_size: int = Field(default=32, gt=0, description="sequences sampled at once")
    prompts: list[str] = Field(default_factory=list, description="optional prompts to start from; empty = start of text")
    prompts_from: str | None = Field(default=None, description="text file whose lines start the samples (their first "
                                     "prompt_tokens tokens): the teacher continues in-domain text instead of starting cold")
    prompt_tokens: int = Field(default=32, gt=0, description="tokens of each prompts_from line given as the prompt")
    random_start: bool = Field(default=False, description="start every sample from one token drawn at random from the "
                               "vocabulary (special tokens aside), as LLM-QAT's data-free text does: broad text, "
                               "in no one domain")
    chat: bool = Field(default=False, description="start every sample from the tokenizer's chat template up to the "
                       "user's message, so that an instruct teacher writes a request and answers it (Magpie): the "
                       "kind of text it was tuned on; the samples keep the template's turn markers")

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> "GenerateSource":
        given = [name for name in ("prompts", "prompts_from", "random_start", "chat") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give at most one of prompts, prompts_from, random_start and chat (got {', '.join(given)})")
        return self


class DataSource(Strict):
    """One training text source. Exactly one of path, hub or generate."""

    path: str | None = Field(default=None, description=".txt, .jsonl/.json file, a folder of them, or a saved `datasets` folder")
    hub: str | None = Field(default=None, description="dataset id on the hub (needs the network or its local cache)")
    config: str | None = Field(default=None, description="hub dataset configuration name")
    split: str = Field(default="train", description="split of a hub dataset or saved DatasetDict")
    text_field: str = Field(default="text", description="field holding the text in JSON rows and datasets")
    generate: GenerateSource | None = Field(default=None, description="sample training text from the teacher")
    weight: float = Field(default=1.0, gt=0, description="share of training blocks drawn from this source")

    @model_validator(mode="after")
    def _one_kind(self) -> "DataSource":
        given = [k for k in ("path", "hub", "generate") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a data source needs exactly one of path, hub or generate (got {given or 'none'})")
        return self


class DataConfig(Strict):
    train: list[DataSource] = Field(default_factory=lambda: [DataSource(generate=GenerateSource())],
                                    description="training text sources, mixed by weight")
    eval: DataSource | None = Field(default=None, description="held-out text scored by perplexity during training")
    eval_fraction: float = Field(default=0.0, ge=0, lt=0.5, description="hold out this share of train blocks when eval is empty")
    sequence_length: int = Field(default=512, gt=8, description="tokens per training sequence")
    eval_sequence_length: int | None = Field(default=None, gt=8, description="tokens per block of data.eval "
                                             "(default: sequence_length), to score runs of different lengths alike")

    @model_validator(mode="after")
    def _eval_length_needs_eval(self) -> "DataConfig":
        if self.eval_sequence_length is not None and self.eval is None:
            raise ValueError("data.eval_sequence_length applies to data.eval blocks; set data.eval, or drop it")
        return self


class LossConfig(Strict):
    kl: float = Field(default=1.0, ge=0, description="KL(teacher || student) on logits (distillation only)")
    ce: float = Field(default=0.5, ge=0, description="next-token cross-entropy")
    hidden: float = Field(default=0.0, ge=0, description="MSE between normalised hidden states (distillation only)")
    temperature: float = Field(default=1.0, gt=0, description="distillation temperature (KL is scaled by T squared)")
    attention: float = Field(default=0.0, ge=0, description="KL between teacher and student self-attention relations "
                             "of Q, K and V at one layer (MiniLM, as BitDistill uses; distillation only)")
    attention_layer: int = Field(default=-1, description="decoder layer of the attention-relation loss (negative: from the end)")

    @model_validator(mode="after")
    def _something(self) -> "LossConfig":
        if self.kl == self.ce == self.hidden == self.attention == 0:
            raise ValueError("all loss weights are 0; give kl, ce, hidden or attention a positive weight")
        return self


class BatchRamp(Strict):
    """Smaller batches first: more optimizer steps from the same early tokens, while the loss is far from
    converged and gradients agree (the batch doubles from ``start`` up to train.batch_size)."""

    start: int = Field(gt=0, description="sequences per micro-batch at the start; train.batch_size must be start "
                       "times a power of two")
    share: float = Field(default=0.25, gt=0, lt=1, description="share of the budget over which the batch doubles up "
                         "to train.batch_size, in equal parts per size")


class TrainConfig(Strict):
    mode: Literal["distill", "pretrain", "none"] = Field(
        default="distill", description="distill from the original, continue pretraining (CE), or no training")
    steps: int | None = Field(default=None, gt=0, description="optimizer steps (one of steps, tokens, minutes)")
    tokens: int | None = Field(default=None, gt=0, description="training tokens")
    minutes: float | None = Field(default=None, gt=0, description="wall-clock training budget")
    batch_size: int = Field(default=32, gt=0, description="sequences per device per micro-batch (every ablation's; "
                            "lower it with grad_accum to keep the step's 32 sequences in less memory)")
    batch_ramp: BatchRamp | None = Field(default=None, description="start with smaller batches (e.g. {start: 8, "
                                         "share: 0.25}); null = train.batch_size throughout")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(default=3e-3, gt=0, description="peak learning rate (AdamW; ablation round 1's winner for "
                      "ternary weights, which move only when a latent weight crosses a threshold)")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final learning rate as a share of lr")
    schedule: Literal["cosine", "linear", "constant", "two_stage"] = Field(
        default="cosine", description="decay after warmup; two_stage = BitNet b1.58 2B4T's: cosine from lr to lr/2, "
                                      "then at cooldown_at a drop to cooldown_lr_ratio x lr, cosine to min_lr_ratio x "
                                      "lr, and no weight decay from there on")
    cooldown_at: float = Field(default=0.5, gt=0, lt=1, description="two_stage: share of the budget where the "
                               "cooldown starts")
    cooldown_lr_ratio: float = Field(default=0.33, gt=0, le=0.5, description="two_stage: the cooldown's first lr as "
                                     "a share of lr, at most the 1/2 where stage 1 ends (2B4T: 5e-4 after a 1.5e-3 "
                                     "peak)")
    warmup_steps: int = Field(default=20, ge=0, description="linear learning-rate warmup")
    quant_warmup_steps: int = Field(default=100, ge=0, description="blend from full precision to ternary over this many steps")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay on matrices")
    freeze: list[str] = Field(default_factory=list, description="parameters left as they are: names, dotted "
                              "suffixes or regexes of parameters or their modules (e.g. embed_tokens; a tied head "
                              "is frozen with it)")
    grad_clip: float = Field(default=1.0, ge=0, description="max gradient norm; 0 = off")
    loss: LossConfig = Field(default_factory=LossConfig, description="loss weights")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(default="bf16", description="autocast on GPUs (CPU runs in float32)")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations to save memory")
    compile: Literal[False, "layers", "model"] = Field(
        default=False, description="torch.compile the student: false = eager, layers = each decoder block on its own "
                                   "(one compilation serves every block), model = the whole student (true, in "
                                   "older recipes); chunked loss arithmetic compiles with either")
    fused_loss: bool = Field(default=True, description="KL and cross-entropy from the final hidden states chunk by "
                             "chunk, never the full logits (models with a plain linear head; others fall back)")
    seed: int = Field(default=0, description="data order, sampling and initial RNG state")
    log_every: int = Field(default=10, gt=0, description="steps between metrics lines")
    eval_every: int = Field(default=0, ge=0, description="steps between held-out perplexity checks; 0 = only at the end")
    save_every: int = Field(default=200, ge=0, description="steps between checkpoints; 0 = only at the end")
    save_every_minutes: float = Field(default=15.0, ge=0, description="also checkpoint this often; 0 = off")
    keep_checkpoints: int = Field(default=2, gt=0, description="newest checkpoints kept")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value):
        if value is True:  # older recipes: true compiled the whole student
            return "model"
        if value is None:
            return False
        if isinstance(value, str) and value not in ("layers", "model"):
            close = difflib.get_close_matches(value.lower(), ["layers", "model", "false"], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"train.compile is false, layers or model, not {value!r}{hint}")
        return value

    @model_validator(mode="after")
    def _ramp_doubles_to_batch_size(self) -> "TrainConfig":
        ramp = self.batch_ramp
        if ramp is not None:
            ratio = self.batch_size // ramp.start
            if self.batch_size % ramp.start or ratio < 2 or ratio & (ratio - 1):
                raise ValueError(f"train.batch_ramp.start={ramp.start} must be train.batch_size={self.batch_size} "
                                 "divided by a power of two (2, 4, 8 ...): the batch doubles up to batch_size")
        return self

    @model_validator(mode="after")
    def _cooldown_above_floor(self) -> "TrainConfig":
        if self.schedule == "two_stage" and self.cooldown_lr_ratio < self.min_lr_ratio:
            raise ValueError(f"train.cooldown_lr_ratio={self.cooldown_lr_ratio} is below min_lr_ratio="
                             f"{self.min_lr_ratio}: the cooldown decays from the first to the second")
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        given = [k for k in ("steps", "tokens", "minutes") if getattr(self, k) is not None]
        if self.mode != "none" and len(given) != 1:
            raise ValueError(f"give exactly one training budget: steps, tokens or minutes (got {given or 'none'})")
        return self


ExportFormat = Literal["packed", "gguf-tq2_0", "gguf-tq1_0"]


class ExportConfig(Strict):
    formats: list[ExportFormat] = Field(default_factory=lambda: ["packed"], description="packed is always written")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(default="bfloat16", description="dtype of the tensors that stay in full precision")


class EvalConfig(Strict):
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names or bitconvert's local tasks")
    perplexity: list[str] = Field(default_factory=list, description="text files scored by rolling perplexity")
    limit: int | None = Field(default=None, gt=0, description="score only the first N items of each task")
    batch_size: int = Field(default=8, gt=0, description="evaluation batch size")
    data_dir: str | None = Field(default=None, description="folder with local task data (see docs/evaluation.md)")
    track_every: int = Field(default=0, ge=0, description="also score the tasks on the student every N training steps "
                             "and at the end, into metrics.jsonl and the curves; 0 = off")
    track_limit: int | None = Field(default=None, gt=0, description="items per task when tracking (default: limit)")

    @model_validator(mode="after")
    def _tracked_tasks(self) -> "EvalConfig":
        if self.track_every and not self.tasks:
            raise ValueError("eval.track_every scores eval.tasks during training: list at least one task")
        return self


class Recipe(Strict):
    model: str = Field(default="smollm2-135m", description="model to convert: embedded name, folder, .gguf file or hub id")
    output: str = Field(default="./tern", description="export folder; training state goes to <output>/training")
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1 ... (default: cuda if present)")
    convert: ConvertConfig = Field(default_factory=ConvertConfig, description="which layers, which quantizer")
    data: DataConfig = Field(default_factory=DataConfig, description="training and held-out text")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(minutes=10), description="objective, budget, schedule")
    export: ExportConfig = Field(default_factory=ExportConfig, description="formats written to output")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="lm-eval tasks and perplexity after export")

    @model_validator(mode="after")
    def _coherent(self) -> "Recipe":
        if self.train.mode == "pretrain" and (self.train.loss.kl or self.train.loss.hidden) and not self.train.loss.ce:
            raise ValueError("train.mode 'pretrain' has no teacher: set train.loss.ce > 0 (kl and hidden need mode 'distill')")
        if self.train.mode == "pretrain" and any(s.generate for s in self.data.train):
            raise ValueError("data.train uses 'generate', which needs the teacher: set train.mode to 'distill'")
        if self.eval.track_every and self.train.mode == "none":
            raise ValueError("eval.track_every scores the student while it trains, and train.mode 'none' trains nothing")
        gguf = [f for f in self.export.formats if f.startswith("gguf")]
        if gguf and (self.convert.variant != "b1.58" or self.convert.mixture_of_depths is not None):
            # fail before training, not at export: llama.cpp has no 1-bit types and no routed blocks
            raise ValueError(f"export.formats {gguf} holds b1.58 models without Mixture-of-Depths only; "
                             "drop the gguf formats or use convert.variant b1.58 without mixture_of_depths")
        return self
