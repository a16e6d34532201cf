#!/usr/bin/env bash
# The device check: one prepared command for a lent GPU (an H100/H200 with torch 2.11 and
# triton 3.6, no network), under 8 minutes, leaving one JSON and one log.
#
#   bash benchmarks/device_check.sh [OUTDIR]           # OUTDIR: default $OUT, else ./device-check
#   bash benchmarks/device_check.sh --smoke [OUTDIR]   # a CPU, tiny shapes, about a minute (CI)
#
# Leaves OUTDIR/device_check.json ({"mode", "date", "steps": [{name, exit, seconds,
# limit}], "kernels": benchmarks/kernels.py --json, "bench", "sdxl" and "compile":
# benchmarks/suite.py --json})
# and OUTDIR/device_check.log (everything printed). Exit 0 only if every step exited 0.
#
# Steps, each under its own time limit (so one that hangs cannot spend the others' time;
# the limits add up to 470 s; none has been timed on a GPU yet):
#   environment   versions, the GPU (nvidia-smi)                                      20 s
#   parity        tests/test_kernels_parity.py on CUDA (smoke: not run, CI runs it)     90 s
#   kernels       benchmarks/kernels.py: each kernel against eager and torch.compile   90 s
#   bench         benchmarks/suite.py: U-Net step (fp16, bf16), the 512x512 frame (eager,
#                 CUDA graphs, kernels on/off, channels_last, fp16 and bf16) against the
#                 peers if their wheels were carried, the demo model at 256 and 512,
#                 the temporal parts' cost, the roofline                                150 s
#   sdxl          benchmarks/suite.py --sections sdxl: SDXL-Turbo's architecture at
#                 512x512, 1 step, fp16 and bf16: the U-Net step against diffusers',
#                 the frame (eager, all temporal parts, CUDA graphs)                      60 s
#   compile       benchmarks/suite.py --sections frame --compile: torch.compile, and
#                 compile + CUDA graphs (what fits in its limit)                          60 s
#
# Wheels the GPU machine lacks (PyAV, which the engine needs; diffusers and streamdiffusion,
# the peers): put them in .whl/ at the repository's root and carry it; they are installed
# into a private folder first (see the README, "Benchmarks").
set -u -o pipefail

smoke=0
if [ "${1:-}" = "--smoke" ]; then
  smoke=1
  shift
fi
out="${1:-${OUT:-./device-check}}"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
log="$out/device_check.log"
json="$out/device_check.json"
cd "$(dirname "$0")/.." || exit 2
py="${PYTHON:-python3}"  # on the GPU machine, python3 is the one that holds torch
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
: >"$log"

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== wheels: $(ls .whl)" >>"$log"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    .whl/*.whl >>"$log" 2>&1 && export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME LIMIT_S COMMAND...: run it, log it, record its exit status and seconds
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" >>"$log"
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" >>"$log"
  echo "$name $rc $((SECONDS - start)) $limit" >>"$work/steps"
}

step environment 20 "$py" -c "
import importlib.metadata as m, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')
for name in ('triton', 'av', 'diffusers', 'streamdiffusion', 'opencv-python-headless', 'opencv-python'):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, 'not installed')
"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$log" 2>&1

if [ $smoke = 1 ]; then
  # Looser limits: a CI machine may be shared. The U-Net kernel row is left out here: in
  # Triton's interpreter it takes minutes, and tests/test_kernels_parity.py covers it.
  step kernels 300 "$py" benchmarks/kernels.py --smoke --no-unet --json "$work/kernels.json"
  step bench 300 "$py" benchmarks/suite.py --smoke --sections unet frame demo temporal roofline --json "$work/bench.json"
  step sdxl 300 "$py" benchmarks/suite.py --smoke --sections sdxl --json "$work/sdxl.json"
else
  step parity 90 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_parity.py
  step kernels 90 "$py" benchmarks/kernels.py --json "$work/kernels.json"
  step bench 150 "$py" benchmarks/suite.py --sections unet frame demo temporal roofline --json "$work/bench.json"
  step sdxl 60 "$py" benchmarks/suite.py --sections sdxl --json "$work/sdxl.json"
  step compile 60 "$py" benchmarks/suite.py --sections frame --compile --rounds 3 --json "$work/compile.json"
fi

"$py" - "$work" "$json" "$smoke" <<'EOF' | tee -a "$log"
import datetime, json, sys
from pathlib import Path

work, target, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
steps = [dict(zip(("name", "exit", "seconds", "limit"), line.split()))
         for line in (work / "steps").read_text().splitlines()]
for s in steps:
    s.update(exit=int(s["exit"]), seconds=int(s["seconds"]), limit=int(s["limit"]),
             status={0: "ok", 124: "timed out", 137: "killed at its limit"}.get(int(s["exit"]), "failed"))

def read(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None

report = {"mode": "smoke (CPU, tiny shapes)" if smoke else "device",
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "steps": steps, "kernels": read("kernels.json"), "bench": read("bench.json"),
          "sdxl": read("sdxl.json"), "compile": read("compile.json")}
if smoke:
    report["parity"] = "not run in smoke mode: CI runs tests/test_kernels_parity.py itself"
target.write_text(json.dumps(report, indent=1) + "\n")
print(" ".join(f"{s['name']}: {s['status']} ({s['seconds']} s)" for s in steps))
sys.exit(0 if all(s["exit"] == 0 for s in steps) else 1)
EOF
rc=${PIPESTATUS[0]}
echo "device check: $json, $log" | tee -a "$log"
exit $rc
