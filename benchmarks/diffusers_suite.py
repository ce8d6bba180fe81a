"""diffusers' own model tests (a checkout's tests/, e.g. v0.40.0) run three ways: unpatched, fastcm.patch(impl="torch")
and fastcm.patch(impl="triton") (interpreted Triton on CPU, a named subset under a time cap):

    make diffusers-suite DIFFUSERS_TESTS=/path/to/diffusers/tests   # -> benchmarks/results/diffusers-suite.md

Every ``ModelMixin`` is patched after its outermost construction (benchmarks/diffusers_suite_plugin.py). The tests
that download from the Hub are deselected in every run (this harness runs offline). Needs diffusers' test extras
in the environment (see EXTRAS): without peft, for one, diffusers skips its 14 PEFT/LoRA model tests (217 instead
of 231 pass unpatched), so the harness refuses to run without them.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# pip name -> module: what diffusers' model tests import or skip without (require_peft_backend needs peft+transformers)
EXTRAS = {"accelerate": "accelerate", "parameterized": "parameterized", "requests-mock": "requests_mock",
          "transformers": "transformers", "peft": "peft"}
FILES = [
    "models/unets/test_models_unet_2d.py",
    "models/unets/test_models_unet_2d_condition.py",
    "models/unets/test_unet_2d_blocks.py",
    "models/test_attention_processor.py",
    "models/test_modeling_common.py",
    "models/autoencoders/test_models_autoencoder_kl.py",
    "models/autoencoders/test_models_vq.py",
    "models/autoencoders/test_models_asymmetric_autoencoder_kl.py",
    "models/autoencoders/test_models_consistency_decoder_vae.py",
]
# Interpreted Triton runs every GroupNorm and attention program by program in Python: 2-40 s of CPU per forward of
# the tests' tiny models (230x-600x the torch route), so the whole selection would take hours here. The triton run takes
# a named subset instead, cheapest first: every block's output against diffusers' hard-coded slice, and for each
# model class of the selection its output test (plus forward+backward training, determinism, the attention paths
# the patch handles specially: fused QKV, masks on the original processor, IP-Adapter's processor rebuild).
_BLOCKS = ("DownBlock2D ResnetDownsampleBlock2D AttnDownBlock2D CrossAttnDownBlock2D SimpleCrossAttnDownBlock2D "
           "SkipDownBlock2D AttnSkipDownBlock2D DownEncoderBlock2D AttnDownEncoderBlock2D UNetMidBlock2D "
           "UNetMidBlock2DCrossAttn UNetMidBlock2DSimpleCrossAttn UpBlock2D ResnetUpsampleBlock2D CrossAttnUpBlock2D "
           "SimpleCrossAttnUpBlock2D AttnUpBlock2D SkipUpBlock2D AttnSkipUpBlock2D UpDecoderBlock2D "
           "AttnUpDecoderBlock2D").split()
_U2, _UC, _AE = "models/unets/test_models_unet_2d.py", "models/unets/test_models_unet_2d_condition.py", \
    "models/autoencoders/test_models_"
_SLOW = ("AttnDownBlock2D", "AttnUpBlock2D")  # self-attention over a 32x32 map: over 300 s each, interpreted
_BLOCK = "models/unets/test_unet_2d_blocks.py::{}Tests::test_output"
TRITON_SUBSET = [_BLOCK.format(b) for b in _BLOCKS if b not in _SLOW] + [
    "models/test_attention_processor.py::TestAttnAddedKVProcessor::test_only_cross_attention",
    f"{_AE}autoencoder_kl.py::TestAutoencoderKL::test_output",
    f"{_AE}autoencoder_kl.py::TestAutoencoderKL::test_training",
    f"{_AE}vq.py::TestVQModel::test_output",
    f"{_AE}asymmetric_autoencoder_kl.py::TestAsymmetricAutoencoderKL::test_output",
    f"{_AE}consistency_decoder_vae.py::TestConsistencyDecoderVAE::test_output",
    f"{_U2}::TestUnet2DModel::test_output",
    f"{_U2}::TestUnet2DModel::test_determinism",
    f"{_U2}::TestUnet2DModelTraining::test_training",
    f"{_UC}::TestUNet2DCondition::test_output",
    f"{_UC}::TestUNet2DConditionTraining::test_training",
    f"{_UC}::TestUNet2DConditionAttention::test_fuse_unfuse_qkv_projections",
    f"{_UC}::TestUNet2DConditionAttention::test_model_xattn_mask_0",
    f"{_UC}::TestUNet2DConditionIPAdapter::test_ip_adapter",
    f"{_U2}::TestUNetLDMModel::test_output",
    f"{_U2}::TestNCSNppModel::test_output",
] + [_BLOCK.format(b) for b in _SLOW]
TRITON_NAME = 'patched, impl="triton" (interpreted)'
HUB = [  # download from the Hub (they fail the same way unpatched when offline)
    "models/unets/test_models_unet_2d.py::TestUNetLDMModel::test_from_pretrained_hub",
    "models/unets/test_models_unet_2d.py::TestUNetLDMModel::test_output_pretrained",
    "models/unets/test_models_unet_2d.py::TestNCSNppModel::test_output_pretrained_ve_large",
    "models/unets/test_models_unet_2d_condition.py::TestUNet2DConditionHubLoading::test_load_sharded_checkpoint_device_map_from_hub_0_hf_internal_testing_unet2d_sharded_dummy",
    "models/unets/test_models_unet_2d_condition.py::TestUNet2DConditionHubLoading::test_load_sharded_checkpoint_device_map_from_hub_1_hf_internal_testing_tiny_sd_unet_sharded_latest_format",
    "models/unets/test_models_unet_2d_condition.py::TestUNet2DConditionHubLoading::test_load_sharded_checkpoint_device_map_from_hub_subfolder_0_hf_internal_testing_unet2d_sharded_dummy_subfolder",
    "models/unets/test_models_unet_2d_condition.py::TestUNet2DConditionHubLoading::test_load_sharded_checkpoint_device_map_from_hub_subfolder_1_hf_internal_testing_tiny_sd_unet_sharded_latest_format_subfolder",
    "models/test_attention_processor.py::TestDeprecatedAttentionBlock::test_conversion_when_using_device_map",
    "models/test_modeling_common.py::TestModelUtils::test_missing_key_loading_warning_message",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_legacy_format_raises_warning[hf-internal-testing/tiny-stable-diffusion-pipe-variants-all-kinds-unet-False]",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_legacy_format_raises_warning[hf-internal-testing/tiny-stable-diffusion-pipe-variants-all-kinds-unet-True]",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_legacy_format_raises_warning[hf-internal-testing/tiny-sd-unet-with-sharded-ckpt-None-False]",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_legacy_format_raises_warning[hf-internal-testing/tiny-sd-unet-with-sharded-ckpt-None-True]",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_loads_from_hub[hf-internal-testing/tiny-sd-unet-sharded-latest-format-None-fp16]",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_loads_from_hub[hf-internal-testing/tiny-sd-unet-sharded-latest-format-subfolder-unet-fp16]",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_loads_from_hub[hf-internal-testing/tiny-sd-unet-sharded-no-variants-None-None]",
    "models/test_modeling_common.py::TestModelUtils::test_variant_sharded_ckpt_loads_from_hub[hf-internal-testing/tiny-sd-unet-sharded-no-variants-subfolder-unet-None]",
    "models/test_modeling_common.py::TestModelUtils::test_cached_files_are_used_when_no_internet",
    "models/test_modeling_common.py::TestModelUtils::test_local_files_only_with_sharded_checkpoint",
    "models/test_modeling_common.py::TestModelUtils::test_weight_overwrite",
    "models/autoencoders/test_models_autoencoder_kl.py::TestAutoencoderKL::test_from_pretrained_hub",
    "models/autoencoders/test_models_autoencoder_kl.py::TestAutoencoderKL::test_output_pretrained",
    "models/autoencoders/test_models_vq.py::TestVQModel::test_from_pretrained_hub",
    "models/autoencoders/test_models_vq.py::TestVQModel::test_output_pretrained",
    "models/autoencoders/test_models_vq.py::TestVQModel::test_loss_pretrained",
]


def run(tests: Path, impl: str, files, deadline: float, cap: float) -> dict:
    """One pytest run of ``files`` (paths or node ids, run in that order) with the plugin; returns its JSON summary
    plus CPU times."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, FASTCM_SUITE_IMPL=impl, FASTCM_SUITE_RESULT=str(result), HF_HUB_OFFLINE="1",
                   FASTCM_SUITE_DEADLINE=str(deadline), FASTCM_SUITE_TEST_CAP=str(cap),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
        args = [sys.executable, "-m", "pytest", "-p", "diffusers_suite_plugin", "-p", "no:cacheprovider", "-q",
                "-o", "addopts=", *(f"{tests.name}/{f}" for f in files)]  # node ids relative to the checkout
        paths = {f.split("::")[0] for f in files}  # files or node ids
        args += [a for node in HUB if node.split("::")[0] in paths for a in ("--deselect", f"{tests.name}/{node}")]
        t0, r0 = time.time(), os.times()
        proc = subprocess.run(args, cwd=tests.parent, env=env, capture_output=True, text=True)
        r1 = os.times()
        if not result.exists():
            raise RuntimeError(f"pytest ({impl}) wrote no result (exit {proc.returncode}): {proc.stderr[-2000:]}")
        out = json.loads(result.read_text())
    out.update(wall=time.time() - t0, user=r1.children_user - r0.children_user,
               system=r1.children_system - r0.children_system, files=list(files), deadline=deadline, cap=cap)
    return out


def _tiny_models():
    """The shapes diffusers' own tests use, a little wider: a cross-attention U-Net (8-dim heads) and a KL VAE."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, cross_attention_dim=32,
                                layers_per_block=2, block_out_channels=(32, 64), norm_num_groups=32,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=32, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return {"UNet2DConditionModel 32x32 b2": (unet, (torch.randn(2, 4, 32, 32), torch.tensor([3, 5]),
                                                     torch.randn(2, 7, 32))),
            "AutoencoderKL 32x32 b2": (vae, (torch.randn(2, 3, 32, 32),))}


def overhead(repeats: int = 20) -> list:
    """CPU time and minor page faults per call, unpatched vs fastcm.patch(impl="torch"), 1 thread, interleaved."""
    import copy
    import resource

    import torch

    import fastcm

    torch.set_num_threads(1)
    rows = []
    for name, (model, args) in _tiny_models().items():
        patched = copy.deepcopy(model)
        fastcm.patch(patched, impl="torch")
        for mode in ("fwd", "fwd+bwd"):
            def once(m):
                if mode == "fwd":
                    with torch.no_grad():
                        m(*args)
                else:
                    m(*args).sample.square().mean().backward()

            cost = {}
            for label, m in (("unpatched", model), ("patched", patched), ("unpatched ", model)):
                once(m)
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
                for _ in range(repeats):
                    once(m)
                cost[label] = ((time.process_time() - t0) / repeats * 1e3,
                               (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / repeats)
            rows.append((name, mode, cost))
    return rows


# tests that pass unpatched and not patched because they inspect what the patch changes on purpose: node id -> why
BY_DESIGN = {}


def lost(runs: dict, name: str) -> list:
    """(node id, outcome) of the tests that pass unpatched but fail or error in run ``name`` (tests not reached or
    stopped by the per-test cap, which decide nothing, are counted in their own columns)."""
    base = runs.get("unpatched", {}).get("tests", {})
    tests = runs[name].get("tests", {})
    return [(n, k) for n, k in sorted(tests.items()) if base.get(n) == "passed" and k in ("failed", "error")]


def _table(runs: dict) -> list:
    lines = ["| run | files | selected | passed | failed | errors | skipped | not reached | over per-test cap | "
             "passed unpatched, fail here | patched models | wall s | user s | sys s | fastcm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        o, gone = r["outcomes"], ("-" if name == "unpatched" or "unpatched" not in runs else len(lost(runs, name)))
        lines.append(f"| {name} | {len({f.split('::')[0] for f in r['files']})} | {r.get('selected', '?')} | {o.get('passed', 0)} | "
                     f"{o.get('failed', 0)} | {o.get('error', 0)} | {o.get('skipped', 0)} | "
                     f"{o.get('not reached', 0)} | {o.get('over cap', 0)} | {gone} | {r['patched_models']} | "
                     f"{r['wall']:.0f} | {r['user']:.0f} | {r['system']:.0f} | {r.get('commit', '?')} |")
    return lines


def _failures(runs: dict) -> list:
    lines = []
    for name, r in runs.items():
        if r["failed"]:
            lines += ["", f"## {name}: failures", ""]
            lines += [f"- `{node}` ({kind}): {BY_DESIGN.get(node, msg)}" for node, kind, msg in r["failed"]]
        if name != "unpatched" and "unpatched" in runs:
            gone = lost(runs, name)
            lines += ["", f"{name}: {len(gone)} test(s) that pass unpatched fail or error here" + (":" if gone else ".")]
            lines += [f"- `{n}` ({k}){' - by design: ' + BY_DESIGN[n] if n in BY_DESIGN else ''}" for n, k in gone]
    base = runs.get("unpatched")
    if base and base.get("skip_reasons"):
        lines += ["", "Why the unpatched run skips what it skips (diffusers' own skip reasons, counts):", ""]
        lines += [f"- {n} x {why}" for why, n in sorted(base["skip_reasons"].items(), key=lambda t: -t[1])]
    return lines


def _cost(cost) -> list:
    lines = ["", "## CPU cost of patching (impl=\"torch\")", "",
             "CPU ms and minor page faults per call, 1 torch thread, unpatched / patched / unpatched again "
             "interleaved (shared, noisy 2-core machine); `python benchmarks/diffusers_suite.py --overhead`.", "",
             "| model | pass | unpatched ms | patched ms | unpatched again ms | faults unpatched | faults patched |",
             "|---|---|---|---|---|---|---|"]
    for name, mode, c in cost:
        lines.append(f"| {name} | {mode} | {c['unpatched'][0]:.1f} | {c['patched'][0]:.1f} | "
                     f"{c['unpatched '][0]:.1f} | {c['unpatched'][1]:.0f} | {c['patched'][1]:.0f} |")
    return lines


def markdown(runs: dict, tests: Path, version: str, cost=None) -> str:
    lines = ["# diffusers' own model tests on fastcm-patched models", "",
             f"diffusers library {version}; tests from `{tests}` (run with `make diffusers-suite`); "
             f"{len(HUB)} Hub-downloading tests deselected in every run; extras {', '.join(EXTRAS)} installed; "
             "1 torch thread; shared 2-core machine. \"selected\": the tests run after the deselection; "
             "\"fastcm\": the commit each run tested (+ = fastcm/ or the harness had uncommitted changes).", ""]
    lines += _table(runs)
    if TRITON_NAME in runs:
        t = runs[TRITON_NAME]
        lines += ["", f"triton subset ({len(t['files'])} named tests, in this order; per-test cap {t['cap']:.0f} s, "
                      f"run cap {t['deadline']:.0f} s): {', '.join(f'`{f}`' for f in t['files'])}. Over the cap "
                      "and not reached mean interpreter time, not a failure: an attention over a 32x32 map (1024 "
                      "tokens) runs its Triton programs one by one in Python for minutes."]
    lines += _failures(runs)
    if cost:
        lines += _cost(cost)
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The fastcm commit under test, "+" when fastcm/ or this harness has uncommitted changes ("?" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "fastcm",
                                "benchmarks/diffusers_suite.py", "benchmarks/diffusers_suite_plugin.py"],
                               cwd=HERE.parent, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tests", type=Path, help="a diffusers checkout's tests/ folder")
    p.add_argument("--runs", default="none,torch,triton",
                   help="comma-separated subset of none,torch,triton; the other runs saved in OUT's .json are kept")
    p.add_argument("--triton-deadline", type=float, default=1500.0, help="seconds after which the triton run stops")
    p.add_argument("--triton-test-cap", type=float, default=300.0, help="seconds per test in the triton run")
    p.add_argument("--overhead", action="store_true", help="also measure the CPU cost of patching")
    p.add_argument("--out", type=Path, default=HERE / "results" / "diffusers-suite.md")
    a = p.parse_args(argv)
    if not (a.tests / "models" / "test_modeling_common.py").is_file():
        p.error(f"tests must be a diffusers checkout's tests/ folder (with models/test_modeling_common.py), got {a.tests}")
    runs = [r for r in a.runs.split(",") if r]
    if not (runs or a.overhead) or not set(runs) <= {"none", "torch", "triton"}:
        p.error(f"--runs must be drawn from none,torch,triton, got {a.runs!r}")
    missing = [pip for pip, mod in EXTRAS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        p.error(f"diffusers' tests need their extras, missing: pip install {' '.join(missing)}")
    import diffusers

    names = {"none": "unpatched", "torch": 'patched, impl="torch"', "triton": TRITON_NAME}
    saved = a.out.with_suffix(".json")
    done = json.loads(saved.read_text()) if saved.exists() else {}  # the runs not in --runs are kept
    cost = done.pop("overhead", None)
    for impl in runs:
        files, deadline, cap = (TRITON_SUBSET, a.triton_deadline, a.triton_test_cap) if impl == "triton" else (FILES, 0, 0)
        done[names[impl]] = dict(run(a.tests.resolve(), impl, files, deadline, cap), commit=_commit())
        done = {n: done[n] for n in names.values() if n in done}
        print(names[impl], done[names[impl]]["outcomes"], flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(markdown(done, a.tests, diffusers.__version__, cost))
        saved.write_text(json.dumps(dict(done, overhead=cost), indent=1))
    if a.overhead:
        cost = overhead()
    a.out.write_text(markdown(done, a.tests, diffusers.__version__, cost))
    saved.write_text(json.dumps(dict(done, overhead=cost), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
