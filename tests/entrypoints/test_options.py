"""Flags and YAML files in vLLM and TensorRT-LLM spellings: the guides' files load verbatim, unknowns are errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from llamaserve.config import ConfigError, EngineArgs
from llamaserve.entrypoints import options
from llamaserve.entrypoints.cli import build_parser

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def parse(*argv: str):
    ns = build_parser().parse_args(["serve", *argv])
    return options.resolve(ns)


@pytest.fixture(autouse=True)
def _fresh_log_once():
    options._logged.clear()


def test_trtllm_quick_start_command_and_yaml(caplog):
    caplog.set_level(logging.WARNING, "llamaserve.options")
    args, server = parse(
        "llama-3.3-70b", "--host", "0.0.0.0", "--port", "8000", "--backend", "pytorch", "--max_batch_size", "1024",
        "--max_num_tokens", "2048", "--max_seq_len", "2048", "--kv_cache_free_gpu_memory_fraction", "0.9",
        "--tp_size", "1", "--ep_size", "1", "--trust_remote_code",
        "--extra_llm_api_options", str(RECIPES / "trtllm-llama4-scout.yaml"))
    assert (args.model, args.max_batch_size, args.max_num_tokens, args.max_seq_len) == ("llama-3.3-70b", 1024, 2048,
                                                                                        2048)
    assert args.kv_cache_free_gpu_memory_fraction == 0.9 and args.tp_size == 1 and args.ep_size == 1
    assert args.kv_cache_dtype == "fp8"
    assert server == {"host": "0.0.0.0", "port": 8000}
    logged = caplog.text
    for key in ("trust_remote_code", "enable_attention_dp"):
        assert f"ignoring {key}=" in logged, key
    assert args.cuda_graph_padding is True and args.cuda_graph_max_batch_size == 1024


def test_trtllm_llama33_config_file():
    args, _ = parse("--extra_llm_api_options", str(RECIPES / "trtllm-llama-3.3-70b.yaml"))
    assert (args.max_batch_size, args.max_num_tokens, args.kv_cache_dtype) == (1024, 2048, "fp8")
    assert args.kv_cache_free_gpu_memory_fraction == 0.9 and args.tp_size == 1 and args.ep_size == 1


@pytest.mark.parametrize("name", ["vllm-Llama4_Hopper.yaml", "vllm-Llama4_Blackwell.yaml", "vllm-Llama3.3_Hopper.yaml"])
def test_vllm_recipe_yamls(name, caplog):
    caplog.set_level(logging.WARNING, "llamaserve.options")
    args, _ = parse("llama-3.3-70b", "--config", str(RECIPES / name), "--tensor-parallel-size", "1",
                    "--max-num-seqs", "512", "--max-model-len", "10240")
    assert args.kv_cache_dtype == "fp8" and args.enable_prefix_caching is False
    assert (args.max_num_tokens, args.max_batch_size, args.max_seq_len, args.tp_size) == (8192, 512, 10240, 1)
    assert args.overlap_scheduling is True and "async_scheduling" not in caplog.text  # acted on, not ignored
    if "Blackwell" in name:
        assert "ignoring compilation_config=" in caplog.text


def test_ignored_option_is_logged_once(caplog, tmp_path):
    caplog.set_level(logging.WARNING, "llamaserve.options")
    parse("--trust-remote-code", "--trust_remote_code")
    parse("--trust-remote-code")
    assert caplog.text.count("ignoring trust_remote_code") == 1


@pytest.mark.parametrize("argv,value", [
    (["--max-num-seqs", "7"], 7), (["--max_batch_size", "7"], 7), (["--max-batch-size", "7"], 7)])
def test_spellings_are_interchangeable(argv, value):
    assert parse(*argv)[0].max_batch_size == value


def test_bool_flags_take_vllm_and_value_forms():
    assert parse("--no-enable-prefix-caching")[0].enable_prefix_caching is False
    assert parse("--enable-prefix-caching")[0].enable_prefix_caching is True
    assert parse("--enable_prefix_caching", "false")[0].enable_prefix_caching is False
    assert parse("--warmup", "false")[0].warmup is False and parse()[0].warmup is None  # None: on with CUDA
    assert parse("--no-enable-chunked-prefill")[0].enable_chunked_prefill is False


def test_precedence_config_then_flags_then_trtllm_file(tmp_path):
    vllm = tmp_path / "v.yaml"
    vllm.write_text("max-num-seqs: 3\nmax-num-batched-tokens: 512\n")
    trt = tmp_path / "t.yaml"
    trt.write_text("max_batch_size: 9\n")
    args, _ = parse("--config", str(vllm), "--max-num-seqs", "5")
    assert (args.max_batch_size, args.max_num_tokens) == (5, 512)
    args, _ = parse("--config", str(vllm), "--max-num-seqs", "5", "--extra_llm_api_options", str(trt))
    assert args.max_batch_size == 9


def test_kv_cache_config_maps_onto_engine_fields(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("kv_cache_config:\n  dtype: fp8\n  free_gpu_memory_fraction: 0.75\n  enable_block_reuse: false\n"
                 "  tokens_per_block: 32\n  max_tokens: 100\n")
    args, _ = parse("--extra_llm_api_options", str(f))
    assert (args.kv_cache_dtype, args.kv_cache_free_gpu_memory_fraction, args.enable_prefix_caching) == (
        "fp8", 0.75, False)
    assert args.block_size == 32 and args.num_kv_blocks == 4


@pytest.mark.parametrize("text,match", [
    ("max_batch_sise: 4\n", r"unknown option 'max_batch_sise'.*did you mean 'max_batch_size'"),
    ("kv_cache_config:\n  dtyp: fp8\n", r"unknown option 'kv_cache_config.dtyp'"),
    ("speculative_config:\n  decoding_type: Eagle\n", "speculative decoding is not supported"),
    ("backend: tensorrt\n", "backends other than pytorch"),
    ("pipeline_parallel_size: 2\n", "pipeline parallelism"),
    ("max_batch_size: many\n", "wants a int"),
    ("- a\n- b\n", "must be a mapping"),
    ("kv_cache_config: 3\n", "must be a mapping of sub-options"),
    ("max_batch_size: [1\n", "not valid YAML"),
])
def test_bad_yaml_names_the_option(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse("--extra_llm_api_options", str(f))


def test_unknown_flag_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit):
        parse("--max-num-seqz", "4")
    assert "--max-num-seqz" in capsys.readouterr().err


def test_missing_config_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse("--config", "/nonexistent.yaml")


def test_gpu_memory_utilization_and_fraction_are_exclusive():
    args, _ = parse("--gpu-memory-utilization", "0.8", "--kv_cache_free_gpu_memory_fraction", "0.9",
                    "--device", "cpu")
    with pytest.raises(ConfigError, match="not both"):
        args.create_engine_config()


def test_every_spec_has_a_working_flag():
    """Each non-nested option parses from the command line (catches argparse conflicts and typos)."""
    parser = build_parser()
    for spec in options.SPECS:
        if spec.target.startswith("nested"):
            continue
        flag = ("-" if len(spec.names[0]) <= 2 else "--") + spec.names[0].replace("_", "-")
        val = {"int": "1", "float": "0.5", "str": "x", "any": "x", "bool": "true"}[spec.kind]
        ns = parser.parse_args(["serve", flag, val])
        assert getattr(ns, "opt__" + spec.names[0]) is not None, flag


TRTLLM_MAVERICK_MAX_THROUGHPUT = """enable_attention_dp: true
stream_interval: 2
cuda_graph_config:
  max_batch_size: 512
  enable_padding: true
"""
TRTLLM_BENCH_LLM_OPTIONS = """cuda_graph_config:
  enable_padding: true
  batch_sizes: [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 1024, 2048, 4096, 8192]
"""
TRTLLM_V020_FLAT = """use_cuda_graph: true
cuda_graph_padding_enabled: true
cuda_graph_batch_sizes: [1, 2, 4]
print_iter_log: true
"""


@pytest.mark.parametrize("text", [TRTLLM_MAVERICK_MAX_THROUGHPUT, TRTLLM_BENCH_LLM_OPTIONS, TRTLLM_V020_FLAT])
def test_other_published_trtllm_files_load(tmp_path, text, caplog):
    caplog.set_level(logging.WARNING, "llamaserve.options")
    f = tmp_path / "extra.yaml"
    f.write_text(text)
    args, _ = parse("--extra_llm_api_options", str(f))
    assert args.max_batch_size == 256
    assert args.cuda_graph_padding is True  # every one of these files asks for padded CUDA graphs
    if "batch_sizes" in text:
        assert args.cuda_graph_batch_sizes[:3] == [1, 2, 4]
    if "stream_interval" in text or "print_iter_log" in text:
        assert "ignoring" in caplog.text


def test_trtllm_eagle_file_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("enable_autotuner: false\nenable_attention_dp: false\nenable_min_latency: true\ncuda_graph_config:\n"
                 "  max_batch_size: 8\nspeculative_config:\n  decoding_type: Eagle\n  max_draft_len: 3\n"
                 "kv_cache_config:\n  enable_block_reuse: false\n")
    with pytest.raises(ConfigError, match="speculative_config is not supported"):
        parse("--extra_llm_api_options", str(f))


def test_every_engine_field_has_an_option():
    from llamaserve.config import EngineArgs

    targets = {s.target.split(":", 1)[1] for s in options.SPECS if s.target.startswith("engine:")}
    assert set(EngineArgs.field_names()) <= targets


def test_cuda_graph_options_resolve(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("cuda_graph_config:\n  enable_padding: false\n"
                 "  batch_sizes: [1, 2, 4, 8, 16, 32, 64, 128, 256, 384]\n")
    args, _ = parse("--extra_llm_api_options", str(f), "--max_batch_size", "64")
    assert args.cuda_graph_padding is False
    assert args.cuda_graph_batch_sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384]
    import torch

    # sizes above max_batch_size are dropped; none are captured without CUDA, or with enforce_eager
    assert args._cuda_graph_sizes(torch.device("cuda"), "triton") == [1, 2, 4, 8, 16, 32, 64]
    assert args._cuda_graph_sizes(torch.device("cpu"), "torch") == []
    args, _ = parse("--cuda-graph-batch-sizes", "1,3,5", "--enforce-eager")
    assert args.cuda_graph_batch_sizes == "1,3,5" and args._cuda_graph_sizes(torch.device("cuda"), "triton") == []
    args, _ = parse("--max-num-seqs", "20", "--max-cudagraph-capture-size", "12")
    assert args._cuda_graph_sizes(torch.device("cuda"), "triton") == [1, 2, 4, 8, 12]
    args, _ = parse("--cuda-graph-batch-sizes", "1,x")
    with pytest.raises(ConfigError, match="cuda_graph_batch_sizes"):
        args._cuda_graph_sizes(torch.device("cuda"), "triton")


def test_overlap_scheduling_spellings():
    assert parse("--disable_overlap_scheduler")[0].disable_overlap_scheduler is True
    assert parse("--async-scheduling")[0].overlap_scheduling is True
    assert parse("--no-async-scheduling")[0].overlap_scheduling is False
    cfg = EngineArgs(model="smollm2-135m", load_format="dummy", device="cpu")
    assert cfg.create_engine_config().overlap_scheduling is False  # auto: on with CUDA only
    cfg = EngineArgs(model="smollm2-135m", load_format="dummy", device="cpu", overlap_scheduling=True)
    assert cfg.create_engine_config().overlap_scheduling is True
    with pytest.raises(ConfigError, match="disable_overlap_scheduler"):
        EngineArgs(model="smollm2-135m", load_format="dummy", device="cpu", overlap_scheduling=True,
                   disable_overlap_scheduler=True).create_engine_config()


@pytest.mark.parametrize("flags", [
    ["--extra_llm_api_options", str(RECIPES / "trtllm-llama4-scout.yaml"), "--max_batch_size", "512",
     "--max_num_tokens", "2048", "--max_seq_len", "2048", "--tp_size", "1", "--ep_size", "1"],
    ["--config", str(RECIPES / "vllm-Llama4_Hopper.yaml"), "--tensor-parallel-size", "1", "--max-model-len", "8192"],
    ["--config", str(RECIPES / "vllm-Llama4_Blackwell.yaml"), "--tensor-parallel-size", "1",
     "--max-model-len", "8192"],
])
def test_llama4_recipes_build_an_engine_config(flags):
    """The guides' Llama 4 settings, with the Scout preset, resolve all the way to an engine configuration (the
    weights themselves need the GPU machine)."""
    args, _ = parse("llama-4-scout", "--load-format", "dummy", "--device", "cpu", *flags)
    cfg = args.create_engine_config()
    assert cfg.model_config.hf_config.num_local_experts == 16
    assert cfg.cache_config.kv_cache_dtype == torch.float8_e4m3fn
