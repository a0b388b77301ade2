"""The onnxruntime options a model uploaded to a device server may set: allow-lists, key by key.

Session options, session config entries and provider options include settings that make
onnxruntime write or read files (`optimized_model_filepath`, `profile_file_prefix`,
`trt_engine_cache_path`, `session.optimized_model_external_initializers_file_name`...) or load a
library (`trt_engine_decryption_lib_path`). Only the settings listed here, none of which names a
file, reach onnxruntime from an uploaded MLmodel; a local `runtime.init` takes any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.runtime.base import check_option_type, refused_option

_VALUE = (str, int, float, bool)  # onnxruntime takes config entries and provider options as strings

TOP_LEVEL = {"providers": (str, list), "provider_options": list, "sess_options": dict}

SESSION_ATTRIBUTES = {
    "intra_op_num_threads": int,
    "inter_op_num_threads": int,
    "graph_optimization_level": (str, int),
    "execution_mode": (str, int),
    "execution_order": (str, int),
    "enable_cpu_mem_arena": bool,
    "enable_mem_pattern": bool,
    "enable_mem_reuse": bool,
    "use_deterministic_compute": bool,
    "use_per_session_threads": bool,
    "log_severity_level": int,
    "log_verbosity_level": int,
}

SESSION_CONFIG_KEYS = frozenset(
    {
        "session.intra_op.allow_spinning",
        "session.inter_op.allow_spinning",
        "session.force_spinning_stop",
        "session.set_denormal_as_zero",
        "session.disable_prepacking",
        "session.use_env_allocators",
        "session.use_device_allocator_for_initializers",
        "session.intra_op_thread_affinities",
        "session.dynamic_block_base",
        "session.disable_cpu_ep_fallback",
        "session.disable_quant_qdq",
        "session.disable_double_qdq_remover",
        "session.enable_quant_qdq_cleanup",
    }
)

PROVIDER_OPTIONS = {
    "CPUExecutionProvider": frozenset(),
    "CUDAExecutionProvider": frozenset(
        {
            "device_id",
            "gpu_mem_limit",
            "arena_extend_strategy",
            "cudnn_conv_algo_search",
            "cudnn_conv_use_max_workspace",
            "cudnn_conv1d_pad_to_nc1d",
            "do_copy_in_default_stream",
            "enable_cuda_graph",
            "prefer_nhwc",
            "use_tf32",
            "tunable_op_enable",
            "tunable_op_tuning_enable",
            "tunable_op_max_tuning_duration_ms",
        }
    ),
    "TensorrtExecutionProvider": frozenset(
        {
            "device_id",
            "trt_max_workspace_size",
            "trt_max_partition_iterations",
            "trt_min_subgraph_size",
            "trt_fp16_enable",
            "trt_int8_enable",
            "trt_bf16_enable",
            "trt_dla_enable",
            "trt_dla_core",
            "trt_builder_optimization_level",
            "trt_auxiliary_streams",
            "trt_cuda_graph_enable",
            "trt_layer_norm_fp32_fallback",
            "trt_force_sequential_engine_build",
            "trt_context_memory_sharing_enable",
            "trt_sparsity_enable",
            "trt_build_heuristics_enable",
        }
    ),
    "ROCMExecutionProvider": frozenset(
        {"device_id", "gpu_mem_limit", "arena_extend_strategy", "do_copy_in_default_stream", "tunable_op_enable"}
    ),
    "OpenVINOExecutionProvider": frozenset(
        {"device_type", "precision", "num_of_threads", "num_streams", "enable_opencl_throttling"}
    ),
    "XnnpackExecutionProvider": frozenset({"intra_op_num_threads"}),
    "DmlExecutionProvider": frozenset({"device_id", "performance_preference", "device_filter"}),
    "CoreMLExecutionProvider": frozenset({"ModelFormat", "MLComputeUnits", "RequireStaticInputShapes"}),
}


def check(options: Mapping[str, Any], where: str) -> None:
    """The nested onnxruntime options (the top-level keys and types are checked already)."""
    providers = options.get("providers", ["CPUExecutionProvider"])
    providers = [providers] if isinstance(providers, str) else providers
    names = []
    for i, entry in enumerate(providers):
        if isinstance(entry, str):
            names.append(entry)
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise InvalidInputError(f"{where}.providers[{i}] must be a provider name or a [name, options] pair")
        check_option_type(f"{where}.providers[{i}][1]", entry[1], dict)
        _check_provider(entry[0], entry[1], f"{where}.providers[{i}][1]")
        names.append(entry[0])
    provider_options = options.get("provider_options")
    if provider_options is not None:
        if len(provider_options) != len(names):
            raise InvalidInputError(
                f"{where}.provider_options has {len(provider_options)} entries but providers has {len(names)}"
            )
        for i, (name, extra) in enumerate(zip(names, provider_options)):
            check_option_type(f"{where}.provider_options[{i}]", extra, dict)
            _check_provider(name, extra, f"{where}.provider_options[{i}]")
    for key, value in options.get("sess_options", {}).items():
        path = f"{where}.sess_options.{key}"
        if key in SESSION_ATTRIBUTES:
            check_option_type(path, value, SESSION_ATTRIBUTES[key])
        elif key in SESSION_CONFIG_KEYS:
            check_option_type(path, value, _VALUE)
        else:
            raise refused_option(path, "onnx sess_options", [*SESSION_ATTRIBUTES, *SESSION_CONFIG_KEYS])


def _check_provider(provider: str, options: Mapping[str, Any], where: str) -> None:
    allowed = PROVIDER_OPTIONS.get(provider, frozenset())
    for key, value in options.items():
        if key not in allowed:
            raise refused_option(f"{where}.{key}", f"onnx provider {provider}", allowed)
        check_option_type(f"{where}.{key}", value, _VALUE)
