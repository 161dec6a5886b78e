#!/usr/bin/env bash
# Submit any hdebm-ray command as a Ray job; prints the exact `ray job submit` command, then runs it.
#
#   jobs/submit.sh pipeline --preset cifar10 --set run.name=c10-a
#
# Environment:
#   RAY_ADDRESS      the cluster's dashboard, e.g. http://head:8265 (default http://127.0.0.1:8265, the cluster
#                    cluster/local starts; `ray dashboard cluster/aws/hdebm-gpu.yaml` forwards a remote one there)
#   HDEBM_STORAGE    run.storage_path for the job: a URI (s3://, gs://) or a path every node mounts. Defaults to
#                    ./runs of this checkout, which is only right for a cluster on this machine.
#   RAY_AUTH_MODE    token (every shipped cluster runs Ray's token auth), with RAY_AUTH_TOKEN_PATH or
#                    RAY_AUTH_TOKEN holding the cluster's token (cluster/local start prints them)
#   SUBMISSION_ID    optional job id (to `ray job stop` / `ray job logs` it later)
#   SUBMIT_ARGS      extra `ray job submit` flags, e.g. "--no-wait" or "--entrypoint-num-cpus 1"
#
# Re-submitting the same command resumes the run from its checkpoints. Ctrl-C only detaches from a running job:
# while its driver lives a re-submission is refused in one line naming it; `ray job stop <id>` stops it, after a
# checkpoint at the current step (SIGTERM; jobs/runtime_env.yaml gives it RAY_JOB_STOP_WAIT_TIME_S to finish).
set -euo pipefail
cd "$(dirname "$0")/.."
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
case "$address" in
  *127.0.0.1*|*localhost*) storage="${HDEBM_STORAGE:-$PWD/runs}" ;;
  *) storage="${HDEBM_STORAGE:?set HDEBM_STORAGE to a URI or shared path for a remote cluster}" ;;
esac
command="$1"; shift
cmd=(ray job submit --address "$address" --working-dir . --runtime-env jobs/runtime_env.yaml)
[ -n "${SUBMISSION_ID:-}" ] && cmd+=(--submission-id "$SUBMISSION_ID")
# shellcheck disable=SC2206  # SUBMIT_ARGS is a list of flags on purpose
[ -n "${SUBMIT_ARGS:-}" ] && cmd+=(${SUBMIT_ARGS})
cmd+=(-- python -m hdebm_ray "$command" --set "run.storage_path=$storage" "$@")
printf '%q ' "${cmd[@]}"; echo
exec "${cmd[@]}"
