"""Every experiment's ``--quick`` run works and follows the output convention.

Most run in this process (``helpers.run_experiment``): no interpreter start or
JAX import per experiment. The few that need their own device count run in a
subprocess (``run_experiment_subprocess``).
"""

import math
import os

import pytest
from helpers import import_experiment, run_experiment, run_experiment_subprocess

pytestmark = pytest.mark.slow


def test_bench_step_quick(tmp_path):
  payload = run_experiment("bench_step", tmp_path)
  summary = payload["summary"]
  assert "overhead_pct" in summary
  # The library step does the hand-written step's work: same FLOPs, memory traffic within 3%
  # (the guard and metrics add about 1 MB of elementwise traffic per step).
  assert abs(summary["flops_ratio"] - 1) < 0.01
  # Memory traffic: the hand-written step's plus the non-finite guard's, which checks the new
  # parameters and optimizer state and then selects new or old: at most 4 passes over them
  # (read new; read new and old, write the kept state).
  guard = summary["guard_read_fraction"]
  assert 0 < guard < 0.2
  assert 0.97 < summary["bytes_accessed_ratio"] < 1 + 4 * guard
  total = summary["zero0_bytes_per_device"]
  # ZeRO-1/2 keep 1/8 of the Adam state (2 of 3 float32 copies of the model): 1/3 + 2/3/8.
  for stage in (1, 2):
    assert summary[f"zero{stage}_bytes_per_device"] <= total * (1 / 3 + 2 / 3 / 8) * 1.05
  assert summary["zero3_bytes_per_device"] <= total / 8 * 1.05
  assert payload["env"]["devices"] == 8


def test_onebit_comm_quick(tmp_path):
  summary = run_experiment("onebit_comm", tmp_path)["summary"]
  assert summary["compression_phase_ratio_fp32"] >= 25  # issue target; ideal ~32
  assert summary["whole_run_ratio_15pct_warmup"] >= 5
  assert summary["zero_one_vs_onebit_bytes"] < 1
  assert summary["zero_one_vs_onebit_rounds"] < 1
  # ZeRO-3 splits momentum, variance and server errors over the 8 workers; each worker's
  # error feedback stays whole: the state lands between that floor and ZeRO-0's.
  floor = summary["onebit_state_floor_worker_errors"]
  assert floor < summary["onebit_zero3_state_bytes_ratio"] < 0.5


def test_onebit_convergence_quick(tmp_path):
  payload = run_experiment("onebit_convergence", tmp_path)
  rows = {r["optimizer"]: r for r in payload["rows"]}
  assert set(rows) == {"adam", "onebit_adam", "zero_one_adam"}
  for row in rows.values():  # every optimizer learns something in 12 steps
    assert row["val_loss"] < row["initial_val_loss"]
  assert os.path.exists(tmp_path / "onebit_convergence.png")


def test_slw_stability_quick(tmp_path):
  # Without the compilation cache: JAX reads it once per process, and this one runs other tests.
  payload = run_experiment("slw_stability", tmp_path, "--nocompilation_cache")
  summary, rows = payload["summary"], {r["run"]: r for r in payload["rows"]}
  # One train-step program per sequence length: 8, 16, 32 under SLW, 32 alone otherwise.
  assert summary["baseline_compilations"] == 1 and summary["slw_compilations"] == 3
  assert summary["compile_fraction"] == rows["slw"]["compile_s"] / rows["slw"]["loop_s"]
  # SLW gets the baseline's token budget with more, shorter steps (at most one step over).
  base, slw = rows["baseline"], rows["slw"]
  assert slw["steps"] > base["steps"]
  assert base["tokens_seen"] <= slw["tokens_seen"] < base["tokens_seen"] * (1 + 1 / base["steps"])
  assert summary["target_val_loss"] == summary["baseline_val_loss"]  # the default target
  assert base["tokens_to_target"] <= base["tokens_seen"]  # the baseline reaches its own loss
  assert summary["baseline_spikes"] <= base["spike_steps"] <= base["steps"]


def test_slw_schedule_rounds_the_linear_ramp_down_to_powers_of_two():
  from jaxspeed.data_efficiency.curriculum import CurriculumSchedule

  slw_schedule = import_experiment("slw_stability").slw_schedule
  keys = slw_schedule(8, 128, 40, "pow2")
  pow2 = CurriculumSchedule(**keys)
  linear = CurriculumSchedule(**slw_schedule(8, 128, 40, "step8") | {"difficulty_step": 1})
  lengths = [pow2.difficulty_at(t) for t in range(45)]
  assert sorted(set(lengths)) == [8, 16, 32, 64, 128]  # five programs instead of sixteen
  for t, length in enumerate(lengths):  # the largest power of two at or below the ramp
    assert length <= linear.difficulty_at(t) < 2 * length or length == 128
  assert lengths[39] == 64 and lengths[40] == 128  # full length where the ramp ends


def test_slw_spike_steps_and_events():
  slw = import_experiment("slw_stability")
  spike_events, spike_steps = slw.spike_events, slw.spike_steps

  losses = [5.5, 4.0, 7.0, 4.9, 3.0, 3.5, 3.7, float("nan"), 3.1]
  records = [{"step": t + 1, "loss": v} for t, v in enumerate(losses)]
  # Above 1.2 x the minimum before it: 7.0 and 4.9 (min 4.0), 3.7 (min 3.0), NaN.
  assert spike_steps(records, 0.2) == [3, 4, 7, 8]
  assert spike_events([3, 4, 7, 8]) == 2


def test_random_ltd_quick(tmp_path):
  summary = run_experiment("random_ltd", tmp_path)["summary"]
  # Compiled FLOPs follow the layer-token arithmetic (issue target: within 5%).
  assert summary["flops_saving"] > 0
  assert abs(summary["flops_saving"] / summary["flops_saving_theory"] - 1) <= 0.05
  assert "val_loss_rel_gap" in summary
  # The wall-clock saving is the median over matched rounds of interleaved steps, inside its
  # quartiles (2 rounds of 2 steps per program in the quick run).
  assert summary["wallclock_saving_p25"] <= summary["wallclock_saving"] <= \
      summary["wallclock_saving_p75"]
  assert summary["timed_steps_per_program"] == 4


def test_data_efficiency_quick(tmp_path):
  # One control of the four (each is one more training run): the same steps without a
  # curriculum, the one that separates step count from curriculum.
  payload = run_experiment("data_efficiency", tmp_path, "--controls=same_steps")
  summary, rows = payload["summary"], {r["run"]: r for r in payload["rows"]}
  assert list(rows) == ["baseline", "same_steps", "composed"]
  base, composed = rows["baseline"], rows["composed"]
  # Every run gets the baseline's token budget (--budget_fraction 1), to within a step or a
  # token per row; the composed run takes more, shorter steps, and the same-steps control as
  # many as the composed run, at one fixed length.
  for row in rows.values():
    assert base["tokens_seen"] <= row["tokens_seen"] < base["tokens_seen"] * 1.05
  assert composed["steps"] > base["steps"]
  assert rows["same_steps"]["steps"] == composed["steps"]
  assert 1 <= summary["composed_token_budget"] < 1 + 1 / base["steps"]
  # One program for a fixed length; one per (sequence length, kept length) otherwise.
  assert base["compilations"] == rows["same_steps"]["compilations"] == 1
  assert summary["composed_compilations"] > 1
  assert base["tokens_to_target"] <= base["tokens_seen"]  # the target is its final loss
  for label, row in rows.items():
    if math.isfinite(row["tokens_to_target"]):
      assert row["data_saving"] == pytest.approx(
          1 - row["tokens_to_target"] / base["tokens_to_target"])
    else:
      assert math.isnan(row["data_saving"])
    if label not in ("baseline", "composed"):
      assert summary[f"data_saving_{label}"] == pytest.approx(row["data_saving"], nan_ok=True)
  assert summary["data_saving"] == pytest.approx(composed["data_saving"], nan_ok=True)
  assert math.isnan(summary["data_saving"]) != summary["composed_reached_target"]


def test_pld_quick(tmp_path):
  result = run_experiment("pld", tmp_path)
  summary = result["summary"]
  assert 0 < summary["expected_layer_saving"] < 0.5  # theta_bar = 0.5 drops under half
  assert abs(summary["val_loss_rel_gap"]) < 0.05
  assert math.isfinite(summary["time_per_sample_saving"])
  kept = {row["variant"]: row["mean_layers_kept"] for row in result["rows"] if "variant" in row}
  assert kept["baseline remat=full"] == kept["pld θ=1 remat=full"] == 3  # θ = 1 drops none
  assert kept["pld schedule remat=full"] < 3  # the run's own masks drop layers


def test_ulysses_comm_quick(tmp_path):
  summary = run_experiment("ulysses_comm", tmp_path)["summary"]
  assert summary["ulysses_bytes_spread"] <= 1.05  # constant when N and P grow together
  assert summary["allgather_bytes_growth"] >= 3.9  # grows with N: 4x from P=2 to P=8


def test_long_context_quick(tmp_path):
  summary = run_experiment("long_context", tmp_path)["summary"]
  assert summary["max_seq_sp8"] > summary["max_seq_sp1"] > 0
  assert summary["max_seq_ratio_sp8"] >= 4


def test_attention_memory_quick(tmp_path):
  summary = run_experiment("attention_memory", tmp_path)["summary"]
  assert summary["seq_growth"] == 4
  assert summary["flash_temp_growth"] < 4.5  # linear in S
  assert "blockwise_temp_growth" in summary
  assert summary["xla_temp_growth"] > 10  # quadratic in S


def test_evoformer_memory_quick(tmp_path):
  summary = run_experiment("evoformer_memory", tmp_path)["summary"]
  assert summary["n_growth"] == 4
  assert summary["naive_temp_growth"] > 12  # the [B, R, H, N, N] logits: quadratic in N
  assert summary["blockwise_temp_growth"] < summary["naive_temp_growth"] / 2
  assert summary["memory_ratio_naive_vs_blockwise_at_max_n"] > 2
  assert summary["max_abs_grad_err"] < 1e-4


def test_scala_quick(tmp_path):
  payload = run_experiment("scala", tmp_path)
  summary, rows = payload["summary"], {r["run"]: r for r in payload["rows"]}
  assert set(rows) == {"small_adamw", "large_lamb", "large_lamb_scala"}
  # equal epochs: the large batch takes batch-ratio fewer updates
  assert rows["small_adamw"]["updates"] == 2 * rows["large_lamb"]["updates"]
  assert rows["large_lamb"]["updates"] == rows["large_lamb_scala"]["updates"]
  assert summary["scala_gap"] == pytest.approx(
      summary["small_batch_accuracy"] - summary["scala_accuracy"])
  for key in ("large_batch_gap", "scala_gap", "steps_speedup_to_target"):
    assert key in summary
  assert all(0 <= r["final_accuracy"] <= 1 for r in rows.values())


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


def test_xtc_quick(tmp_path):
  summary = run_experiment("xtc", tmp_path)["summary"]
  for key in ("teacher_val_loss", "ternary_val_loss", "binary_val_loss",
              "binary_reduced_val_loss"):
    assert 0 < summary[key] < 6  # below the uniform byte loss log(256) = 5.5 + slack
  assert 31 < summary["binary_linear_size_ratio"] <= 32
  assert summary["binary_reduced_linear_size_ratio"] > 2 * 31
  assert summary["binary_reduced_size_ratio"] > summary["binary_size_ratio"] > \
      summary["ternary_size_ratio"] > 1


def test_quant_matmul_bench_quick(tmp_path):
  payload = run_experiment("quant_matmul_bench", tmp_path)
  [row] = payload["rows"]  # the quick shape only
  assert (row["M"], row["K"], row["N"]) == (128, 512, 512)
  # Throughputs and speedups are derived from the timings of the same row.
  assert row["f32_gflops"] == pytest.approx(2 * 128 * 512 * 512 / 1e9 / (row["f32_ms"] / 1e3))
  # Speedups are medians of matched per-call ratios, inside their quartiles; one shape, so the
  # summary's median over shapes is that row's.
  for variant in ("int8", "w8a8", "w4a8"):
    p25, median, p75 = (row[f"{variant}_speedup{s}"] for s in ("_p25", "", "_p75"))
    assert 0 < p25 <= median <= p75
    for s in ("_p25", "", "_p75"):
      assert payload["summary"][f"{variant}_speedup{s}"] == row[f"{variant}_speedup{s}"]
  assert payload["summary"]["cores"] == len(os.sched_getaffinity(0))
  assert payload["config"]["block"] == 2


def test_generate_bench_quick(tmp_path):
  payload = run_experiment("generate_bench", tmp_path)
  summary = payload["summary"]
  assert [(r["prompt"], r["tp"]) for r in payload["rows"]] == [
      (128, 1), (512, 1), (1024, 1), (512, 1), (512, 2), (512, 4)]
  for tp in (2, 4):
    assert summary[f"tp{tp}_same_tokens"]
    assert summary[f"tp{tp}_allreduce_bytes_per_step"] > 0  # TP decode all-reduces
  assert summary["tp1_allreduce_bytes_per_step"] == 0


def test_kv_compression_quick(tmp_path):
  payload = run_experiment("kv_compression", tmp_path)
  summary = payload["summary"]
  for policy in ("local", "h2o", "fastgen", "kvmerger"):
    # Kept slots at 50% plus positions and scores (and FastGen's kinds, KVMerger's masses).
    assert 0.5 <= summary[f"{policy}_50_kv_bytes_ratio"] < 0.56
    assert summary[f"{policy}_50_ppl_ratio"] > 0
  # 2-bit storage on top of the budget (here half the kept tokens are in the float32 window).
  assert summary["minikv_50_kv_bytes_ratio"] < 0.7 * summary["h2o_50_kv_bytes_ratio"]


def test_pipeline_bubble_quick(tmp_path):
  payload = run_experiment("pipeline_bubble", tmp_path)
  summary = payload["summary"]
  assert summary["bubble_theory_4p"] == pytest.approx(1 / 9)  # p = 2, m = 8
  assert math.isfinite(summary["bubble_measured_vs_theory"])
  assert math.isfinite(summary["bubble_measured_vs_theory_1f1b"])
  assert [(r["schedule"], r["stages_p"], r["microbatches_m"]) for r in payload["rows"]] == [
      ("1f1b", 2, 8)]
  # The measured bubble is the median of matched step ratios, inside its quartiles.
  [row] = payload["rows"]
  assert row["bubble_time_p25"] <= row["bubble_time"] <= row["bubble_time_p75"]
  assert (summary["bubble_measured_vs_theory_1f1b_p25"] <= summary["bubble_measured_vs_theory_1f1b"]
          <= summary["bubble_measured_vs_theory_1f1b_p75"])
  assert summary["timed_steps_per_variant"] == 4


def test_moe_comm_quick(tmp_path):
  summary = run_experiment("moe_comm", tmp_path)["summary"]
  # All-to-all bytes read from the HLO equal the dispatch-buffer formula.
  assert summary["bytes_match_theory"]
  assert summary["all_to_all_bytes_ep1"] == 0 < summary["all_to_all_bytes_ep8"]
  # Dropless buffers hold every assignment a device could send to each peer.
  assert summary["all_to_all_bytes_dropless_ep8"] > summary["all_to_all_bytes_ep8"]


def test_xmoe_quick(tmp_path):
  summary = run_experiment("xmoe", tmp_path)["summary"]
  # Bytes read along each path of the compiled step equal the buffer formulas.
  assert summary["bytes_match_theory"]
  # Top-8 of 64 experts on 8 shards: padding-free rows are 2 x the balanced share, 1/4 of
  # the exact buffer; deduplicated rows are T, 1/8 of it, plus their ids and gates.
  assert summary["alltoall_bytes_ratio_padding_free_vs_dropless"] <= 0.5
  assert summary["alltoall_bytes_ratio_dedup_vs_plain"] <= 0.5
  assert summary["dropped_fraction"] == 0.0
  assert summary["loss_equal_rel_diff"] <= 1e-4


def test_moe_quality_quick(tmp_path):
  # Its own process: it runs on one device (see the experiment). The quick run trains the
  # PR-MoE teacher and its MoS student and counts every variant's parameters.
  payload = run_experiment_subprocess("moe_quality", tmp_path)
  summary = payload["summary"]
  assert [r["model"] for r in payload["rows"]] == ["prmoe", "mos"]
  assert summary["prmoe_val_loss"] > 0 and summary["mos_val_loss"] > 0
  assert summary["mos_kd_loss_first"] > 0  # the student's loss has the KD term to its teacher
  assert all(r["dropped_fraction"] == 0 for r in payload["rows"])  # dropless by default
  assert (tmp_path / "moe_quality.png").exists()
  # MoE adds parameters, not per-token compute: one of 8 experts (the size of the
  # dense MLP) is active, plus the gates: 2 MoE layers x d_model 32 x 8 experts.
  assert summary["moe_params"] > summary["dense_params"]
  assert summary["moe_active_params"] - summary["dense_active_params"] == 2 * 32 * 8
  # Residual-MoE adds one dense MLP (32 -> 64 -> 32, with biases) per MoE layer.
  mlp = 2 * 32 * 64 + 64 + 32
  assert summary["residual_active_params"] - summary["moe_active_params"] == 2 * mlp
  # PR-MoE's pyramid (4, 8) has 4 experts fewer than (8, 8), each an MLP, and 4 gate columns.
  assert summary["residual_params"] - summary["prmoe_params"] == 4 * mlp + 4 * 32
  assert summary["mos_params"] < summary["prmoe_params"]


def test_universal_checkpoint_quick(tmp_path):
  payload = run_experiment("universal_checkpoint", tmp_path)
  summary = payload["summary"]
  assert summary["pairs"] == 1
  assert math.isnan(summary["max_rel_diff_exact"])  # no exact pair in the quick run
  assert summary["onebit_conversion_gap"] <= 0.01  # the rule: error feedback re-split
  assert math.isfinite(summary["onebit_layout_gap"])  # 8 -> 4 workers
  assert [(r["pair"], r["rule"]) for r in payload["rows"] if not r["exact"]] == [
      ("1-bit Adam dp8 -> dp4 (4 devices)", "resplit")]


def test_markdown_table_lists_every_key_of_any_row():
  from experiments.common import markdown_table

  table = markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}]).splitlines()
  assert table[0] == "| a | b | c |"
  assert table[2:] == ["| 1 | 0.5 |  |", "| 2 |  | x |"]


def test_offload_quick(tmp_path):
  payload = run_experiment("offload", tmp_path)
  summary, rows = payload["summary"], payload["rows"]
  assert {(r["zero_stage"], r["param_dtype"], r["offload"]) for r in rows} == {
      (s, p, o) for s in (0, 1) for p in ("float32", "bfloat16") for o in ("none", "optimizer")}
  for row in rows:
    assert row["device_mib"] <= summary["budget_mib"]
    assert (row["host_mib"] > 0) == (row["offload"] == "optimizer")
  # Per block parameter at ZeRO-0: 16 -> 2 device bytes in ZeRO-Offload's precision
  # setting (bfloat16 parameters stay; gradients stream to the host), 16 -> 4 in float32;
  # at 4 MiB the embeddings and activation checkpoints take a large share of the budget.
  assert 5 <= summary["max_params_ratio_optimizer_offload"] < 9
  assert 2 <= summary["max_params_ratio_fp32"] < 4.5
  # At ZeRO-1 the state was already split 8 ways: the gain is the gradients'.
  assert 1.5 <= summary["zero1_float32_params_ratio"] < 4
  assert 1.5 <= summary["zero1_bfloat16_params_ratio"] < 4


def test_zeropp_quick(tmp_path):
  summary = run_experiment("zeropp", tmp_path)["summary"]
  # int8 instead of float32 (0.25), plus the per-slice scales and the exact embedding
  # (a sizeable share of a 2-layer model).
  assert 0.25 < summary["qwz_param_gather_bytes_ratio"] < 0.4
  # int4 with a float32 scale per 64 elements: 0.14 of float32 where it crosses nodes.
  assert summary["qgz_grad_bytes_ratio"] < 0.2
  # hpZ keeps every gather but the secondary copy's inside the node, and reduces the
  # gradients inside it first; with qwZ and qgZ the cross-node bytes fall below a quarter.
  assert summary["hpz_cross_node_bytes_ratio"] < 0.2
  assert summary["zeropp_cross_node_bytes_ratio"] <= 0.25
  # An explicit reduce-scatter sends (N-1)/N of the gradient, the all-reduce 2(N-1)/N.
  assert 0.4 < summary["zero2_grad_bytes_ratio_vs_allreduce"] <= 0.55
  assert 0.4 < summary["zero3_grad_bytes_ratio_vs_allreduce"] <= 0.55


def test_milo_quick(tmp_path):
  # Its own process: it trains on one device.
  summary = run_experiment_subprocess("milo", tmp_path)["summary"]
  for key in ("float_ppl", "int3_ppl", "int4_ppl", "milo_ppl", "uniform_ppl"):
    assert summary[key] > 1
  assert "milo_ppl_gap_recovered" in summary
  # Group of 32 rows, float16 scale and minimum: 3 + 1 bits per weight of 32; INT4 5 of 32.
  assert summary["int3_bytes_ratio_vs_fp32"] == 4 / 32
  assert summary["int4_bytes_ratio_vs_fp32"] == 5 / 32
  # Mean rank 2 on every [32, 64] matrix (16 per MoE layer) in float16: 2 · 96 · 2 bytes.
  budget = 4 / 32 + 2 * 96 * 2 / (32 * 64 * 4)
  assert summary["uniform_bytes_ratio_vs_fp32"] == budget
  assert summary["int3_bytes_ratio_vs_fp32"] < summary["milo_bytes_ratio_vs_fp32"] <= budget
