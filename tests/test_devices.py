"""Peak FLOP/s by device kind and the layout ``fit_parallel`` chooses."""

import math
from types import SimpleNamespace

import jax
import pytest

from jaxspeed.config import default_config
from jaxspeed.parallel.devices import HOST_CPU_PEAK, fit_config_layout, fit_layout, peak_flops


def _devices(kind, n, platform="gpu"):
  return [SimpleNamespace(device_kind=kind, platform=platform, process_index=0)] * n


@pytest.mark.parametrize("kind,dtype,per_device", [
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("TPU v5 lite", "float32", 197e12),
    ("TPU v5p", "bfloat16", 459e12),
])
def test_peak_is_per_device_figure_times_device_count(kind, dtype, per_device):
  peak, source = peak_flops(0.0, dtype, _devices(kind, 4))
  assert peak == 4 * per_device and kind in source


def test_cpu_peak_is_per_host_and_the_config_key_overrides_the_table():
  assert peak_flops(0.0, "float32", jax.devices())[0] == HOST_CPU_PEAK  # 8 virtual, one host
  assert peak_flops(5e12, "float32", _devices("NVIDIA A100", 8)) == (5e12, "config.peak_flops")
  peak, source = peak_flops(0.0, "float32", _devices("Some NPU", 1))
  assert math.isnan(peak) and "config.peak_flops" in source


@pytest.mark.parametrize("devices,expected", [
    (8, {"data": 2, "fsdp": 2, "tensor": 2}),
    (4, {"data": 1, "fsdp": 2, "tensor": 2}),
    (2, {"data": 1, "fsdp": 2, "tensor": 1}),
    (6, {"data": 3, "fsdp": 2, "tensor": 1}),
    (1, {"data": 1, "fsdp": 1, "tensor": 1}),
])
def test_fit_layout_drops_inner_axes_and_fills_data(devices, expected):
  shape = fit_layout({"data": 2, "fsdp": 2, "tensor": 2}, devices)
  assert {a: shape[a] for a in expected} == expected
  assert math.prod(shape.values()) == devices


def test_fit_config_layout_says_what_it_chose_and_only_when_asked(capsys):
  config = default_config()
  config.parallel.update(data=2, fsdp=2, tensor=2)
  fit_config_layout(config, jax.devices()[:1])  # fit_parallel is off: untouched, silent
  assert config.parallel.tensor == 2 and not capsys.readouterr().out
  config.fit_parallel = True
  fit_config_layout(config, jax.devices()[:1])
  assert (config.parallel.data, config.parallel.fsdp, config.parallel.tensor) == (1, 1, 1)
  out = capsys.readouterr().out
  assert out.count("\n") == 1 and out.startswith("mesh: one device (1 x cpu)")
