"""Shared fixtures: small converted HRNets, built once per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# kernel choices by the analytical cost model, not by timings measured on the test machine (which
# would make the strategies tests see depend on the machine's load); the tuner's tests turn it on
os.environ.setdefault("ANYTIMEIFY_TUNE", "off")

import pytest
import torch

import anytimeify
from anytimeify.models import hrnet_seg

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def w18():
    torch.manual_seed(0)
    return hrnet_seg("w18_small_v2", num_classes=5).eval()


@pytest.fixture(scope="session")
def w18_rh(w18):
    return anytimeify.convert(w18, head="redesigned").eval()


@pytest.fixture(scope="session")
def w18_ee(w18):
    return anytimeify.convert(w18, head="original").eval()


@pytest.fixture
def image():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


# --- the thorough tier ----------------------------------------------------------------------------
# The default run (`python3 -m pytest -q`, README's test command) stays under 5 minutes on 2 cores;
# these tests are the thorough tier, run by `pytest -m slow` (`.ci/run` runs both and prints the
# slowest tests of each, which is how this list is kept up to date). Tests marked in their own file
# with @pytest.mark.slow belong to it too. Each entry is a node id or the start of one.
THOROUGH = {
    "tests/test_bench.py::test_stage_profile_sets_every_stage_beside_the_dense_runtimes":
        "exports HRNet to ONNX and profiles it in two runtimes (~15 s)",
    "tests/test_bench.py::test_ca_speedup_reports_a_runtime_that_fails": "a benchmark run (~7 s)",
    "tests/test_bench.py::test_onnx_nodes_map_to_the_modules_they_came_from": "an ONNX export (~4 s)",
    "tests/test_demo.py::test_a_loaded_machine_trains_the_same_steps_and_says_so": "trains the demo twice (~7 s)",
    "tests/test_recipes.py::test_eval_json_lists_each_exits_metric_and_gflops": "trains and evaluates a recipe (~5 s)",
    "tests/test_kernel_isas.py": "compiles the kernels once per instruction set",
    "tests/test_train_ddp.py": "torchrun with two processes",
    "tests/test_docs.py::test_the_pages_code_runs[docs/": "every documentation page's code (README's runs by default)",
    "tests/test_recipes.py::test_every_recipe_trains_resumes_and_evaluates[cityscapes/hrnet_w48": "W48 recipes",
    "tests/test_recipes.py::test_every_recipe_trains_resumes_and_evaluates[mpii/": "pose recipes",
    "tests/test_recipes.py::test_two_gloo_processes_evaluate_as_one": "torchrun with two processes",
    "tests/test_defects.py::test_export_under_no_grad_matches_eager": "torch.export of a whole HRNet",
    "tests/test_defects.py::test_whole_model_pickle_round_trip_with_confidence": "pickles whole models",
    "tests/test_flops.py::test_counts_scale_exactly_with_area": "FLOP counts at several large sizes",
    "tests/test_flops.py::test_reproduces_reference_flops_and_params[w48": "W48 (the W18 counts run by default)",
    "tests/test_export.py::test_onnx": "ONNX conversion of every segment",
    "tests/test_export.py::test_save_and_load": "torch.export save and load of every segment",
    "tests/test_classify.py::test_budgets_on_a_dense_model_leave_per_image_and_score_with_the_metric": "budget sweep",
    "tests/test_checkpoint.py::test_reference_ee_checkpoint_loads_into_original_heads": "W48 checkpoint layout",
    "tests/test_ranet.py::test_imagenet_ops_and_params": "the ImageNet RANet",
    "tests/test_bench.py::test_ca_speedup_reports_the_paper_counts": "benchmark runs",
    "tests/test_bench.py::test_profile_names_the_compiled_kernels": "benchmark runs",
    "tests/test_bench.py::test_layer_profile_covers_every_stage": "benchmark runs",
    "tests/test_cli.py::test_stream_table_runs_as_a_console_script": "a console-script subprocess",
    "tests/test_cli.py::test_model_specs_and_checkpoints_for_flops_and_inspect": "timm and smp models end to end",
    "tests/test_demo.py::test_demo_trains_evaluates_writes_and_reuses": "trains and evaluates the demo twice",
    # the slowest of the default run (pytest --durations), each covered in kind by a faster test there
    "tests/test_reference_outputs.py::test_outputs_equal_the_reference[w48": "W48 (the W18 vectors run by default)",
    "tests/test_reference_outputs.py::test_pose_network_equals_the_hrnet_pose_code": "the W32 pose network",
    "tests/test_recipes.py::test_the_pose_evaluation_averages_each_exit_with_the_mirrored_image": "pose evaluation",
    "tests/test_recipes.py::test_eval_reference_evaluates_a_checkpoint_of_the_reference_code": "a whole evaluation",
    "tests/test_confidence.py::test_auto_execution_is_dense_under_autograd_and_sparse_without": "several passes",
    "tests/test_confidence.py::test_mask_aware_flops": "FLOP counts of several masked models",
    "tests/test_confidence.py::test_threshold_above_one_changes_nothing": "two conversions per execution",
    "tests/test_confidence.py::test_switching_confidence_on_after_some_epochs": "training steps",
    "tests/test_confidence.py::test_frozen_model_computes_the_same[False]": "the CA case runs by default",
    "tests/test_confidence.py::test_frozen_model_reads_only_what_it_wrote": "freezes and runs twice",
    "tests/test_confidence.py::test_heatmap_criterion_for_pose": "the pose network",
    "tests/test_core.py::test_interleaved_generators_and_changing_sizes": "several sizes",
    "tests/test_core.py::test_every_parameter_gets_a_gradient": "a backward pass of every exit",
    "tests/test_core.py::test_exit_output_fields": "several conversions",
    "tests/test_core.py::test_pose_network_converts": "the pose network",
    "tests/test_core.py::test_split_execution_equals_unsplit[w18_ee]": "the w18_rh case runs by default",
    "tests/test_core.py::test_train_mode_matches_base_in_train_mode": "train-mode graphs",
    "tests/test_core.py::test_explicit_exit_names": "several conversions",
    "tests/test_saving.py::test_round_trip_of_timm_smp_and_ranet_models": "timm, smp and RANet models",
    "tests/test_saving.py::test_an_unknown_base_network_needs_a_source": "three saves (trust: test_security)",
    "tests/test_saving.py::test_a_deadline_never_starts_a_segment_that_cannot_finish": "profiles latency",
    "tests/test_saving.py::test_a_deadline_needs_a_profile_and_profile_latency_makes_one": "profiles latency",
    "tests/test_saving.py::test_a_frozen_model_saves_as_its_source_and_loads_frozen": "freezes, saves, loads",
    "tests/test_visualize.py::test_visualize_draws_every_exit_of_a_saved_model": "draws a figure of every exit",
    "tests/test_classify.py::test_ranet_per_sample_early_exit": "RANet on many samples",
    "tests/test_bad_values.py::test_torch_compile_of_a_model_with_confidence_adaptivity": "torch.compile in a subprocess",
    "tests/test_train.py::test_resume_continues_bit_identically_on_cpu": "three short training runs",
    "tests/test_train.py::test_two_iterations_of_segmentation_from_the_command_line": "a training run",
    "tests/test_train.py::test_a_checkpoint_of_another_model_fails_naming_the_keys_and_changes_nothing": "two models",
    "tests/test_train_faults.py::test_resume_refuses_a_config_that_trains_differently": "several training runs",
    "tests/test_tune.py::test_tune_command": "measures kernels",
    "tests/test_saving.py::test_round_trip_is_exact_for_the_papers_models[ee": "the adpc case runs by default",
    "tests/test_zoo.py::test_smp_model_converts[UnetPlusPlus-mobilenet_v2]": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_smp_model_converts[Unet-tu-": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_smp_model_converts[FPN-efficientnet-b0]": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_smp_model_converts[DeepLabV3Plus-tu-": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_smp_model_converts[PSPNet-mobilenet_v2]": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_smp_model_converts[Linknet-tu-": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_smp_model_converts[UPerNet-tu-": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_smp_model_converts[Segformer-tu-": "the resnet18 encoders run by default",
    "tests/test_zoo.py::test_timm_backbone_converts[densenet]": "convnext, hrnet and resnet run by default",
    "tests/test_zoo.py::test_timm_backbone_converts[dla]": "convnext, hrnet and resnet run by default",
    "tests/test_zoo.py::test_timm_backbone_converts[efficientnet]": "convnext, hrnet and resnet run by default",
    "tests/test_zoo.py::test_timm_backbone_converts[mobilenetv3]": "convnext, hrnet and resnet run by default",
    "tests/test_zoo.py::test_timm_backbone_converts[regnet]": "convnext, hrnet and resnet run by default",
    "tests/test_zoo.py::test_timm_backbone_converts[resnext]": "convnext, hrnet and resnet run by default",
    "tests/test_tune.py::test_tune_a_model_ahead": "measures a model's kernels",
    "tests/test_flops.py::test_flops_cli_json": "the flops command end to end",
}


def pytest_collection_modifyitems(config, items):
    matched = set()
    files = {item.nodeid.split("::")[0] for item in items}
    for item in items:
        for prefix in THOROUGH:
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.slow)
                matched.add(prefix)
    stale = [p for p in THOROUGH if p.split("::")[0] in files and p not in matched]
    if stale and not config.getoption("keyword") and not config.getoption("deselect"):
        raise pytest.UsageError(f"tests/conftest.py THOROUGH names tests that do not exist: {stale}")
