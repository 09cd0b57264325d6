"""The universal checkpoint: a run's newest state, one full unsharded array per logical leaf.

Universal Checkpointing (Lian et al. 2024, arXiv 2406.18820) keeps, for every
parameter, its consolidated value and optimizer states in a form that no
longer depends on the layout that trained it, so that any other layout can
load it. Here that form is a directory::

  out_dir/index.json      format, step, the run config, the data-iterator state,
                          and per leaf: path, file, shape, dtype, logical axes
  out_dir/<path>.npy      one numpy array per leaf, e.g. params/layer_0/mlp/wi/kernel.npy
  out_dir/tokenizer.json  the run's BPE tokenizer, if it had one

Leaf paths are the train state's (``params/...``, ``opt_state/0/mu/...``,
``step``, ``rng``), with pipeline-stacked layers split back into
``layer_i`` (``jaxspeed.checkpoint.layout.unstack``). The 1-bit optimizers'
per-worker state keeps its worker axis; it is converted when a run restores
it with another worker count.

``import_universal`` writes a run directory holding that state as its newest
checkpoint; ``jaxspeed.train`` (or ``experiments.generate``) then resumes it
under any layout of the same model and optimizer, converting on restore.
``load_params`` takes only the parameters, of a universal checkpoint or of a
run directory, to start a new run with any optimizer (``init_params_from``):
fine-tuning.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from jaxspeed.checkpoint.layout import (
    PARAMS,
    LayoutError,
    Path,
    convert,
    flatten_with_paths,
    path_tuple,
    place,
    unstack,
)
from jaxspeed.checkpoint.run_files import (
    CONFIG_FILE,
    Checkpointer,
    checkpoint_dir,
    config_from_saved,
    has_checkpoint,
    write_atomic,
)
from jaxspeed.errors import ConfigError, FlagError

FORMAT = "jaxspeed-universal"
VERSION = 1
INDEX = "index.json"
TOKENIZER = "tokenizer.json"
WORKERS = "workers"  # the logical name of the 1-bit per-worker axis
MASTER = ("opt_state", "master")  # float32 master weights (``MasterWeightsState``)


def export_universal(workdir: str, out_dir: str) -> str:
  """Writes the newest checkpoint of the run in ``workdir`` as a universal checkpoint.

  Args:
    workdir: a run directory (``config.json`` and ``checkpoints/``), any layout.
    out_dir: where to write; must be empty or not exist.

  Returns:
    The path of the written ``index.json`` (written last: a directory without it is
    an interrupted export).

  Raises:
    FlagError: naming ``workdir`` (no config or checkpoint) or ``universal_dir``
      (``out_dir`` is not empty).
  """
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(config_path) or not has_checkpoint(workdir):
    raise FlagError("workdir", f"{workdir} holds no trained run (needs {CONFIG_FILE} and a "
                    "checkpoint); train with experiments.train first")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FlagError("universal_dir", f"{out_dir} is not empty; export into a new directory")
  with open(config_path) as f:
    config = json.load(f)
  step, leaves, data = _newest_on_host(workdir)
  leaves = unstack(leaves)
  axes = _logical_axes(config)
  entries = []
  for path in sorted(leaves):
    value = np.asarray(leaves[path])
    file = _leaf_file(path)
    os.makedirs(os.path.dirname(os.path.join(out_dir, file)), exist_ok=True)
    np.save(os.path.join(out_dir, file), value)
    entries.append({"path": "/".join(path), "file": file, "shape": list(value.shape),
                    "dtype": value.dtype.name, "logical_axes": _axes_of(path, value, axes)})
  if os.path.exists(os.path.join(workdir, TOKENIZER)):
    shutil.copy(os.path.join(workdir, TOKENIZER), os.path.join(out_dir, TOKENIZER))
  index = {"format": FORMAT, "version": VERSION, "step": int(step), "config": config,
           "data": data, "leaves": entries}
  index_path = os.path.join(out_dir, INDEX)
  write_atomic(index_path, json.dumps(index, indent=1))
  return index_path


def read_index(universal_dir: str) -> dict[str, Any]:
  """The index of a universal checkpoint (step, config, data state, leaves).

  Raises:
    FlagError: naming ``universal_dir``: no index, or not one of this format.
  """
  index_path = os.path.join(universal_dir, INDEX)
  try:
    with open(index_path) as f:
      index = json.load(f)
  except FileNotFoundError:
    raise FlagError("universal_dir", f"{index_path} not found: not a universal checkpoint, or "
                    "an interrupted export") from None
  except (OSError, ValueError) as e:
    raise FlagError("universal_dir", f"{index_path} is unreadable ({e})") from e
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise FlagError("universal_dir", f"{index_path} is not a {FORMAT} index")
  if index.get("version") != VERSION:
    raise FlagError("universal_dir", f"{index_path} has version {index.get('version')}; this "
                    f"jaxspeed reads version {VERSION}")
  return index


def read_universal(universal_dir: str) -> tuple[dict[str, Any], dict[Path, np.ndarray]]:
  """(the index, every leaf by path), each leaf checked against the index.

  Raises:
    FlagError: naming ``universal_dir``: a bad index (``read_index``), or a leaf file that
      is missing, truncated or of another shape or dtype than the index says.
  """
  index = read_index(universal_dir)
  leaves = {}
  for entry in index["leaves"]:
    file = os.path.join(universal_dir, entry["file"])
    try:
      value = np.load(file, allow_pickle=False)
    except FileNotFoundError:
      raise FlagError("universal_dir", f"{file} is missing") from None
    except (OSError, ValueError, EOFError) as e:
      raise FlagError("universal_dir", f"{file} is truncated or unreadable ({e})") from e
    value = _with_dtype(value, entry["dtype"])
    if list(value.shape) != entry["shape"] or value.dtype.name != entry["dtype"]:
      raise FlagError("universal_dir", f"{file} is {value.dtype.name}{list(value.shape)}, the "
                      f"index says {entry['dtype']}{entry['shape']}")
    leaves[tuple(entry["path"].split("/"))] = value
  return index, leaves


def import_universal(universal_dir: str, workdir: str) -> int:
  """Writes a run directory whose newest checkpoint is the universal checkpoint's state.

  ``jaxspeed.train`` then resumes it under any layout of the same model and
  optimizer (the saved config is the exported run's; a config that changes
  the model or optimizer is refused as for any resume), and
  ``experiments.generate`` samples from it.

  Returns:
    The step of the imported state.

  Raises:
    FlagError: a bad universal checkpoint (``read_universal``), or a ``workdir`` that
      already holds checkpoints.
  """
  if has_checkpoint(workdir):
    raise FlagError("workdir", f"{workdir} already holds a run; import into a new directory")
  index, leaves = read_universal(universal_dir)
  tree: dict[str, Any] = {}
  for path, value in leaves.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  tree = _sequences(tree)
  os.makedirs(workdir, exist_ok=True)
  write_atomic(os.path.join(workdir, CONFIG_FILE), json.dumps(index["config"], indent=2))
  if os.path.exists(os.path.join(universal_dir, TOKENIZER)):
    shutil.copy(os.path.join(universal_dir, TOKENIZER), os.path.join(workdir, TOKENIZER))
  checkpointer = Checkpointer(checkpoint_dir(workdir))
  try:
    checkpointer.save(index["step"], tree, index["data"])
  finally:
    checkpointer.close()
  return index["step"]


def check_params_source(source: str, key: str = "init_params_from") -> None:
  """Raises ``ConfigError`` naming ``key`` unless ``source`` is a universal checkpoint or a
  run directory with a checkpoint (``load_params`` reads either)."""
  if not os.path.exists(os.path.join(source, INDEX)) and not has_checkpoint(source):
    raise ConfigError(key, f"{source} is neither a universal checkpoint (no {INDEX}) nor a run "
                      "directory with a checkpoint")


def load_params(source: str, target: Any, key: str = "init_params_from") -> tuple[Any, int]:
  """The parameters of a universal checkpoint or of a run's newest checkpoint, placed as
  ``target`` wants them, and the step they were saved at.

  Only the parameters are read (their float32 master weights, if the run kept
  some), so the new run may use any optimizer and parameter dtype; pipeline
  stacking is converted as on a restore (``jaxspeed.checkpoint.layout``).

  Args:
    source: a universal checkpoint directory (``index.json``) or a run directory.
    target: the params tree as ShapeDtypeStructs with shardings.
    key: the config key that named ``source``, for errors.

  Raises:
    ConfigError: naming ``key``: ``source`` is neither, is damaged, or holds parameters of
      another model (naming the first leaf that differs).
  """
  check_params_source(source, key)
  try:
    if os.path.exists(os.path.join(source, INDEX)):
      index, leaves = read_universal(source)
      step = index["step"]
    else:
      step, leaves, _ = _newest_on_host(source)
    # A run with low-precision parameters saved their float32 master too: take that.
    masters = {(PARAMS, *path[2:]): value for path, value in leaves.items()
               if path[:2] == MASTER}
    params = masters or {path: value for path, value in leaves.items() if path[0] == PARAMS}
    wanted = flatten_with_paths({PARAMS: target})
    dtypes = {np.dtype(leaf.dtype) for leaf in wanted.values()}
    if len(dtypes) == 1:  # the parameters' storage dtype is the new run's choice
      (dtype,) = dtypes
      params = {path: value.astype(dtype) for path, value in params.items()}
    return place(convert(params, wanted), {PARAMS: target})[PARAMS], int(step)
  except FlagError as e:  # a damaged universal checkpoint, naming its file
    raise ConfigError(key, e.message) from e
  except LayoutError as e:
    raise ConfigError(key, f"{source} holds another model's parameters: {e}") from e


def _newest_on_host(workdir: str) -> tuple[int, dict[Path, np.ndarray], dict[str, Any]]:
  """(step, leaves by path as host arrays in the saved layout, data state) of the newest
  checkpoint of the run in ``workdir``."""
  checkpointer = Checkpointer(checkpoint_dir(workdir))
  try:
    step = checkpointer.latest_step()
    leaves, data = checkpointer.restore_host(step)
  finally:
    checkpointer.close()
  return step, leaves, data


def _sequences(node: Any) -> Any:
  """Nested dicts -> the saved containers: a dict keyed "0".."n-1" was a tuple (a list in
  orbax's tree), which a restore target must match."""
  if not isinstance(node, dict):
    return node
  node = {k: _sequences(v) for k, v in node.items()}
  if node and sorted(node) == sorted(str(i) for i in range(len(node))):
    return [node[str(i)] for i in range(len(node))]
  return node


def _leaf_file(path: Path) -> str:
  return os.path.join(*path) + ".npy"


def _with_dtype(value: np.ndarray, name: str) -> np.ndarray:
  """``np.save`` writes extension dtypes (bfloat16) as raw bytes: view them as ``name``."""
  if value.dtype.kind == "V":
    import ml_dtypes  # noqa: F401  (registers bfloat16 and friends with numpy)

    try:
      return value.view(np.dtype(name))
    except TypeError:
      return value
  return value


def _axes_of(path: Path, value: np.ndarray, axes: dict[Path, tuple]) -> list | None:
  """A leaf's logical axes: its parameter's, led by ``workers`` for a per-worker copy."""
  keys = [path] if path[0] == PARAMS else [(PARAMS, *path[s:]) for s in range(1, len(path))]
  param_axes = next((axes[k] for k in keys if k in axes), None)
  if param_axes is None or value.ndim not in (len(param_axes), len(param_axes) + 1):
    return None
  return [WORKERS] * (value.ndim - len(param_axes)) + list(param_axes)


def _logical_axes(config: dict[str, Any]) -> dict[Path, tuple[str | None, ...]]:
  """Each unstacked parameter's logical axis names, from the run's saved model config."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from jaxspeed.config import default_config
  from jaxspeed.models import ModelConfig, build_model
  from jaxspeed.moe import MoeConfig

  full = config_from_saved(config, default_config())
  model = build_model(full.model.name, ModelConfig.from_config(
      full.model, MoeConfig.from_config(full.moe)), 1, 1)
  tokens = jnp.zeros((1, full.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
  specs = nn.get_partition_spec(boxed)
  leaves = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  return {(PARAMS, *path_tuple(p)): tuple(spec) for p, spec in leaves}
