"""Bytes and rounds of communication, read from compiled HLO text.

Cost model, per device, for a collective over a group of P devices whose
result holds R bytes (ring algorithms, as NCCL and gloo use):

* all-reduce: 2(P−1)/P · R (reduce-scatter, then all-gather);
* all-gather, all-to-all: (P−1)/P · R (everything but the device's own part);
* reduce-scatter: (P−1) · R (R is one device's share of the input);
* collective-permute: R.

Reading the compiled program, not the Python, counts what XLA really emits,
after its own fusion, combination or decomposition of collectives.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
OPS = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(OPS) + r")\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_EXPLICIT_GROUPS = re.compile(
    r"(?:replica_groups|source_target_pairs)=\{(?P<groups>(?:\{[\d,]*\},?)+)\}")
_IOTA_GROUPS = re.compile(
    r"replica_groups=\[(?P<shape>[\d,]+)\]<=\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<used>[^}]*)\}")

Groups = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program.

  Attributes:
    op: one of ``OPS``.
    result_bytes: bytes of its result on one device.
    groups: the device groups that communicate (device ids of the program; a
      collective-permute's source-target pairs).
    runs: how many times one step runs it: the product of the known trip
      counts of the while loops around it (e.g. a scan over microbatches).
  """

  op: str
  result_bytes: int
  groups: Groups
  runs: int = 1

  @property
  def group_size(self) -> int:
    return 2 if self.op == "collective-permute" else len(self.groups[0])

  @property
  def sent_bytes(self) -> float:
    """Bytes each device sends, under the ring cost model of the module docstring."""
    p, r = self.group_size, self.result_bytes
    if p <= 1:
      return 0.0
    if self.op == "all-reduce":
      return 2 * (p - 1) / p * r
    if self.op in ("all-gather", "all-to-all"):
      return (p - 1) / p * r
    if self.op == "reduce-scatter":
      return (p - 1) * r
    return float(r)

  @property
  def is_scalar(self) -> bool:
    """Scalar bookkeeping (losses, norms, counts) rather than a payload."""
    return self.result_bytes <= 64

  def crosses(self, devices_per_node: int) -> bool:
    """Whether a group spans devices of two nodes (ids ``n·devices_per_node`` onward)."""
    return any(len({d // devices_per_node for d in group}) > 1 for group in self.groups)


def replica_groups(line: str, num_devices: int) -> Groups:
  """The device groups of one collective instruction, in any of XLA's three notations
  (explicit lists, an iota with an optional transpose, a named mesh); all devices when
  it has none."""
  if match := _EXPLICIT_GROUPS.search(line):
    return tuple(tuple(int(d) for d in g.split(",") if d)
                 for g in re.findall(r"\{([\d,]*)\}", match["groups"]))
  if match := _IOTA_GROUPS.search(line):
    ids = np.arange(num_devices).reshape([int(d) for d in match["dims"].split(",")])
    if match["perm"]:
      ids = ids.transpose([int(d) for d in match["perm"].split(",")])
    return tuple(map(tuple, ids.reshape([int(d) for d in match["shape"].split(",")]).tolist()))
  if match := _MESH_GROUPS.search(line):
    axes = re.findall(r"'(\w+)'=(\d+)", match["axes"])
    used = set(re.findall(r"'(\w+)'", match["used"]))
    ids = np.arange(num_devices).reshape([int(size) for _, size in axes])
    order = [i for i, (a, _) in enumerate(axes) if a not in used] + [
        i for i, (a, _) in enumerate(axes) if a in used]
    size = math.prod(int(n) for a, n in axes if a in used)
    return tuple(map(tuple, ids.transpose(order).reshape(-1, size).tolist()))
  return (tuple(range(num_devices)),)


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(")
_WHILE = re.compile(r"\swhile\(.*\bbody=%(?P<body>[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"')


def loop_runs(hlo_text: str) -> dict[str, int]:
  """Computation name -> how many times one run of the program runs it, for the bodies of
  while loops with a known trip count (nested loops multiply); others run once."""
  parent_of, trips = {}, {}
  computation = None
  for line in hlo_text.splitlines():
    if match := _COMPUTATION.match(line):
      computation = match["name"]
    elif (match := _WHILE.search(line)) and (trip := _TRIP_COUNT.search(line)):
      parent_of[match["body"]], trips[match["body"]] = computation, int(trip["n"])

  def runs(name: str) -> int:
    return trips[name] * runs(parent_of[name]) if name in trips else 1
  return {name: runs(name) for name in trips}


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective instruction in ``hlo_text`` (``compiled.as_text()``)."""
  found = []
  loops = loop_runs(hlo_text)
  computation = None
  for line in hlo_text.splitlines():
    if heading := _COMPUTATION.match(line):
      computation = heading["name"]
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    result = sum(DTYPE_BYTES[a["dtype"]] * math.prod(int(d) for d in a["dims"].split(",") if d)
                 for a in _ARRAY.finditer(match["type"]))
    found.append(Collective(match["op"], result, replica_groups(line, num_devices),
                            loops.get(computation, 1)))
  return found


def communication(hlo_text: str, num_devices: int) -> dict[str, float]:
  """``{"bytes": sent per device, "rounds": payload collectives, "scalar_ops": ...}``."""
  ops = collectives(hlo_text, num_devices)
  return {"bytes": sum(c.sent_bytes for c in ops),
          "rounds": sum(not c.is_scalar for c in ops),
          "scalar_ops": sum(c.is_scalar for c in ops)}
