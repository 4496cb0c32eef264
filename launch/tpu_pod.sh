#!/usr/bin/env bash
# Runs `python -m launch.train --distributed ...` on every worker of a Cloud TPU VM pod slice.
# See usage() below, or run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=TYPE [options] -- TRAIN_ARGS...

Runs `python -m launch.train --distributed TRAIN_ARGS...` on every worker of a Cloud TPU VM
pod slice (jax.distributed finds the other workers by itself):
  1. creates the TPU VM unless `gcloud compute tpus tpu-vm describe` finds it (a preempted
     spot VM cannot be restarted, so it is deleted and created again),
  2. with --repo or --copy, puts the code into ~/DIR on every worker and installs it into
     DIR/.venv (requirements.txt, then jax[tpu]),
  3. runs the training on all workers at once (`ssh --worker=all`), in the foreground.

Required:
  --name=NAME            TPU VM name
  --zone=ZONE            e.g. us-central2-b
  --accelerator=TYPE     e.g. v4-32 (16 chips, 4 workers); used only when creating the VM
Options:
  --version=IMAGE        TPU VM image (default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite,
                         v6e: v2-alpha-tpuv6e)
  --project=PROJECT      Google Cloud project (default: gcloud's configured one)
  --spot                 create a spot VM (preemptible, cheaper)
  --repo=GIT_URL         clone GIT_URL on every worker (it must be readable from there)...
  --ref=REF              ...and check out REF: branch, tag or commit (default: the remote's
                         default branch)
  --copy                 copy this checkout instead (its top-level entries except .git, .venv
                         and git-ignored ones such as runs/)
                         Without --repo/--copy the code and venv from an earlier call are used.
  --dir=DIR              directory under the workers' home (default vlp_jax)
  --python=PY            python3 or python3.N for the venv (default python3.11: the project
                         needs >= 3.11 and Ubuntu 22.04 images ship 3.10; apt installs it and
                         its venv module where missing)
  --dry-run              print the gcloud commands (one per line, prefixed with '+ ') and run
                         nothing; the VM is assumed not to exist
  -h, --help             this message

TRAIN_ARGS need a --workdir that every worker sees at the same path (an NFS / Filestore or
gcsfuse mount): all workers write one checkpoint there. Each worker reads its own shards of
the data, so data.dir must be readable from every worker too. The run stops when the ssh
connection drops; rerunning the same command resumes from the last checkpoint.

Example (v4-32: 16 chips; parameters and optimizer state sharded 4-way, data parallel over
the rest):
  launch/tpu_pod.sh --name=vlp-v4 --zone=us-central2-b --accelerator=v4-32 \
      --repo=https://github.com/ORG/vlp_jax.git --ref=main -- \
      --config=configs/alpro_pretrain.py:base --workdir=/mnt/shared/runs/pretrain \
      --config.data.dir=/mnt/shared/data/pretrain --config.mesh.data=-1 --config.mesh.fsdp=4
EOF
}

die_usage() {
  echo "tpu_pod.sh: $1" >&2
  echo "Run 'launch/tpu_pod.sh --help' for usage." >&2
  exit 2
}

name="" zone="" accelerator="" version="tpu-ubuntu2204-base" project="" repo="" ref=""
copy=0 spot=0 dry_run=0 dir="vlp_jax" python="python3.11"
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --dir=*) dir="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --copy) copy=1 ;;
    --spot) spot=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die_usage "unknown argument: $1 (training arguments go after --)" ;;
  esac
  shift
done
train_args=("$@")

[[ -n "$name" ]] || die_usage "--name is required"
[[ -n "$zone" ]] || die_usage "--zone is required"
[[ -n "$accelerator" ]] || die_usage "--accelerator is required"
((${#train_args[@]})) || die_usage "no training arguments after -- (e.g. --config=... --workdir=...)"
[[ -z "$repo" || "$copy" == 0 ]] || die_usage "--repo and --copy exclude each other"
[[ -z "$ref" || -n "$repo" ]] || die_usage "--ref needs --repo"
# The directory is used unquoted on the far side (scp target, `cd`), so keep it a plain name.
[[ "$dir" =~ ^[A-Za-z0-9._-]+$ ]] || die_usage "--dir must be a plain directory name"
# apt installs PY and PY-venv when the image lacks them, so PY must be a package name.
[[ "$python" =~ ^python3(\.[0-9]+)?$ ]] || die_usage "--python must be python3 or python3.N"

# Flags shared by every gcloud call.
where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")

# Prints the command like `set -x` would (shell-quoted, so it can be pasted), then runs it
# unless this is a dry run.
run() {
  local line="+" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $word"; else line+=" ${word@Q}"; fi
  done
  if ((dry_run)); then
    echo "$line"
  else
    echo "$line" >&2
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

# 1. The VM.
state=""
if ((!dry_run)); then
  state="$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' \
    2>/dev/null)" || state=""
fi
if [[ "$state" == "PREEMPTED" ]]; then
  echo "tpu_pod.sh: $name was preempted; deleting it to create it again" >&2
  run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  state=""
fi
if [[ -z "$state" ]]; then
  [[ -n "$repo" || "$copy" == 1 ]] || die_usage "a new TPU VM needs --repo or --copy"
  create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
          --accelerator-type="$accelerator" --version="$version")
  ((!spot)) || create+=(--spot)
  run "${create[@]}"
fi

# 2. The code and its environment.
if [[ -n "$repo" ]]; then
  # `origin/REF` first so that a branch is taken at its latest commit on a rerun; plain REF
  # for tags and commits.
  r="$(printf %q "${ref:-HEAD}")"
  on_all_workers "{ [ -d $dir/.git ] || git clone -q $(printf %q "$repo") $dir; } && cd $dir \
&& git fetch -q --tags --force origin \
&& { git checkout -q --detach origin/$r 2>/dev/null || git checkout -q --detach $r; }"
elif ((copy)); then
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # Git's view of the checkout (tracked and untracked-but-not-ignored files) leaves out
  # .venv, runs/ and caches; outside git, everything but .git and .venv goes.
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    mapfile -t tops < <(git -C "$root" ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do echo "${f%%/*}"; done | sort -u)
  else
    tops=()
    for path in "$root"/* "$root"/.[!.]*; do tops+=("${path##*/}"); done
  fi
  sources=()
  for base in "${tops[@]}"; do
    if [[ -e "$root/$base" && "$base" != .git && "$base" != .venv ]]; then
      sources+=("$root/$base")
    fi
  done
  on_all_workers "mkdir -p $dir"
  run gcloud compute tpus tpu-vm scp --recurse "${sources[@]}" "$name:$dir" "${where[@]}" \
    --worker=all
fi
if [[ -n "$repo" || "$copy" == 1 ]]; then
  py="$(printf %q "$python")"
  # The apt fallback covers images without the interpreter or its venv module; the lock
  # timeout waits for the unattended upgrades that run on a freshly booted VM.
  apt="sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq"
  on_all_workers "cd $dir && { $py -m venv .venv 2>/dev/null \
|| { $apt update && $apt install -y $py $py-venv && $py -m venv --clear .venv; }; } \
&& . .venv/bin/activate && pip install -q -U pip && pip install -q -r requirements.txt \
&& pip install -q 'jax[tpu]'"
fi

# 3. The training, on every worker.
on_all_workers "cd $dir && . .venv/bin/activate \
&& python -m launch.train --distributed$(printf ' %q' "${train_args[@]}")"
