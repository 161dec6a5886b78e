#!/usr/bin/env bash
# One stage as a Ray job; it starts from the previous stage of the same run (or --init-from DIR).
#   jobs/submit_train.sh --stage stage1 --preset cifar10 --set run.name=c10-a --set stage1.langevin.step_size=1e-3
exec "$(dirname "$0")/submit.sh" train "$@"
