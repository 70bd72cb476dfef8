# Shell helpers shared by the device scripts (run_all.sh, multi_gpu.sh, family_recipes.sh): sourced, not run.
# Each script sets PY (the interpreter) and STEPS (its sections) before using them.

# A section header with the UTC time, so a log shows where a call's minutes went.
hr() { printf '\n===== %s  [%s] =====\n' "$1" "$(date -u +%H:%M:%S)"; }

# Is section $1 among $STEPS?
want() { [[ " $STEPS " == *" $1 "* ]]; }

# run_section NAME TIMEOUT_S COMMAND...: run one section under its own time limit, so one hang cannot eat the
# call; its status goes into RESULT[NAME] (declare -A RESULT first) for the summary, and the script goes on.
run_section() {
  local name=$1 limit=$2
  shift 2
  hr "$name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=30 "$limit" "$@"
  local rc=$?
  RESULT[$name]="rc=$rc in $((SECONDS - t0))s$([[ $rc == 124 ]] && echo ' (TIMED OUT)')"
  echo "----- $name: ${RESULT[$name]}"
  return 0
}

# keep FILE...: copy the outputs that exist into $OUT (the device returns what lies there).
keep() {
  for f in "$@"; do [[ -f "$f" ]] && cp "$f" "$OUT/"; done
  return 0
}

# install_wheels WHEEL...: install the carried wheels (the packages the GPU image lacks) into /tmp/site, without
# the network, and put it on PYTHONPATH. Returns 1 (and says so) when pip fails; 0 when there is nothing to do.
install_wheels() {
  (( $# )) || return 0
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed carried wheels: ${*##*/}"
  else
    echo "WARNING: installing the carried wheels failed; peers and datasets may be missing"
    return 1
  fi
}

# print_versions MODULE...: each module's version (or why it does not import), for the log of a measured run.
print_versions() {
  "$PY" - "$@" <<'PYEOF'
import importlib
import sys

for mod in sys.argv[1:]:
    try:
        print(f"{mod:18s} {getattr(importlib.import_module(mod), '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{mod:18s} NOT IMPORTABLE: {type(exc).__name__}: {str(exc)[:160]}")
PYEOF
}
