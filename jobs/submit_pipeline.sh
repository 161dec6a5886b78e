#!/usr/bin/env bash
# The whole HDEBM pipeline (diffusion -> distill -> stage1 -> stage2) as one Ray job.
#   jobs/submit_pipeline.sh --preset cifar10 --set run.name=c10-a
# Re-submitting the same run name resumes where it stopped. See jobs/submit.sh for RAY_ADDRESS / HDEBM_STORAGE.
exec "$(dirname "$0")/submit.sh" pipeline "$@"
