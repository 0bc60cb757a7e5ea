#!/usr/bin/env bash
# Creates or updates a virtualenv with every install unit (editable) and the dev tools.
#   scripts/setup-venv.sh VENV locked   the exact set in requirements/lock.txt, hashes checked (make demo/test)
#   scripts/setup-venv.sh VENV latest   the newest releases the units' ranges allow (make test-latest)
# torch is the one package outside the lock: it is the machine's own build (here a local CPU wheel
# that pip's configuration names), pinned by constraints.txt and installed by pip, which reads that
# configuration; uv does not. Its dependencies are in the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
mode=${2:-locked}
python=${PYTHON:-python3}
units=(-e ./protos -e "./common[config,torch]" -e ./client -e "./kernels[triton]" -e "./reward_server[ray]" -e ./trainer)

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
# uv itself, pinned with hashes, from the package registry
"$py" -m pip install -qq --disable-pip-version-check --require-hashes --no-deps -r requirements/bootstrap.txt
uv=("$venv/bin/uv" pip)

case "$mode" in
  locked) lock=requirements/lock.txt ;;
  latest)
    lock="$venv/latest.txt"
    "$venv/bin/python" scripts/lock.py --upgrade --output "$lock"
    ;;
  *) echo "usage: $0 VENV locked|latest" >&2; exit 2 ;;
esac

# A virtualenv made by an earlier checkout may hold its one `advgrpo` distribution, whose editable
# hook mapped top-level `kernels`/`trainer` onto this tree (the names that shadowed others').
"${uv[@]}" uninstall -q --python "$py" advgrpo 2>/dev/null || true
# Everything but torch and our units: exact versions, every file's hash checked.
"${uv[@]}" install -q --python "$py" --require-hashes --no-deps -r "$lock"
"$py" -m pip install -qq --disable-pip-version-check --no-deps -c constraints.txt torch==2.13.0
# Our units, built with the setuptools and grpcio-tools the lock just installed.
"${uv[@]}" install -q --python "$py" --no-deps --no-build-isolation "${units[@]}"
"${uv[@]}" check --python "$py"
if "$py" -m pip list --format=freeze 2>/dev/null | grep -qi '^torchvision=='; then
  echo "torchvision is installed in $venv: it breaks torch on these machines; remove it" >&2
  exit 1
fi
