"""Host memory of a command, phase by phase: its resident set sampled while it runs.

  python benchmarks/host_memory.py [--every_s=0.25] [--log=FILE] -- python -m dft_jax.train [flags]

Runs the command, reads its VmRSS from /proc every `every_s` seconds and prints the peak, then the
peak seen after each line the command printed (a progress bar's redraws count as lines), so a
phase's memory reads next to the phase's own message. Linux only (/proc). --log keeps the
command's output. The figures of docs/speed.md "Host memory" come from this and `/usr/bin/time -v`.
"""
import argparse
import subprocess
import sys
import threading
import time


def resident_bytes(pid):
  """VmRSS of process `pid` in bytes; None once it has gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    return None
  return None


def sample(command, every_s):
  """Runs `command`; returns (exit code, [(seconds, printed line)], [(seconds, rss bytes)])."""
  t0 = time.monotonic()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1)  # text mode: a progress bar's \r ends a line too
  lines = []

  def read():
    for line in proc.stdout:
      lines.append((time.monotonic() - t0, line.rstrip()))
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  samples = []
  while proc.poll() is None:
    rss = resident_bytes(proc.pid)
    if rss is not None:
      samples.append((time.monotonic() - t0, rss))
    time.sleep(every_s)
  reader.join(timeout=10)
  return proc.returncode, lines, samples


def peak_after_each_line(lines, samples):
  """[(line, peak rss bytes while it was the last line printed)], in order, each line once."""
  peaks, order, j = {}, [], 0
  for t, rss in samples:
    while j < len(lines) and lines[j][0] <= t:
      j += 1
    line = lines[j - 1][1] if j else "(before any output)"
    if line not in peaks:
      order.append(line)
    peaks[line] = max(peaks.get(line, 0), rss)
  return [(line, peaks[line]) for line in order]


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--every_s", type=float, default=0.25)
  p.add_argument("--log", help="write the command's output here")
  p.add_argument("--min_gb", type=float, default=1.0, help="list phases that reached this")
  p.add_argument("command", nargs=argparse.REMAINDER)
  args = p.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    p.error("give the command to measure after --")
  code, lines, samples = sample(command, args.every_s)
  if args.log:
    with open(args.log, "w") as f:
      f.write("\n".join(line for _, line in lines) + "\n")
  if not samples:
    print(f"exit {code}: no sample (the command ended within {args.every_s} s)")
    return code
  t, rss = max(samples, key=lambda s: s[1])
  print(f"exit {code}, {samples[-1][0]:.0f} s: peak {rss / 1e9:.2f} GB at {t:.0f} s")
  for line, peak in peak_after_each_line(lines, samples):
    if peak >= args.min_gb * 1e9:
      print(f"  {peak / 1e9:5.2f} GB after: {line[:90]}")
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
