"""Device mesh and parameter placement.

The train step is one `jax.jit` over a `Mesh` with axes (data, fsdp, tensor):
  data    batch sharded, parameters replicated   (data parallel)
  fsdp    batch sharded, parameters sharded      (ZeRO-3 / fully sharded data parallel)
  tensor  parameters sharded on heads / mlp / vocab (Megatron-style tensor parallel)
Parameters name their dimensions with logical axes (models/); `LOGICAL_RULES` maps those names to
mesh axes, so the model code never mentions the mesh.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dft_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis. Unlisted names ("layers", "head_dim", "norm") stay replicated. A
# dimension takes its axis only if no earlier dimension of the array took it: expert weights
# [layers, expert, embed, mlp] are stored whole-expert per fsdp device (E / fsdp experts each; the
# compiler gathers them for the grouped matmul, as it gathers FSDP shards), the router
# [layers, embed, expert] by embed.
LOGICAL_RULES = (
    ("expert", "fsdp"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
)


def mesh_shape(mesh_cfg, num_devices):
  """Resolves `mesh.{data,fsdp,tensor}` (one of them may be -1 = the rest) against the devices."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}={s}: sizes must be positive or -1 (the rest of the devices)")
  if len(free) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh.{free[0]}=-1: {num_devices} devices are not divisible by the other axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
        f"mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} must equal "
        f"the {num_devices} available devices")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg, devices=None):
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_shards(mesh):
  """How many ways the batch dimension is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh):
  """Rows split over (data, fsdp); the sequence dimension is whole on each device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def logical_to_mesh_spec(logical_axes, shape, mesh, rules=LOGICAL_RULES):
  """PartitionSpec for one array: each logical name becomes its mesh axis when that axis divides
  the dimension and is not used yet by an earlier dimension; otherwise the dimension is replicated."""
  rule = dict(rules)
  used, spec = set(), []
  for name, dim in zip(logical_axes, shape):
    axis = rule.get(name)
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def param_shardings(abstract_params, logical_axes, mesh, rules=LOGICAL_RULES):
  """NamedSharding tree for a params tree, from the matching tree of logical-axis tuples."""
  return jax.tree.map(
      lambda x, names: NamedSharding(mesh, logical_to_mesh_spec(names, x.shape, mesh, rules)),
      abstract_params, logical_axes)
