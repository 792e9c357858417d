"""Engine and server options in the spellings users bring from vLLM and TensorRT-LLM, from flags and YAML.

One table (`SPECS`) names every option we know, each with all its spellings: our EngineArgs names, vLLM's
(`--max-num-seqs`, `--max-model-len`, ...) and TensorRT-LLM's (`--max_batch_size`, `--tp_size`, ...). Dashes and
underscores are interchangeable everywhere. An option is one of:
- mapped onto an EngineArgs field (`engine`) or a server setting (`server`);
- `accept`: we do what it asks already (e.g. `--backend pytorch`, `--enforce-eager`, `--tp_size 1`); another value
  is an error;
- `ignore`: known, but llamaserve does not act on it; it is logged once as ignored (e.g. vLLM's
  `compilation-config`);
- `refuse`: known and not supported; an error that says so (e.g. `speculative_config`).
Anything else is an error naming the option, with the closest known spelling.

YAML files: `--config FILE` (vLLM: flat keys, `no-<flag>: true` negates) and `--extra_llm_api_options FILE`
(TensorRT-LLM LlmArgs, with nested `kv_cache_config`, `cuda_graph_config`, `moe_config`) are read by the same
loader, so either file may use either vocabulary. Precedence follows each tool: `--config` < command-line flags <
`--extra_llm_api_options` (TensorRT-LLM's file overrides its flags).
"""

from __future__ import annotations

import argparse
import difflib
import logging
from dataclasses import dataclass
from typing import Any

from llamaserve.config import ConfigError, EngineArgs

logger = logging.getLogger("llamaserve.options")


@dataclass(frozen=True)
class Spec:
    names: tuple[str, ...]  # underscore spellings; the first is the canonical one
    target: str  # "engine:<field>", "server:<name>", "accept", "ignore", "refuse"
    kind: str = "str"  # str | int | float | bool | any (value kept as given)
    allowed: tuple = ()  # for "accept": values that need nothing from us
    reason: str = ""
    nested: dict[str, Spec] | None = None  # TensorRT-LLM sub-config keys
    help: str = ""


_IGNORED_PERF = "a performance knob of that engine; llamaserve's own defaults apply"
_CG = "an older spelling of TensorRT-LLM's CUDA-graph options; use cuda_graph_config (or cuda_graph_* options)"


def _s(names: str, target: str, kind: str = "str", **kw: Any) -> Spec:
    return Spec(tuple(names.split()), target, kind, **kw)


_KV_CACHE_CONFIG = {s.names[0]: s for s in [
    _s("dtype", "engine:kv_cache_dtype"),
    _s("free_gpu_memory_fraction", "engine:kv_cache_free_gpu_memory_fraction", "float"),
    _s("enable_block_reuse", "engine:enable_prefix_caching", "bool"),
    _s("tokens_per_block", "engine:block_size", "int"),
    _s("max_tokens", "engine:kv_cache_max_tokens", "int"),
]}
_CUDA_GRAPH_CONFIG = {s.names[0]: s for s in [
    _s("enable_padding", "engine:cuda_graph_padding", "bool"),
    _s("max_batch_size", "engine:cuda_graph_max_batch_size", "int"),
    _s("batch_sizes", "engine:cuda_graph_batch_sizes", "any"),
]}
_MOE_CONFIG = {s.names[0]: s for s in [
    _s("backend", "ignore", reason="llamaserve has one MoE implementation"),
    _s("max_num_tokens", "ignore", "int", reason=_IGNORED_PERF),
]}

SPECS: list[Spec] = [
    # -- the model
    _s("model", "engine:model", help="checkpoint dir, .gguf file, dummy preset, or nothing for bundled SmolLM2"),
    _s("tokenizer", "engine:tokenizer"),
    _s("dtype", "engine:dtype", help="auto | bfloat16 | float16 | float32"),
    _s("load_format", "engine:load_format", help="auto | safetensors | gguf | dummy"),
    _s("quantization q", "engine:quantization"),
    _s("seed", "engine:seed", "int"),
    _s("device", "engine:device", help="auto | cuda | cpu"),
    _s("kernel_backend", "engine:kernel_backend"),
    # -- batch and memory
    _s("max_batch_size max_num_seqs", "engine:max_batch_size", "int", help="sequences per step"),
    _s("max_num_tokens max_num_batched_tokens", "engine:max_num_tokens", "int", help="tokens per step"),
    _s("max_seq_len max_model_len", "engine:max_seq_len", "int", help="prompt + output tokens"),
    _s("kv_cache_free_gpu_memory_fraction kv_cache_free_gpu_mem_fraction",
       "engine:kv_cache_free_gpu_memory_fraction", "float", help="share of memory left after weights (0.9)"),
    _s("gpu_memory_utilization", "engine:gpu_memory_utilization", "float", help="vLLM: share of all GPU memory"),
    _s("kv_cache_dtype", "engine:kv_cache_dtype", help="auto | bf16 | fp8"),
    _s("block_size tokens_per_block", "engine:block_size", "int"),
    _s("num_kv_blocks num_gpu_blocks_override", "engine:num_kv_blocks", "int"),
    _s("cpu_kv_cache_gib", "engine:cpu_kv_cache_gib", "float"),
    _s("enable_chunked_prefill", "engine:enable_chunked_prefill", "bool"),
    _s("enable_prefix_caching", "engine:enable_prefix_caching", "bool"),
    _s("kv_cache_config", "nested", "any", nested=_KV_CACHE_CONFIG),
    # -- parallelism
    _s("tp_size tensor_parallel_size tp", "engine:tp_size", "int"),
    _s("ep_size moe_expert_parallel_size", "engine:ep_size", "int"),
    _s("pp_size pipeline_parallel_size pp", "accept", "int", allowed=(1,), reason="pipeline parallelism"),
    _s("data_parallel_size dp", "accept", "int", allowed=(1,), reason="data parallelism"),
    _s("enable_expert_parallel", "accept", "bool", allowed=(False,), reason="expert parallelism (use ep_size)"),
    _s("backend", "accept", allowed=("pytorch",), reason="backends other than pytorch"),
    _s("enforce_eager", "engine:enforce_eager", "bool", help="no CUDA graphs"),
    _s("cuda_graph_batch_sizes", "engine:cuda_graph_batch_sizes", "any", help="decode batch sizes to capture, "
       "e.g. 1,2,4,8 (default 1,2,4,8,16,... up to cuda_graph_max_batch_size)"),
    _s("cuda_graph_max_batch_size max_cudagraph_capture_size", "engine:cuda_graph_max_batch_size", "int"),
    _s("cuda_graph_padding cuda_graph_padding_enabled", "engine:cuda_graph_padding", "bool"),
    _s("enable_attention_dp", "ignore", "bool", reason="attention data parallelism is not implemented; with one "
       "GPU per model copy it changes nothing"),
    # -- server
    _s("host", "server:host"), _s("port", "server:port", "int"),
    _s("api_key", "server:api_key"), _s("served_model_name", "server:served_model_name"),
    _s("max_queue_size", "server:max_queue_size", "int"), _s("shutdown_timeout", "server:shutdown_timeout", "float"),
    _s("max_body_bytes", "server:max_body_bytes", "int"),
    _s("health_timeout", "server:health_timeout", "float",
       help="/health is 503 when the engine has not reported for this many seconds (60)"),
    _s("log_level uvicorn_log_level", "server:log_level"),
    # -- known, not acted on
    _s("trust_remote_code", "ignore", "bool", reason="llamaserve never runs code from a checkpoint; Llama is built in"),
    _s("compilation_config O", "ignore", "any", reason="torch.compile settings of vLLM"),
    _s("overlap_scheduling async_scheduling", "engine:overlap_scheduling", "bool",
       help="schedule step n+1 while the GPU runs step n (default: on with CUDA)"),
    _s("disable_overlap_scheduler", "engine:disable_overlap_scheduler", "bool"),
    _s("warmup", "engine:warmup", "bool", help="run a few dummy requests at start-up so the first users' batches "
       "find their kernels compiled (default: on with CUDA)"),
    _s("max_seq_len_to_capture", "ignore", "int", reason="vLLM's old capture limit; graphs cover decode batches"),
    _s("cuda_graph_config", "nested", "any", nested=_CUDA_GRAPH_CONFIG),
    _s("use_cuda_graph", "ignore", "bool", reason=_CG),
    _s("pytorch_backend_config", "ignore", "any", reason=_CG),
    _s("moe_config", "nested-ignore", "any", nested=_MOE_CONFIG, reason="MoE settings"),
    _s("attention_backend attn_backend", "ignore", reason="llamaserve picks its attention kernels itself"),
    _s("use_torch_sampler", "ignore", "bool", reason="llamaserve has one sampler"),
    _s("sampler_type", "ignore", reason="llamaserve has one sampler"),
    _s("print_iter_log enable_iter_perf_stats", "ignore", "bool", reason="per-step stats are in /metrics"),
    _s("stream_interval", "ignore", "int", reason="llamaserve streams every token"),
    _s("enable_min_latency enable_autotuner", "ignore", "bool", reason=_IGNORED_PERF),
    _s("num_postprocess_workers", "ignore", "int", reason="detokenizing runs in the HTTP process"),
    _s("disable_log_requests enable_log_requests disable_log_stats disable_uvicorn_access_log", "ignore", "bool",
       reason="logging switches of vLLM"),
    _s("tokenizer_mode", "ignore", reason="llamaserve always uses the fast (Rust) tokenizer"),
    _s("limit_mm_per_prompt", "ignore", "any", reason="llamaserve serves text only"),
    _s("swap_space", "ignore", "float", reason="preempted requests are recomputed, never swapped"),
    _s("disable_custom_all_reduce", "ignore", "bool", reason="single-GPU engine"),
    _s("distributed_executor_backend", "ignore", reason="single-GPU engine"),
    _s("generation_config", "ignore", reason="sampling defaults are OpenAI's unless a request sets them"),
    _s("enable_auto_tool_choice", "ignore", "bool", reason="tool calling is not implemented"),
    _s("tool_call_parser reasoning_parser", "ignore", reason="tool calling and reasoning parsing are not implemented"),
    # -- known, not supported
    _s("speculative_config speculative_model", "refuse", "any", reason="speculative decoding is not supported"),
    _s("enable_lora lora_modules", "refuse", "any", reason="LoRA adapters are not supported"),
]

_BY_NAME: dict[str, Spec] = {n: s for s in SPECS for n in s.names}
_logged: set[str] = set()


def _norm(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def _unknown(key: str, where: str, known: dict[str, Spec]) -> ConfigError:
    close = difflib.get_close_matches(_norm(key), list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown option {key!r}{hint} (see `llamaserve serve --help`)")


def _convert(spec: Spec, key: str, value: Any, where: str) -> Any:
    kind = spec.kind
    ok = (kind == "any" or value is None
          or (kind == "bool" and isinstance(value, bool))
          or (kind == "int" and isinstance(value, int) and not isinstance(value, bool))
          or (kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool))
          or (kind == "str" and isinstance(value, (str, int, float)) and not isinstance(value, bool)))
    if not ok:
        raise ConfigError(f"{where}: option {key!r} wants a {kind}, got {value!r}")
    if kind == "float" and value is not None:
        return float(value)
    if kind == "str" and value is not None:
        return str(value)
    return value


def _ignore_once(key: str, value: Any, reason: str, where: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning("ignoring %s=%r (%s): %s", key, value, where, reason)


def apply_option(key: str, value: Any, where: str, out: dict[str, Any],
                 table: dict[str, Spec] | None = None, prefix: str = "") -> None:
    """Resolve one option into `out` ({"engine:field" | "server:name": value}); raise on unknown/refused."""
    table = table if table is not None else _BY_NAME
    norm = _norm(key)
    spec = table.get(norm)
    if spec is None and norm.startswith("no_") and (neg := table.get(norm[3:])) is not None and neg.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: option {key!r} wants true or false, got {value!r}")
        spec, value, norm = neg, not value, norm[3:]
    if spec is None:
        raise _unknown(prefix + key, where, table)
    name = prefix + spec.names[0]
    if spec.target in ("nested", "nested-ignore"):
        if value is None:
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: option {name!r} must be a mapping of sub-options, got {value!r}")
        for k, v in value.items():
            apply_option(k, v, where, out, spec.nested, name + ".")
        return
    value = _convert(spec, key, value, where)
    if spec.target.startswith(("engine:", "server:")):
        out[spec.target] = value
    elif spec.target == "accept":
        if value not in spec.allowed:
            raise ConfigError(f"{where}: {name}={value!r} is not supported ({spec.reason} is not implemented); "
                              f"use {' or '.join(map(repr, spec.allowed))}")
    elif spec.target == "ignore":
        _ignore_once(name, value, spec.reason, where)
    elif spec.target == "refuse":
        raise ConfigError(f"{where}: {name} is not supported: {spec.reason}. Remove it.")


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        apply_option(str(key), value, path, out)
    return out


# ---- argparse ----
def _bool_arg(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


_ARG_TYPES = {"int": int, "float": float, "str": str, "any": str}


def _flags(name: str) -> list[str]:
    dash = "-" if len(name) <= 2 else "--"
    return sorted({dash + name, dash + name.replace("_", "-")}, key=lambda f: "_" in f)


def add_options(parser: argparse.ArgumentParser, server: bool) -> None:
    """Add every known flag (all spellings). Values land in `ns.opt__<canonical>`; nothing has a default."""
    eng = parser.add_argument_group("engine (vLLM and TensorRT-LLM spellings both work)")
    srv = parser.add_argument_group("server") if server else None
    ign = parser.add_argument_group("accepted for compatibility (logged as ignored, or checked)")
    for spec in SPECS:
        if spec.target.startswith("server:") and not server:
            continue
        group = eng if spec.target.startswith(("engine:", "nested")) else srv if spec.target.startswith(
            "server:") else ign
        flags = [f for n in spec.names for f in _flags(n)]
        dest = "opt__" + spec.names[0]
        if spec.target.startswith("nested"):
            continue  # nested TensorRT-LLM configs come from YAML only
        if spec.kind == "bool":
            group.add_argument(*flags, dest=dest, nargs="?", const=True, type=_bool_arg, default=None,
                               metavar="BOOL", help=spec.help or spec.reason or None)
            group.add_argument(*[f"--no-{n.replace('_', '-')}" for n in spec.names], dest=dest,
                               action="store_const", const=False, help=argparse.SUPPRESS)
        else:
            group.add_argument(*flags, dest=dest, type=_ARG_TYPES[spec.kind], default=None,
                               metavar=spec.kind.upper() if spec.kind != "any" else "VALUE",
                               help=spec.help or spec.reason or None)
    parser.add_argument("--config", dest="opt_files_config", default=None, metavar="FILE.yaml",
                        help="vLLM-style YAML of options (flags on the command line override it)")
    parser.add_argument("--extra_llm_api_options", "--extra-llm-api-options", dest="opt_files_extra", default=None,
                        metavar="FILE.yaml", help="TensorRT-LLM LlmArgs YAML (overrides command-line flags)")


def resolve(ns: argparse.Namespace) -> tuple[EngineArgs, dict[str, Any]]:
    """Merge YAML files and flags into EngineArgs and a dict of server settings."""
    merged: dict[str, Any] = {}
    if ns.opt_files_config:
        merged.update(load_yaml(ns.opt_files_config))
    cli: dict[str, Any] = {}
    for spec in SPECS:
        value = getattr(ns, "opt__" + spec.names[0], None)
        if value is not None:
            apply_option(spec.names[0], value, "command line", cli)
    merged.update(cli)
    if ns.opt_files_extra:
        merged.update(load_yaml(ns.opt_files_extra))
    if getattr(ns, "model_positional", None):
        merged["engine:model"] = ns.model_positional
    engine = {k.split(":", 1)[1]: v for k, v in merged.items() if k.startswith("engine:")}
    if (max_tokens := engine.pop("kv_cache_max_tokens", None)) is not None:  # TensorRT-LLM kv_cache_config
        engine["num_kv_blocks"] = -(-max_tokens // engine.get("block_size", EngineArgs.block_size))
    server = {k.split(":", 1)[1]: v for k, v in merged.items() if k.startswith("server:")}
    return EngineArgs(**engine), server
