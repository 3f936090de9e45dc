#!/usr/bin/env bash
# `make test-compat`: the tests marked `compat` (those that call transformers, lm-eval, DeepSpeed or
# torch APIs that change between releases) in fresh environments resolved from setup.cfg, not the lock:
#   newest  the newest versions setup.cfg allows, as `pip install` gives a new user today
#   oldest  setup.cfg's lower bounds of torch, transformers, deepspeed and lm-eval; the rest newest
# Usage: tools/test_compat.sh [newest] [oldest]   (environments in .venv-compat/, rebuilt on every run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
names=("$@")
[ $# -gt 0 ] || names=(newest oldest)
for name in "${names[@]}"; do
    venv=.venv-compat/$name
    case $name in
        newest) pins=() ;;
        oldest) bound='s/^[[:space:]]*(torch|transformers|deepspeed|lm-eval)>=([0-9][0-9a-z.]*).*/\1==\2/p'
                mapfile -t pins < <(sed -nE "$bound" setup.cfg)
                if [ ${#pins[@]} -ne 4 ]; then
                    echo "setup.cfg: torch, transformers, deepspeed, lm-eval need >= bounds, got: ${pins[*]}"
                    exit 2
                fi ;;
        *) echo "tools/test_compat.sh: unknown environment '$name' (newest, oldest)"; exit 2 ;;
    esac
    echo "== $name: building $venv ${pins[*]}"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "${pins[@]}" -e '.[test,eval]'
    "$venv/bin/python" -m pip check
    "$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|deepspeed|lm[-_]eval|triton)==' | tr '\n' ' '
    echo
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-auto}" --dist loadfile -m compat tests
done
