"""Scaling of the full train step over the GPUs of one host: data, FSDP, data x FSDP.

  python benchmarks/scaling.py --out=DIR [--budget_s=480] [--ns=1,2,4,8]   # this machine's plan
  python benchmarks/scaling.py --smoke --out=DIR      # tiny shapes, 8 fake CPU devices (tests)
  python benchmarks/scaling.py --case --config.mesh.fsdp=2 --config.bench.devices=2 \
      --config.bench.layout=fsdp --config.train.global_batch_size=8   # one case, in this process

A case's fields are configs/benchmark.py's (the main job's names: mesh.data, mesh.fsdp,
train.global_batch_size, ...; bench.devices and bench.layout name the devices it takes), set as
`--config.<field>=<value>` in its process. Every case is dft_jax.step.make_train_step (DFT, Qwen2.5-1.5B shape, 4096 tokens a row, random
packed rows from benchmarks/train_step.py) on the first n devices, `jax.devices()[:n]`, in a mesh

  data       n x 1 x 1   parameters and AdamW state replicated, gradients all-reduced
  fsdp       1 x n x 1   parameters and gradients sharded over n ("embed" axis), and the AdamW
                         moments once step.init_train_state places them like their parameters
  data_fsdp  2 x n/2 x 1 (n >= 4) FSDP within each half, data parallel across the halves

each in a fresh process (the allocator's peak only grows). Weak scaling: rows_per_gpu rows per
GPU, global batch rows_per_gpu * n; strong scaling: strong_batch rows whatever n. The parameters
are created in place on their shards (no device ever holds the whole model), then the step is
compiled (AOT) and timed like train_step.py (median of `steps` after `warmup`).

  tokens_per_s_per_gpu = global batch * seq_len / median step time / n
  mfu                  = tokens_per_s * (6 N + 12 L d T) / (n * peak FLOP/s of one GPU)
  weak_efficiency      = tokens_per_s_per_gpu / tokens_per_s of 1 GPU at rows_per_gpu rows
  strong_efficiency    = tokens_per_s_per_gpu / tokens_per_s of 1 GPU at the same global batch
                       = speed-up / n
MFU over the 1-GPU MFU equals weak_efficiency (same FLOPs per token). The large case (Qwen2.5-7B
shape, fsdp over every GPU) shows that the sharding rules hold a state one GPU cannot.
"""
import json
import math
import os
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import plans  # pylint: disable=g-import-not-at-top
from benchmarks import train_step as bench  # pylint: disable=g-import-not-at-top
from dft_jax import cli  # pylint: disable=g-import-not-at-top
from dft_jax.errors import cli_entry  # pylint: disable=g-import-not-at-top

GIB = 2 ** 30
GPU_COUNTS = (1, 2, 4, 8)
LAYOUTS = {  # layout -> mesh over n devices (None: not defined for n)
    "single": lambda n: dict(data=1, fsdp=1, tensor=1) if n == 1 else None,
    "data": lambda n: dict(data=n, fsdp=1, tensor=1),
    "fsdp": lambda n: dict(data=1, fsdp=n, tensor=1),
    "data_fsdp": lambda n: dict(data=2, fsdp=n // 2, tensor=1) if n >= 4 and n % 2 == 0 else None,
}
# Overlap of collectives with compute (README "XLA flags"): one extra case at the largest n.
OVERLAP_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
                 "--xla_gpu_enable_while_loop_double_buffering=true")
SMOKE_DEVICES = 8
SMOKE_XLA_FLAGS = plans.SMOKE_XLA_FLAGS

# The shapes of each plan: overrides of configs/benchmark.py. est_s: process start + init +
# compile + steps on an H200 (train_step.py's 1.5B cases took 20-37 s on one H100).
SETTINGS = {
    "gpu": dict(
        base={"model.name": "preset:qwen2.5-1.5b", "objective.name": "dft",
              "train.seq_len": 4096, "model.remat": "dots_attention_saveable",
              "bench.est_s": 50},
        rows_per_gpu=4, strong_batch=8,
        large={"model.name": "preset:qwen2.5-7b", "model.remat": "nothing_saveable",
               "bench.steps": 5, "bench.warmup": 1, "bench.est_s": 150},
        large_rows_per_gpu=4, overlap_flags=OVERLAP_FLAGS),
    "smoke": dict(
        base={**plans.TINY, "bench.xla_flags": "", "bench.est_s": 10},
        rows_per_gpu=1, strong_batch=8,
        large={"model.name": "preset:tiny-llama"}, large_rows_per_gpu=1, overlap_flags=""),
}


# ----------------------------------------------------------------------------- the plan


def case(setting, layout, n, batch, large=False, xla_flags=""):
  """One case: (name, overrides of configs/benchmark.py) with its layout, GPU count and mesh."""
  s = SETTINGS[setting]
  overrides = {**s["base"], **(s["large"] if large else {}), "bench.layout": layout,
               "bench.devices": n, "train.global_batch_size": batch, "bench.xla_flags": xla_flags,
               **{f"mesh.{axis}": size for axis, size in LAYOUTS[layout](n).items()}}
  model = overrides["model.name"].removeprefix("preset:").removeprefix("qwen2.5-")
  return (f"{model}/{layout}/{n}x/b{batch}" + ("/overlap" if xla_flags else ""), overrides)


def plan(setting, ns):
  """Cases in priority order (the budget skips the tail) for the GPU counts `ns` (1 included):
  the 1-GPU base; data x fsdp (or data and fsdp when that is all n = 2 allows) at the largest n;
  the large model over FSDP; the other layouts at the largest n; strong scaling at the largest
  n; collective-overlap flags; the intermediate n; the large model on one GPU (expected to fail).
  A case that repeats an earlier one (same layout, n and batch) is left out."""
  s = SETTINGS[setting]
  rows, strong = s["rows_per_gpu"], s["strong_batch"]
  ns = sorted(set(ns) | {1})
  top, middle = ns[-1], ns[-2:0:-1]
  weak = lambda n: [case(setting, l, n, rows * n) for l in ("data_fsdp", "data", "fsdp")
                    if LAYOUTS[l](n)]
  large = lambda n, layout: case(setting, layout, n, s["large_rows_per_gpu"] * n, large=True)
  cases = [case(setting, "single", 1, rows)]
  if top > 1:
    targets = 1 if top >= 4 else 2  # data_fsdp; on 2 GPUs data and fsdp
    cases += weak(top)[:targets] + [large(top, "fsdp")] + weak(top)[targets:]
    cases += [case(setting, "single", 1, strong), case(setting, "fsdp", top, strong)]
    if s["overlap_flags"]:
      cases.append(case(setting, "data_fsdp" if top >= 4 else "fsdp", top, rows * top,
                        xla_flags=s["overlap_flags"]))
    for n in middle:
      cases += weak(n)
    cases += [case(setting, "fsdp", n, strong) for n in middle]
  cases.append(large(1, "single"))
  seen, unique = set(), []
  for name, o in cases:
    n, rows = o["bench.devices"], o["train.global_batch_size"]
    if name not in seen and (n == 1 or rows % n == 0):
      seen.add(name)
      unique.append((name, o))
  return unique


def skip_reason(overrides, device_count):
  n = overrides["bench.devices"]
  return f"needs {n} devices, this machine has {device_count}" if n > device_count else None


def case_fields(config):
  """The record fields of a case (train_step.knobs plus its layout, GPU count and mesh)."""
  return dict(bench.knobs(config), layout=config.bench.layout, n_gpus=config.bench.devices,
              mesh={axis: config.mesh[axis] for axis in ("data", "fsdp", "tensor")})


# ----------------------------------------------------------------------------- one case


def bytes_per_device(tree):
  """Bytes of the tree's arrays on one device (every sharding here splits evenly)."""
  import jax
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


def memory_fields(state, devices):
  """Allocator peaks per device, and the train state's bytes: per device, and whole (what one
  GPU must hold without FSDP). train_bytes_* add one gradient per parameter (as live during the
  backward): 16 bytes a parameter with fp32 parameters and AdamW moments."""
  import jax
  stats = [d.memory_stats() or {} for d in devices]
  peaks = [s.get("peak_bytes_in_use") for s in stats]
  whole = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
  out = dict(peak_bytes_per_device=peaks, peak_bytes=max(peaks) if all(peaks) else None,
             bytes_limit=stats[0].get("bytes_limit"),
             state_bytes_per_device=bytes_per_device(state),
             state_bytes_total=whole(state),
             train_bytes_per_device=bytes_per_device(state) + bytes_per_device(state.params),
             train_bytes_one_gpu=whole(state) + whole(state.params))
  if out["bytes_limit"]:  # < 0: the state and gradients alone exceed one GPU
    out["one_gpu_headroom_bytes"] = out["bytes_limit"] - out["train_bytes_one_gpu"]
  return out


def run_case(config):
  """Builds, compiles and times one case on jax.devices()[:n] in this process -> record fields."""
  import jax
  from dft_jax import sharding, throughput
  from dft_jax import step as step_lib
  n = config.bench.devices
  devices = jax.devices()[:n]
  if len(devices) < n:
    raise RuntimeError(f"needs {n} devices, jax sees {len(jax.devices())}")
  config = bench.step_config(config)
  step_lib.validate(config, n)
  mesh = sharding.make_mesh(config.mesh, devices)
  peak = throughput.peak_flops(devices[0])
  state, _, record = bench.time_train_step(config, mesh,
                                           lambda: bench.sharded_model(config, mesh),
                                           peak * n if peak else None)
  record.update(rows_per_gpu=config.train.global_batch_size // n,
                devices_used=[str(d) for d in mesh.devices.flat], **memory_fields(state, devices))
  record["tokens_per_s_per_gpu"] = record["tokens_per_s"] / n
  return record


def run_one(config):
  """One case in this process -> its record (status ok / oom / error)."""
  return bench.run_recorded(dict(case_fields(config), status="ok"), lambda: run_case(config))


# ----------------------------------------------------------------------------- the run


def child_env(smoke, xla_flags=""):
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if smoke:
    env["JAX_PLATFORMS"] = "cpu"
    flags += f" --xla_force_host_platform_device_count={SMOKE_DEVICES} {SMOKE_XLA_FLAGS}"
  env["XLA_FLAGS"] = f"{flags} {xla_flags}".strip()
  return env


def child(args, env, timeout_s, log, tag):
  """Runs this script with `args` in a fresh process -> (its last `TAG {json}` line or None,
  why not). The parent never initialises a backend: it would hold every GPU's memory."""
  cmd = [sys.executable, os.path.abspath(__file__), *args]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
    out, err, why = proc.stdout, proc.stderr, f"exit {proc.returncode}"
  except subprocess.TimeoutExpired as e:
    text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
    out, err, why = text(e.stdout), text(e.stderr), f"timeout after {timeout_s:.0f} s"
  log.write(f"===== {' '.join(args)[:200]} ({why})\n{out}\n{err}\n")
  log.flush()
  lines = [line for line in out.splitlines() if line.startswith(tag + " ")]
  if lines:
    return json.loads(lines[-1][len(tag) + 1:]), None
  return None, f"{why}: {(err or out)[-2000:]}"


def probe():
  """This machine's devices, as the cases will see them."""
  import jax
  return dict(bench.device_info(), devices=[str(d) for d in jax.devices()],
              device_kinds=sorted({d.device_kind for d in jax.devices()}),
              versions=bench.versions("jax", "jaxlib", "flax", "optax", "numpy"))


def run_plan(setting, out_dir, budget_s, ns=None):
  """Probes the devices, runs the plan's cases one process each within budget_s; writes
  scaling.json and logs.txt under out_dir, prints the table last; returns the result dict."""
  os.makedirs(out_dir, exist_ok=True)
  smoke, started = setting == "smoke", time.perf_counter()
  with open(os.path.join(out_dir, "logs.txt"), "w") as log:
    machine, why = child(["--probe"], child_env(smoke), 300, log, "DEVICES")
    if machine is None:
      raise RuntimeError(f"device probe failed ({why})")
    count = machine["device_count"]
    ns = ns or [n for n in GPU_COUNTS if n <= count]
    records = []
    for name, overrides in plan(setting, ns):
      config = bench.variant_config({"bench.name": name, **overrides})
      left = budget_s - (time.perf_counter() - started)
      skip = skip_reason(overrides, count)
      if skip is None and left < config.bench.est_s:
        skip = f"budget: {left:.0f} s left, needs ~{config.bench.est_s} s"
      if skip:
        record = dict(case_fields(config), status="skipped", error=skip)
      else:  # a hung case may not eat the rest of the budget
        timeout = min(left, max(90.0, 2.5 * config.bench.est_s))
        flags = ["--case", f"--config={bench.BENCH_CONFIG}",
                 *bench.override_flags({"bench.name": name, **overrides})]
        record, why = child(flags, child_env(smoke, config.bench.xla_flags), timeout, log,
                            "RESULT")
        if record is None:
          record = dict(case_fields(config), error=why,
                        status="timeout" if why.startswith("timeout") else "error")
      records.append(record)
      print(f"[{time.perf_counter() - started:6.0f} s] {record['name']}: {record['status']}"
            + (f"  {record['tokens_per_s_per_gpu']:,.0f} tok/s/GPU" if record["status"] == "ok"
               else f"  {record.get('error', '')[:160]}"), flush=True)
  add_efficiency(records)
  result = dict(plan=setting, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                wall_s=time.perf_counter() - started, machine=machine,
                env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "XLA_FLAGS",
                                                      "XLA_PYTHON_CLIENT_MEM_FRACTION")},
                records=records, summary=summarize(records))
  with open(os.path.join(out_dir, "scaling.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(format_table(records, result["summary"]), flush=True)
  return result


# ----------------------------------------------------------------------------- efficiency


def base_key(r, batch):
  return (r["model"], r["objective"], r["seq_len"], r["remat"], batch)


def add_efficiency(records):
  """weak_efficiency / strong_efficiency of every ok record against the ok 1-GPU record (no extra
  XLA flags) of the same model and knobs with rows_per_gpu / the same global batch rows."""
  base = {base_key(r, r["batch"]): r for r in records
          if r["status"] == "ok" and r["n_gpus"] == 1 and not r["xla_flags"]}
  for r in records:
    if r["status"] != "ok":
      continue
    for kind, rows in (("weak", r["rows_per_gpu"]), ("strong", r["batch"])):
      b = base.get(base_key(r, rows))
      r[f"{kind}_efficiency"] = r["tokens_per_s_per_gpu"] / b["tokens_per_s"] if b else None


def summarize(records):
  """Efficiency tables {layout[+overlap]: {n: value}} of the main model, the issue's targets, the
  large model's memory."""
  ok = [r for r in records if r["status"] == "ok"]
  main = records[0]["model"] if records else None
  s = {"weak_efficiency": {}, "strong_efficiency": {}, "targets": [], "large": []}
  for r in ok:
    label = r["layout"] + ("+overlap" if r["xla_flags"] else "")
    for kind in ("weak", "strong"):
      if r["model"] == main and r["n_gpus"] > 1 and r[f"{kind}_efficiency"] is not None:
        s[f"{kind}_efficiency"].setdefault(label, {})[str(r["n_gpus"])] = r[f"{kind}_efficiency"]
  # The targets: >= 95 % on 2 GPUs (data x fsdp is 2x1 or 1x2 there: the data and fsdp rows),
  # >= 90 % on 8 GPUs (data x fsdp), weak scaling.
  for n, layouts, goal in ((2, ("data", "fsdp"), 0.95), (8, ("data_fsdp",), 0.90)):
    for layout in layouts:
      eff = s["weak_efficiency"].get(layout, {}).get(str(n))
      s["targets"].append(dict(n_gpus=n, layout=layout, goal=goal, weak_efficiency=eff,
                               met=None if eff is None else eff >= goal))
  for r in records:
    if r["model"] != main:
      s["large"].append({k: r.get(k) for k in (
          "name", "status", "n_gpus", "mesh", "num_params", "peak_bytes", "bytes_limit",
          "train_bytes_per_device", "train_bytes_one_gpu", "one_gpu_headroom_bytes",
          "tokens_per_s_per_gpu", "mfu", "error")})
  return s


def format_table(records, summary):
  """The table printed last (the device reply keeps the end of the output)."""
  head = (f"{'case':30s} {'status':7s} {'mesh':>7s} {'tok/s/GPU':>9s} {'weak':>6s} "
          f"{'strong':>6s} {'MFU':>6s} {'peak GiB':>8s} {'train GiB':>9s} {'compile':>7s}")
  lines = [head, "-" * len(head)]
  pct = lambda x: f"{100 * x:5.1f}%" if x is not None else "     -"
  gib = lambda x, w: f"{x / GIB:{w}.1f}" if x else " " * (w - 1) + "-"
  for r in records:
    if r["status"] != "ok":
      lines.append(f"{r['name']:30s} {r['status']:7s} {(r.get('error') or '')[-110:]}")
      continue
    m = r["mesh"]
    lines.append(
        f"{r['name']:30s} {'ok':7s} {m['data']:>3d}x{m['fsdp']:<3d} "
        f"{r['tokens_per_s_per_gpu']:9,.0f} {pct(r.get('weak_efficiency'))} "
        f"{pct(r.get('strong_efficiency'))} {pct(r.get('mfu'))} "
        f"{gib(r.get('peak_bytes'), 8)} {gib(r['train_bytes_per_device'], 9)} "
        f"{r['compile_s']:7.1f}")
  lines.append("targets: " + json.dumps(bench.rounded(summary["targets"])))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def main(argv=None):
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = sys.argv if argv is None else argv

  def define_more():
    cli.define("string", "out", "benchmarks/results/scaling_latest", "output folder")
    cli.define("float", "budget_s", 480.0, "wall-time budget of the plan (s)")
    cli.define("list", "ns", [], "GPU counts to run, e.g. 1,2 (default: 1,2,4,8 up to the device "
               "count; 1 always runs, as the base)")
    cli.define("bool", "smoke", False, f"tiny shapes on {SMOKE_DEVICES} fake CPU devices")
    cli.define("bool", "case", False, "run the one case --config describes, in this process")
    cli.define("bool", "probe", False, "print this machine's devices as JSON")
  config = bench.config_from_flags(argv, define_more)
  f = flags.FLAGS
  if f.probe:
    print("DEVICES " + json.dumps(probe()), flush=True)
  elif f.case:
    print("RESULT " + json.dumps(run_one(config)), flush=True)
  else:
    ns = [int(x) for x in f.ns] or None
    run_plan("smoke" if f.smoke else "gpu", f.out, f.budget_s, ns)


if __name__ == "__main__":
  cli_entry(main)()
