"""Every experiment's ``--quick`` run works and follows the output convention."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO


def run_experiment(name: str, output_dir, *flags: str, timeout: int = 300) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", f"experiments.{name}", "--quick", f"--output_dir={output_dir}",
       *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(output_dir, f"{name}.json")) as f:
    payload = json.load(f)
  assert set(payload) == {"summary", "rows", "config", "env"}
  assert os.path.exists(os.path.join(output_dir, f"{name}.md"))
  assert "|" in result.stdout
  return payload


@pytest.mark.xdist_group("subprocess")
def test_bench_step_quick(tmp_path):
  payload = run_experiment("bench_step", tmp_path)
  summary = payload["summary"]
  assert "overhead_pct" in summary
  # The library step does the hand-written step's work: same FLOPs, memory traffic within 3%
  # (the guard and metrics add about 1 MB of elementwise traffic per step).
  assert abs(summary["flops_ratio"] - 1) < 0.01
  assert abs(summary["bytes_accessed_ratio"] - 1) < 0.03
  total = summary["zero0_bytes_per_device"]
  # ZeRO-1/2 keep 1/8 of the Adam state (2 of 3 float32 copies of the model): 1/3 + 2/3/8.
  for stage in (1, 2):
    assert summary[f"zero{stage}_bytes_per_device"] <= total * (1 / 3 + 2 / 3 / 8) * 1.05
  assert summary["zero3_bytes_per_device"] <= total / 8 * 1.05
  assert payload["env"]["devices"] == 8


@pytest.mark.xdist_group("subprocess")
def test_onebit_comm_quick(tmp_path):
  summary = run_experiment("onebit_comm", tmp_path)["summary"]
  assert summary["compression_phase_ratio_fp32"] >= 25  # issue target; ideal ~32
  assert summary["whole_run_ratio_15pct_warmup"] >= 5
  assert summary["zero_one_vs_onebit_bytes"] < 1
  assert summary["zero_one_vs_onebit_rounds"] < 1


@pytest.mark.xdist_group("subprocess")
def test_onebit_convergence_quick(tmp_path):
  payload = run_experiment("onebit_convergence", tmp_path)
  rows = {r["optimizer"]: r for r in payload["rows"]}
  assert set(rows) == {"adamw", "onebit_adam", "zero_one_adam", "lamb_optax", "lamb",
                       "onebit_lamb"}
  for row in rows.values():  # every optimizer learns something in 20 steps
    assert row["val_loss"] < row["initial_val_loss"]
  assert os.path.exists(tmp_path / "onebit_convergence.png")


@pytest.mark.xdist_group("subprocess")
def test_slw_stability_quick(tmp_path):
  summary = run_experiment("slw_stability", tmp_path)["summary"]
  assert {"baseline_spikes", "slw_spikes", "token_ratio_to_target"} <= set(summary)


@pytest.mark.xdist_group("subprocess")
def test_random_ltd_quick(tmp_path):
  summary = run_experiment("random_ltd", tmp_path)["summary"]
  # Compiled FLOPs follow the layer-token arithmetic (issue target: within 5%).
  assert summary["flops_saving"] > 0
  assert abs(summary["flops_saving"] / summary["flops_saving_theory"] - 1) <= 0.05
  assert {"wallclock_saving", "val_loss_rel_gap"} <= set(summary)


@pytest.mark.xdist_group("subprocess")
def test_data_efficiency_quick(tmp_path):
  summary = run_experiment("data_efficiency", tmp_path)["summary"]
  assert {"data_saving", "time_saving"} <= set(summary)


@pytest.mark.xdist_group("subprocess")
def test_pld_quick(tmp_path):
  summary = run_experiment("pld", tmp_path)["summary"]
  assert 0 < summary["expected_layer_saving"] < 0.5  # theta_bar = 0.5 drops under half
  assert {"time_per_sample_saving", "val_loss_rel_gap"} <= set(summary)


@pytest.mark.xdist_group("subprocess")
def test_ulysses_comm_quick(tmp_path):
  summary = run_experiment("ulysses_comm", tmp_path)["summary"]
  assert summary["ulysses_bytes_spread"] <= 1.05  # constant when N and P grow together
  assert summary["allgather_bytes_growth"] >= 3.9  # grows with N: 4x from P=2 to P=8


@pytest.mark.xdist_group("subprocess")
def test_long_context_quick(tmp_path):
  summary = run_experiment("long_context", tmp_path)["summary"]
  assert summary["max_seq_sp8"] > summary["max_seq_sp1"] > 0
  assert summary["max_seq_ratio_sp8"] >= 4


@pytest.mark.xdist_group("subprocess")
def test_attention_memory_quick(tmp_path):
  summary = run_experiment("attention_memory", tmp_path)["summary"]
  assert summary["seq_growth"] == 4
  assert summary["flash_temp_growth"] < 4.5  # linear in S
  assert "blockwise_temp_growth" in summary
  assert summary["xla_temp_growth"] > 10  # quadratic in S


@pytest.mark.xdist_group("subprocess")
def test_zeroquant_minilm_quick(tmp_path):
  payload = run_experiment("zeroquant_minilm", tmp_path)
  summary = payload["summary"]
  assert summary["w8a8_cosine"] >= 0.99  # issue target, with real integer matmuls
  assert summary["w8a8_cosine"] > summary["w4a8_cosine"]
  assert 3.9 < summary["int8_size_ratio"] <= 4 and 7.5 < summary["int4_size_ratio"] <= 8
  assert summary["paraphrase_similarity"] > summary["unrelated_similarity"] + 0.3
  assert summary["lkd_loss_last"] < summary["lkd_loss_first"]
  rows = {r["variant"]: r for r in payload["rows"]}
  # Integer weights really shrink the file and the compiled program's inputs.
  assert rows["W4/8A8"]["file_MB"] < rows["W8A8"]["file_MB"] < rows["float32"]["file_MB"]
  assert rows["W8A8"]["arg_MB"] < rows["float32"]["arg_MB"]


@pytest.mark.xdist_group("subprocess")
def test_xtc_quick(tmp_path):
  summary = run_experiment("xtc", tmp_path)["summary"]
  for key in ("teacher_val_loss", "ternary_val_loss", "binary_val_loss",
              "binary_reduced_val_loss"):
    assert 0 < summary[key] < 6  # below the uniform byte loss log(256) = 5.5 + slack
  assert 31 < summary["binary_linear_size_ratio"] <= 32
  assert summary["binary_reduced_linear_size_ratio"] > 2 * 31
  assert summary["binary_reduced_size_ratio"] > summary["binary_size_ratio"] > \
      summary["ternary_size_ratio"] > 1


@pytest.mark.xdist_group("subprocess")
def test_quant_matmul_bench_quick(tmp_path):
  payload = run_experiment("quant_matmul_bench", tmp_path)
  assert payload["summary"]["int8_speedup"] > 0
  assert {"f32_ms", "int8_ms", "w8a8_ms", "w4a8_ms"} <= set(payload["rows"][0])


@pytest.mark.xdist_group("subprocess")
def test_generate_bench_quick(tmp_path):
  payload = run_experiment("generate_bench", tmp_path)
  summary = payload["summary"]
  assert summary["cache_speedup_1024"] > 1  # a ratio of two timings in one run
  for tp in (2, 4):
    assert summary[f"tp{tp}_same_tokens"]
    assert summary[f"tp{tp}_allreduce_bytes_per_step"] > 0  # TP decode all-reduces
  assert summary["tp1_allreduce_bytes_per_step"] == 0


@pytest.mark.xdist_group("subprocess")
def test_kv_compression_quick(tmp_path):
  payload = run_experiment("kv_compression", tmp_path)
  summary = payload["summary"]
  for policy in ("local", "h2o", "fastgen", "kvmerger"):
    # Kept slots at 50% plus positions and scores (and FastGen's kinds, KVMerger's masses).
    assert 0.5 <= summary[f"{policy}_50_kv_bytes_ratio"] < 0.56
    assert summary[f"{policy}_50_ppl_ratio"] > 0
  # 2-bit storage on top of the budget (here half the kept tokens are in the float32 window).
  assert summary["minikv_50_kv_bytes_ratio"] < 0.7 * summary["h2o_50_kv_bytes_ratio"]


@pytest.mark.xdist_group("subprocess")
def test_pipeline_bubble_quick(tmp_path):
  payload = run_experiment("pipeline_bubble", tmp_path)
  summary = payload["summary"]
  assert summary["bubble_theory_4p"] == pytest.approx(1 / 9)  # p = 2, m = 8
  assert math.isfinite(summary["bubble_measured_vs_theory"])
  assert [(r["stages_p"], r["microbatches_m"]) for r in payload["rows"]] == [(2, 8)]


@pytest.mark.xdist_group("subprocess")
def test_moe_comm_quick(tmp_path):
  summary = run_experiment("moe_comm", tmp_path)["summary"]
  # All-to-all bytes read from the HLO equal the dispatch-buffer formula.
  assert summary["bytes_match_theory"]
  assert summary["all_to_all_bytes_ep1"] == 0 < summary["all_to_all_bytes_ep8"]
  # Dropless buffers hold every assignment a device could send to each peer.
  assert summary["all_to_all_bytes_dropless_ep8"] > summary["all_to_all_bytes_ep8"]


@pytest.mark.xdist_group("subprocess")
def test_moe_quality_quick(tmp_path):
  summary = run_experiment("moe_quality", tmp_path)["summary"]
  for name in ("dense", "moe", "prmoe", "residual", "mos"):
    assert summary[f"{name}_val_loss"] > 0
  # MoE adds parameters, not per-token compute: one of 8 experts (the size of the
  # dense MLP) is active, plus the gates: 2 MoE layers x d_model 32 x 8 experts.
  assert summary["moe_params"] > summary["dense_params"]
  assert summary["moe_active_params"] - summary["dense_active_params"] == 2 * 32 * 8
  assert summary["prmoe_params"] < summary["residual_params"]
  assert summary["mos_params"] < summary["prmoe_params"]
