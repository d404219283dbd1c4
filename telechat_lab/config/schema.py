"""The settings of every command, defined once: one dataclass per config group, registered with Hydra as the
schema of `conf/` (`defaults: [schema: train]`), so the YAML files are typed against them and the defaults live
here only.

Each field's metadata says what the validator checks (`choices`, `min` / `gt` bounds, `types` for fields that
take several) and whether it may change when a run is resumed (`on_resume`: "fixed" by default, "free" for
settings that only affect logging or speed, "grow" for limits that may only be raised).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from telechat_lab.adapter_kinds import ADAPTER_KINDS
from telechat_lab.stages import LOSSES, STAGES


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    choices: tuple = (),
    min: float | None = None,
    gt: float | None = None,
    max: float | None = None,
    types: tuple = (),
    on_resume: str = "fixed",
    hint: str = "",
) -> Any:
    """A dataclass field with what the validator checks (see the module docstring); `hint` is added to its
    out-of-range message."""
    meta = {"choices": choices, "min": min, "gt": gt, "max": max, "types": types, "on_resume": on_resume, "hint": hint}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


FREE, GROW = "free", "grow"
MAX_SEED = 2**32 - 1  # numpy's (and so Lightning's seed_everything's) largest seed
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    path: str | None = None  # a TeleChat2 checkpoint directory; null: the tiny random model (written on first use)
    name: str = "tiny"
    # auto: flash_attention_2 with flash-attn on a GPU; else flex_attention for packed rows on a GPU; else sdpa
    attn_implementation: str = setting("auto", choices=("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"))
    # auto: under mixed precision a frozen base in bf16 / fp16 and what is trained in fp32; full fine-tuning fp32
    dtype: str = setting("auto", choices=DTYPE_NAMES)
    gradient_checkpointing: bool = setting(False, on_resume=FREE)
    compile: bool = setting(False, on_resume=FREE)  # torch.compile each block (the first steps compile them)
    # the training loss over lm_head, without [tokens, vocab] logits: fused (its gradients computed in the forward,
    # lm_head never recomputed), chunked (each chunk recomputed in the backward: less memory for a trained head),
    # liger (Liger's kernel of the fused method: CUDA, liger-kernel installed), auto (liger where it runs, else
    # fused). A PEFT-wrapped or ZeRO-3 partitioned lm_head always takes chunked
    loss_implementation: str = setting("auto", choices=("auto", "fused", "chunked", "liger"), on_resume=FREE)


@dataclass
class DataConfig:
    """The `data` group: datasets and their encoding (LLaMA-Factory option names where one exists)."""

    dataset_dir: str = "data"  # holds dataset_info.json; relative: the working dir, else the bundled demo data
    datasets: Any = setting(
        factory=lambda: ["identity", "alpaca_en_demo", "sharegpt_tools_demo", "telechat_demo"], types=(list, str)
    )  # a list, or "a,b"
    mix: dict[str, float] | None = None  # {name: ratio}: 1.5 = every example plus half again (seeded)
    max_samples: int | None = setting(None, min=1, hint="null takes every record")  # per dataset: its first N
    val_size: float = setting(
        0.05, min=0, hint="0: no validation"
    )  # fraction (< 1) or number of examples held out for validation
    cutoff_len: int = setting(1024, min=8)
    packing: bool = False  # several examples per row, no attention across them
    padding_free: bool = False  # a whole batch as one row with no padding (flash attention)
    train_on_prompt: bool = False
    mask_history: bool = False  # train only the last reply of each conversation
    train_role_tokens: bool = False  # also train each trained turn's <_user> and <_bot> (the release's SFT recipe)
    default_system: str | None = None  # null: TeleChat's default system prompt; "": no system block
    placeholders: dict[str, str] = field(default_factory=lambda: {"name": "TeleChat-Lab", "author": "telechat-lab"})
    fill_placeholders: list[str] = field(default_factory=lambda: ["identity"])  # datasets whose {{...}} are filled
    on_bad_record: str = setting("error", choices=("error", "skip"))  # skip: drop bad records, counted per reason
    preprocessing_num_workers: int = setting(1, min=1, on_resume=FREE)
    cache_dir: str | None = setting(None, on_resume=FREE)  # encoded datasets; default $TELECHAT_LAB_CACHE
    overwrite_cache: bool = setting(False, on_resume=FREE)
    # the cache is keyed by the data files' contents; true: a file whose inode, size, mtime and ctime are unchanged
    # is not hashed again (its hash is remembered in cache_dir), and a cache entry whose files are unchanged so since
    # it was written or last checked whole is not read whole again; false: every file is read and hashed, and every
    # cached token checked, every run
    trust_file_stat: bool = setting(True, on_resume=FREE)
    # resume=true on data that changed since the checkpoint (other files, example counts or validation split):
    # false refuses, naming the datasets; true continues, with a warning in the log
    allow_changed_on_resume: bool = setting(False, on_resume=FREE)
    seed: int = setting(42, min=0, max=MAX_SEED)
    batch_size: int = setting(4, min=1)  # per device (rows when packing)
    eval_batch_size: int = setting(4, min=1, on_resume=FREE)
    dataloader_num_workers: int = setting(0, min=0, on_resume=FREE)
    # true: read, encode, shuffle and pack the data on the fly in the dataloader workers (corpora larger than the
    # disk cache or memory; stage pt and sft): needs trainer.max_steps; data.val_size is a number of records taken
    # from the head of the stream (data/streaming.py)
    streaming: bool = False
    streaming_buffer: int = setting(1024, min=1)  # records a shuffle (and packing) block holds, per worker


@dataclass
class QuantizationConfig:
    bits: int = setting(4, choices=(4, 8))
    quant_type: str = setting("nf4", choices=("nf4", "fp4"))
    double_quant: bool = True
    compute_dtype: str = setting("bfloat16", choices=DTYPE_NAMES[1:])


# the linear modules of a TeleChat2 block (model/modeling_telechat2.py): what adapter.target=all means
BLOCK_LINEAR_MODULES = ["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"]
ADAPTER_TARGETS = [*BLOCK_LINEAR_MODULES, "lm_head"]  # what adapter.target may name


@dataclass
class AdapterConfig:
    type: str = setting("lora", choices=tuple(ADAPTER_KINDS))  # what each kind implies: adapter_kinds.py
    rank: int = setting(8, min=1)
    alpha: float = setting(16.0, gt=0)
    dropout: float = setting(0.0, min=0, max=0.99)
    target: Any = setting("all", types=(str, list))  # all = every linear layer of the blocks, or a list
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)
    modules_to_save: list[str] | None = None  # e.g. [lm_head] (LoRA) or [ln_f] (freeze)
    use_dora: bool = False
    quantization: QuantizationConfig | None = None
    trainable_layers: int = setting(2, min=1)  # freeze: the last N blocks are trained


@dataclass
class DeepSpeedConfig:
    stage: int = setting(2, choices=(1, 2, 3))
    offload_optimizer: bool = False
    offload_params: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config last


@dataclass
class HardwareConfig:
    name: str = setting("auto", on_resume=FREE)
    accelerator: str = setting("auto", choices=("auto", "cpu", "gpu", "cuda"), on_resume=FREE)
    devices: Any = setting("auto", types=(int, str, list))
    num_nodes: int = setting(1, min=1)
    strategy: str = setting("auto", choices=("auto", "ddp", "deepspeed"))
    precision: str = "auto"  # auto: bf16-mixed on a bf16 GPU, 16-mixed on other GPUs, 32-true on CPU
    ddp_timeout: int = setting(1800, min=1, on_resume=FREE)  # seconds
    process_group_backend: str | None = setting(None, on_resume=FREE)  # null: nccl on GPU, gloo on CPU
    deepspeed: DeepSpeedConfig | None = None
    peak_tflops: float | None = setting(None, gt=0, on_resume=FREE)  # for MFU where Lightning does not know it


@dataclass
class OptimConfig:
    lr: float = setting(2e-4, gt=0)
    weight_decay: float = setting(0.0, min=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, gt=0)
    fused: Any = setting("auto", types=(bool, str), choices=("auto", True, False))  # auto: fused kernels on CUDA
    scheduler: str = setting("cosine", choices=("cosine", "linear", "constant"))
    warmup_steps: int = setting(0, min=0)
    warmup_ratio: float = setting(0.0, min=0, max=1)  # used when warmup_steps is 0
    min_lr_ratio: float = setting(0.0, min=0, max=1)  # cosine floor, as a fraction of lr


@dataclass
class StageConfig:
    """The `stage` group (conf/stage/): what the training step computes; what each stage implies: stages.py.

    One schema for every stage (not one dataclass per option): Hydra then composes `stage=dpo stage.beta=0.1`,
    sweeps and resume checks as for any group, and a setting given to a stage that has no use for it (stage.beta
    with stage=sft, stage.simpo_gamma with stage.loss=sigmoid) is refused by the validator in one clear message
    (stages.contradictions) instead of Hydra's "key not in struct". A null setting takes the stage's default
    (stages.py: TRL's defaults); `stages.settings()` gives them filled in.

    Notation: for a prompt x with chosen reply y_w and rejected y_l, log pi(y|x) is summed over the reply's tokens
    (mean over them where said); the log-ratio h(y) = log pi(y|x) - log pi_ref(y|x); sigma the logistic function;
    the step's loss is the mean over its pairs (or KTO examples)."""

    name: str = setting("sft", choices=tuple(STAGES))
    # stage=dpo, the preference loss:
    #   sigmoid (DPO, Rafailov et al. 2023, arXiv:2305.18290): -log sigma(beta d), d = h(y_w) - h(y_l); with
    #     label_smoothing e (cDPO, Mitchell 2023): -(1 - e) log sigma(beta d) - e log sigma(-beta d)
    #   ipo (IPO, Azar et al. 2023, arXiv:2310.12036, Eq. 17): (d / n - 1 / (2 beta))^2, each log-ratio divided by
    #     its reply's token count, as TRL (and the IPO authors) do
    #   orpo (ORPO, Hong et al. 2024, arXiv:2403.07691, reference-free): NLL(y_w) - beta log sigma(log odds(y_w) -
    #     log odds(y_l)), odds(y) = p / (1 - p), p = exp(mean token log-prob); beta is the paper's lambda
    #   simpo (SimPO, Meng et al. 2024, arXiv:2405.14734, reference-free): -log sigma(beta (mean log pi(y_w) -
    #     mean log pi(y_l)) - simpo_gamma), label_smoothing as for sigmoid
    loss: str | None = setting(None, choices=tuple(LOSSES))  # null: sigmoid
    # the inverse temperature of the reward beta * h(y) (KTO too); null: 0.1 (TRL's default)
    beta: float | None = setting(None, gt=0)
    label_smoothing: float | None = setting(None, min=0)  # below 0.5; sigmoid/simpo: pairs' flip chance; null: 0
    simpo_gamma: float | None = setting(None, min=0)  # simpo: the target reward margin; null: 0.5 (TRL's)
    # sigmoid/ipo/simpo: + sft_weight * the chosen reply's mean token NLL (LLaMA-Factory's pref_ftx; RPO, Pang et
    # al. 2024); null: 0
    sft_weight: float | None = setting(None, min=0)
    # an SFT run's directory (its adapter, or its full model) that is both the reference policy and the policy's
    # start: a LoRA adapter is merged in memory into the base, and a fresh adapter is trained on top (so the
    # reference, "adapters disabled", is the SFT policy, never the bare base), saved stacked onto the SFT adapter
    # (one adapter on the original base: merge.py / chat.py take it alone); null: model.path is the reference
    reference: str | None = None
    # dpo (not kto: its KL rows change every epoch): the reference log-probabilities of every training and
    # validation sequence computed in one pass before training and cached on disk beside the data cache
    # (data.cache_dir), so no reference model stays in memory (full fine-tuning otherwise keeps a frozen copy)
    precompute_reference: bool = False
    # stage=kto (KTO, Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7, as TRL's KTOTrainer): z = max(0, the batch
    # mean of h over mismatched prompt/completion pairs), detached; desirable: w_d (1 - sigma(beta (h(y) - z))),
    # undesirable: w_u (1 - sigma(beta (z - h(y)))); null: 1
    desirable_weight: float | None = setting(None, gt=0)
    undesirable_weight: float | None = setting(None, gt=0)


@dataclass
class TrainConfig:
    """`python train.py` (conf/train.yaml)."""

    task_name: str = setting("train", on_resume=FREE)
    output_dir: str = setting("outputs/${task_name}/${now:%Y-%m-%d_%H-%M-%S}", on_resume=FREE)
    seed: int = setting(42, min=0, max=MAX_SEED)
    resume: bool = setting(False, on_resume=FREE)  # continue the run in output_dir from its newest checkpoint
    overwrite: bool = setting(False, on_resume=FREE)  # clear a used output_dir (one written by telechat-lab) first
    logging_steps: int = setting(1, min=1, on_resume=FREE)
    save_steps: int = setting(100, min=1, on_resume=FREE)  # checkpoint every N optimizer steps, and at the end
    save_total_limit: int | None = setting(3, min=1, on_resume=FREE)  # newest N checkpoints kept; null: all
    plot_loss: bool = setting(True, on_resume=FREE)
    nan_policy: str = setting("stop", choices=("stop", "skip"), on_resume=FREE)  # on a NaN/inf loss or grad norm
    nan_max_skips: int = setting(10, min=1, on_resume=FREE)  # nan_policy=skip: stop after this many skipped steps
    # a sweep's objective (the Optuna sweeper's value, the summary's order): val_loss, train_loss, or any logged
    # validation metric by its name (val/rewards/accuracies, val/rewards/margins, ... of a preference stage)
    optimized_metric: str = setting("val_loss", on_resume=FREE)
    optimized_direction: str = setting("minimize", choices=("minimize", "maximize"), on_resume=FREE)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # any lightning.pytorch.Trainer argument
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: dict[str, Any] | None = setting(None, on_resume=FREE)  # name -> {_target_: a Lightning logger, ...}
    callbacks: dict[str, Any] | None = setting(None, on_resume=FREE)  # name -> {_target_: a Lightning callback}


# The TeleChat2 release's recommended sampling (its generation_config.json): chat's, serve's and an export's default
RELEASE_SAMPLING = {"temperature": 0.3, "top_p": 0.85, "top_k": 5, "repetition_penalty": 1.03}


@dataclass
class GenerationConfig:
    """chat's and serve's sampling; by default the release's, as an export's generation_config.json holds it."""

    max_new_tokens: int = setting(512, min=1)
    do_sample: bool = True
    temperature: float = setting(RELEASE_SAMPLING["temperature"], min=0)
    top_p: float = setting(RELEASE_SAMPLING["top_p"], gt=0, max=1)
    top_k: int = setting(RELEASE_SAMPLING["top_k"], min=0)
    repetition_penalty: float = setting(RELEASE_SAMPLING["repetition_penalty"], gt=0)


@dataclass
class VLLMConfig:
    max_model_len: int | None = setting(None, min=1)  # null: the model's training_seqlen
    gpu_memory_utilization: float = setting(0.9, gt=0)
    tensor_parallel_size: int = setting(1, min=1)
    max_lora_rank: int = setting(64, min=1)


@dataclass
class ChatModelConfig:
    path: str | None = None  # a checkpoint or merged directory; null: the adapter's base
    dtype: str = setting("auto", choices=DTYPE_NAMES)
    attn_implementation: str = setting("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))


@dataclass
class ChatConfig:
    """`python chat.py` (conf/chat.yaml)."""

    model: ChatModelConfig = field(default_factory=ChatModelConfig)
    adapter_path: Any = setting(None, types=(str, list))  # applied without merging (a list stacks several)
    infer_backend: str = setting("huggingface", choices=("huggingface", "vllm"))
    system: str | None = None  # the system prompt; null: TeleChat's default
    # what null above means: null: what the adapter's run trained with (its data.default_system), else TeleChat's
    # default; "": no system block
    default_system: str | None = None
    device: str = "auto"
    max_input_tokens: int | None = setting(None, min=1)  # null: the model's training_seqlen minus max_new_tokens
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    input: str | None = None  # batch mode: a prompts file (text lines or JSON lines), or - for stdin
    output: str | None = None  # batch mode: JSONL answers, appended as they come (default: stdout)
    overwrite: bool = False  # replace an existing output file (else a partial one of the same input is continued)
    resume: bool = True  # continue an output file this input's prompts began; false: refuse an existing file
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class ServeModelConfig(ChatModelConfig):
    name: str | None = None  # the name the base is served under (a request's `model`); null: its directory's name


@dataclass
class ServeConfig:
    """`telechat-lab serve` (conf/serve.yaml): an OpenAI-compatible HTTP server."""

    model: ServeModelConfig = field(default_factory=ServeModelConfig)
    # {name: adapter dir, ...}, or a list of adapter / run directories (each served under its directory's name)
    adapters: Any = setting(None, types=(dict, list, str))
    host: str = "127.0.0.1"
    port: int = setting(8000, min=1, max=65535)
    system: str | None = None  # the system prompt of a request without one; null: TeleChat's default
    # what null above means: null: what the adapter's run trained with (its data.default_system), else TeleChat's
    # default; "": no system block
    default_system: str | None = None
    device: str = "auto"
    max_input_tokens: int | None = setting(None, min=1)  # null: the model's training_seqlen minus max_tokens
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # a request's defaults
    lifetime: float | None = setting(None, gt=0)  # seconds after which the server stops by itself; null: never


@dataclass
class ExportGenerationConfig:
    """generation_config.json of an export: what `vllm serve` and transformers' generate() sample with by default.
    The defaults are the TeleChat2 release's recommended sampling (its own generation_config.json), sampling on
    (the release's file says do_sample false beside them, which makes transformers warn and ignore them)."""

    max_new_tokens: int = setting(4096, min=1)
    do_sample: bool = True
    temperature: float = setting(RELEASE_SAMPLING["temperature"], gt=0)
    top_p: float = setting(RELEASE_SAMPLING["top_p"], gt=0, max=1)
    top_k: int = setting(RELEASE_SAMPLING["top_k"], min=0)
    repetition_penalty: float = setting(RELEASE_SAMPLING["repetition_penalty"], gt=0)


@dataclass
class MergeModelConfig:
    path: str | None = None  # the base; null: the adapter's base_model_name_or_path


@dataclass
class MergeConfig:
    """`python merge.py` (conf/merge.yaml)."""

    model: MergeModelConfig = field(default_factory=MergeModelConfig)
    adapter_path: Any = setting("???", types=(str, list))  # an adapter directory, or a list merged in order
    export_dir: str = "???"
    export_size: float = setting(5.0, gt=0)  # shard size in GB
    export_device: str = setting("cpu", choices=("cpu", "auto"))
    export_legacy_format: bool = False  # false: safetensors; true: pytorch_model.bin
    dtype: str = setting("auto", choices=DTYPE_NAMES)  # auto: bfloat16 for an fp32 base, else the base's
    # merged: the base with the adapters merged in; vllm_adapter: the one adapter, unmerged, in the module layout
    # vLLM's TeleChat2 serves with --enable-lora (query -> q_proj, key_value split into k_proj/v_proj, dense -> o_proj)
    export_mode: str = setting("merged", choices=("merged", "vllm_adapter"))
    flash_attn: bool = False  # config.json's flash_attn, read by the release's own modeling files (needs flash-attn)
    seq_length: int | None = setting(None, min=1)  # null: the base's seq_length, else its training_seqlen
    generation: ExportGenerationConfig = field(default_factory=ExportGenerationConfig)
    # the exported chat template's system prompt for a conversation without one; null: what the adapters' run
    # trained with (its data.default_system), else TeleChat's default; "": no system block
    default_system: str | None = None


@dataclass
class InspectConfig:
    """`python -m telechat_lab.data.inspect` (conf/inspect.yaml)."""

    stage: StageConfig = field(default_factory=StageConfig)  # which records the data must hold (stages.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: str | None = None  # JSON lines {"input_ids", "labels"}, one per encoded example, in dataset order
    overwrite: bool = False  # replace an existing output file
    show: int = setting(3, min=0)  # examples printed with their trained tokens highlighted
    seed: int = setting(42, min=0, max=MAX_SEED)


@dataclass
class EvalDataConfig:
    """eval's `data`: which datasets to score (their template settings are the run's, from its config.yaml)."""

    dataset_dir: str = "data"  # holds dataset_info.json; relative: the working dir, else the bundled demo data
    datasets: Any = setting(None, types=(list, str))  # a list, or "a,b"; null: the run's validation split only
    max_samples: int | None = setting(None, min=1, hint="null takes every record")  # per dataset: its first N
    cache_dir: str | None = None  # encoded datasets; default $TELECHAT_LAB_CACHE


@dataclass
class EvalSettings:
    """eval's `eval` group of settings: what is scored and how."""

    split: str = setting("all", choices=("all", "val"))  # all: every example of data.datasets; val: run_dir's split
    batch_size: int = setting(8, min=1)  # prompts generated together (left-padded)
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task names (the `eval` extra)
    num_fewshot: int | None = setting(None, min=0)  # harness tasks: null: each task's own
    apply_chat_template: bool = False  # harness tasks: prompts in TeleChat2's chat template
    system_prompt: str | None = None  # harness tasks with apply_chat_template; null: the run's default system prompt
    limit: int | None = setting(None, min=1)  # harness tasks: the first N documents of each
    include_path: str | None = None  # harness tasks: a folder of more task YAML files
    summary_metric: str = "rouge-l"  # a sweep's summary: the metric the best job is chosen by (the highest)


@dataclass
class EvalConfig:
    """`telechat-lab eval` (conf/eval.yaml): generation metrics on a dataset or a run's validation split, and
    lm-evaluation-harness tasks."""

    run_dir: str | None = None  # a training run: its adapter (or model), its data and prompt settings
    sweep_dir: str | None = None  # a training sweep's directory: every job in it, and one summary table
    model: ChatModelConfig = field(default_factory=ChatModelConfig)  # a base or merged model; null: the run's base
    adapter_path: Any = setting(None, types=(str, list))  # adapters applied without merging (not with run_dir)
    engine: str = setting("huggingface", choices=("huggingface", "vllm"))
    default_system: str | None = None  # null: what the run / adapter trained with, else TeleChat's default
    device: str = "auto"
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    # greedy by default (do_sample=false); max_new_tokens: the longest reply generated
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=256, do_sample=False, repetition_penalty=1.0)
    )
    output_dir: str | None = None  # null: RUN/eval/<what> with run_dir, else outputs/eval/<what>
    overwrite: bool = False  # replace an output_dir that holds another eval (else: refused); a same one resumes
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


SCHEMAS: dict[str, type] = {
    "train": TrainConfig,
    "chat": ChatConfig,
    "merge": MergeConfig,
    "inspect": InspectConfig,
    "serve": ServeConfig,
    "eval": EvalConfig,
}


def register_schemas() -> None:
    """Make the dataclasses the `schema` group Hydra composes each primary config onto (`defaults: [schema: X]`),
    and an untyped copy of each (`schema=X_unchecked`: the same keys and defaults, no type checks) that the
    command-line check composes onto, so that every bad value reaches `config_problems` at once."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema, package="_global_")
        store.store(group="schema", name=f"{name}_unchecked", node=dataclasses.asdict(schema()), package="_global_")


register_schemas()
