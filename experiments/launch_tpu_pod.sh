#!/usr/bin/env bash
# BYOL on a Cloud TPU pod slice (e.g. v4-32, v5p-64): the same command on every worker.
#
#   export TPU_NAME=byol-v4-32 ZONE=us-central2-b            # PROJECT=... if not the default
#   export WORKDIR=gs://my-bucket/byol_imagenet              # or a shared file system path
#   experiments/launch_tpu_pod.sh setup                      # once: copy this repo, install
#   experiments/launch_tpu_pod.sh run --config=configs/byol.py \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#   experiments/launch_tpu_pod.sh logs                       # last lines of every worker's log
#   experiments/launch_tpu_pod.sh stop                       # SIGTERM: checkpoint, then exit
#
# `run` starts the program detached (nohup) on all workers, so a dropped ssh session does not
# kill the job; each worker logs to ~/byol_<worker>.log and only worker 0 prints metrics.
# Rerunning the same `run` resumes from the latest checkpoint in $WORKDIR.
#
# Every worker connects through jax.distributed.initialize(); on a TPU VM JAX finds the pod's
# workers and this worker's id from the TPU metadata, so no address or id is passed here
# (--distributed=on just makes it an error if that detection fails). WORKDIR must be one place
# every worker sees, because Orbax checkpoints are written by all workers together into one
# directory: a GCS bucket (gs://..., with the TPU VM's service account allowed to write it:
# checkpoints, metrics, TensorBoard, the workdir lock all go there), or a shared file system
# path (Filestore/NFS, gcsfuse) that is the same on every worker.
set -euo pipefail

case "${1:-}" in
  setup|run|logs|stop) ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
REMOTE_DIR=${REMOTE_DIR:-byol_jax}  # Relative to each worker's home directory.
JAX_VERSION=${JAX_VERSION:-0.10.2}  # The version this project is tested with.
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all)

on_all_workers() {
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --command="$1"
}

case "${1:-}" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    # Copy the working tree (small: code and configs) to every worker, then install it.
    "${GCLOUD[@]}" scp --recurse "$repo" "$TPU_NAME:~/$REMOTE_DIR.new" "${COMMON[@]}"
    on_all_workers "rm -rf ~/$REMOTE_DIR && mv ~/$REMOTE_DIR.new ~/$REMOTE_DIR &&
      pip install -q 'jax[tpu]==$JAX_VERSION' && pip install -q -e ~/$REMOTE_DIR"
    ;;
  run)
    shift
    : "${WORKDIR:?set WORKDIR to gs://BUCKET/PATH or a directory shared by all workers}"
    # Quote every user argument for the remote shell.
    args=$(printf ' %q' --workdir="$WORKDIR" --distributed=on "$@")
    on_all_workers "cd ~/$REMOTE_DIR && nohup python3 -m byol_jax.main_loop$args \
      > ~/byol_\$(hostname).log 2>&1 < /dev/null & echo \$! > ~/byol.pid"
    echo "Started on all workers of $TPU_NAME; follow with: $0 logs"
    ;;
  logs)
    on_all_workers 'tail -n 5 ~/byol_$(hostname).log'
    ;;
  stop)
    # SIGTERM on every worker: the loop agrees on a step, saves a checkpoint there and exits.
    on_all_workers 'kill -TERM "$(cat ~/byol.pid)" || true'
    ;;
esac
