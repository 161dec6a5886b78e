#!/usr/bin/env bash
# A Ray Tune sweep over one stage as a Ray job (trials run as Train V2 runs on the cluster's workers).
#   jobs/submit_tune.sh --space tune_spaces/stage1.yaml --preset cifar10 --set run.name=c10-a --samples 16 \
#     --scheduler asha --max-concurrent 4 --workers-per-trial 1 --use-gpu
# Re-submit with --resume (same --name) to continue an interrupted sweep. See jobs/submit.sh for the environment.
exec "$(dirname "$0")/submit.sh" tune "$@"
