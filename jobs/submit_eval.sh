#!/usr/bin/env bash
# FID / KID of every checkpoint of a run (or one --checkpoint) as a Ray job; results go to <run>/eval.jsonl and
# TensorBoard (Eval/fid, Eval/kid). The entrypoint runs on the head: give it a GPU if the head has none free, e.g.
#   SUBMIT_ARGS="--entrypoint-num-gpus 1" jobs/submit_eval.sh --run /mnt/cluster_storage/hdebm/c10-a
# Inception weights must be pre-staged on offline clusters (see cluster/). See jobs/submit.sh for the environment.
exec "$(dirname "$0")/submit.sh" eval "$@"
