#!/usr/bin/env bash
# Creates, once per project and region, what cluster/gcp/hdebm-gpu.yaml runs with, and writes the config filled in:
#   PROJECT=my-project REGION=us-central1 BUCKET=my-runs SSH_CIDR=203.0.113.7/32 cluster/gcp/setup.sh
#   ray up cluster/gcp/hdebm-gpu.mine.yaml
#
#   - a VPC network of its own (<cluster>-net, custom subnets: none of the default network's allow-internal rule)
#     with two firewall rules: all traffic between instances tagged <cluster> (Ray's ports, between the cluster's
#     nodes only) and SSH from SSH_CIDR to the instance tagged <cluster>-head. Cloud NAT for the workers, which have
#     no external IP.
#   - two service accounts: <cluster>-worker may read and write objects under gs://BUCKET/PREFIX/ (and read the
#     bucket's metadata and object names); <cluster>-head the same, plus Compute instance admin on the project (the
#     autoscaler creates and deletes workers; GCP has no narrower predefined role for it, and this one could also
#     change other VMs of the project: give the cluster a project of its own where that matters) and acting as
#     <cluster>-worker only (to attach it to them). The bucket needs uniform bucket-level access (conditional
#     bindings require it).
# Run it once per cluster name: it creates named resources and stops at the first that exists.
# Env: PROJECT, REGION, BUCKET, SSH_CIDR (required); ZONE (REGION-a), PREFIX (hdebm: runs go to gs://BUCKET/PREFIX,
# the HDEBM_STORAGE to submit with), CLUSTER (hdebm: cluster_name, the prefix of every name), SUBNET_RANGE
# (10.42.0.0/20). Needs gcloud with rights to create networks, firewall rules, service accounts and IAM bindings.
# Ray's GCP launcher adds a ray-autoscaler-sa-v1 account with broad project roles on each `ray up`; no node of this
# config uses it. To take its roles away afterwards:
#   gcloud projects get-iam-policy $PROJECT | grep -B3 ray-autoscaler-sa-v1, then remove-iam-policy-binding each.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for var in PROJECT REGION BUCKET SSH_CIDR; do
  if [ -z "${!var:-}" ]; then echo "cluster/gcp/setup.sh: set $var (see the top of this file)" >&2; exit 2; fi
done
case "$SSH_CIDR" in
  */0) echo "cluster/gcp/setup.sh: SSH_CIDR=$SSH_CIDR opens SSH to the internet: give your own range" >&2; exit 2 ;;
esac
ZONE="${ZONE:-$REGION-a}"
# the commit every node installs: COMMIT, or this checkout's (a branch name would let nodes differ)
COMMIT="${COMMIT:-$(git -C "$here" rev-parse HEAD 2>/dev/null || true)}"
if [ -n "$COMMIT" ] && ! [[ "$COMMIT" =~ ^[0-9a-f]{40}$ ]]; then
  echo "cluster/gcp/setup.sh: COMMIT=$COMMIT: give a full 40-digit commit hash" >&2; exit 2
fi
PREFIX="${PREFIX:-hdebm}"; PREFIX="${PREFIX%/}"
CLUSTER="${CLUSTER:-hdebm}"
net="$CLUSTER-net"
g=(gcloud --project "$PROJECT" --quiet)

"${g[@]}" compute networks create "$net" --subnet-mode=custom
"${g[@]}" compute networks subnets create "$CLUSTER-subnet" --network "$net" --region "$REGION" \
  --range "${SUBNET_RANGE:-10.42.0.0/20}" --enable-private-ip-google-access
"${g[@]}" compute firewall-rules create "$CLUSTER-internal" --network "$net" --direction INGRESS \
  --allow tcp,udp,icmp --source-tags "$CLUSTER" --target-tags "$CLUSTER"
"${g[@]}" compute firewall-rules create "$CLUSTER-head-ssh" --network "$net" --direction INGRESS \
  --allow tcp:22 --source-ranges "$SSH_CIDR" --target-tags "$CLUSTER-head"
"${g[@]}" compute routers create "$CLUSTER-router" --network "$net" --region "$REGION"
"${g[@]}" compute routers nats create "$CLUSTER-nat" --router "$CLUSTER-router" --region "$REGION" \
  --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges

head="$CLUSTER-head@$PROJECT.iam.gserviceaccount.com"
worker="$CLUSTER-worker@$PROJECT.iam.gserviceaccount.com"
"${g[@]}" iam service-accounts create "$CLUSTER-head" --display-name "$CLUSTER Ray head (autoscaler, runs prefix)"
"${g[@]}" iam service-accounts create "$CLUSTER-worker" --display-name "$CLUSTER Ray workers (runs prefix)"
runs="resource.name.startsWith('projects/_/buckets/$BUCKET/objects/$PREFIX/')"
for sa in "$worker" "$head"; do
  # objects under the prefix: read, write, delete (a conditional binding: the bucket needs uniform access)
  "${g[@]}" storage buckets add-iam-policy-binding "gs://$BUCKET" --member "serviceAccount:$sa" \
    --role roles/storage.objectUser --condition "expression=$runs,title=$CLUSTER-runs-prefix"
  # the bucket's metadata and its object names (pyarrow checks the bucket before it creates a folder)
  "${g[@]}" storage buckets add-iam-policy-binding "gs://$BUCKET" --member "serviceAccount:$sa" \
    --role roles/storage.legacyBucketReader --condition None
done
"${g[@]}" projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$head" \
  --role roles/compute.instanceAdmin.v1 --condition None
"${g[@]}" iam service-accounts add-iam-policy-binding "$worker" --member "serviceAccount:$head" \
  --role roles/iam.serviceAccountUser

out="$here/hdebm-gpu.mine.yaml"
sed -e "s#your-project-id#$PROJECT#g" -e "s#us-central1-a#$ZONE#g" -e "s#us-central1#$REGION#g" \
    -e "s#hdebm-subnet#$CLUSTER-subnet#g" -e "s#hdebm-head@#$CLUSTER-head@#g" -e "s#hdebm-worker@#$CLUSTER-worker@#g" \
    -e "s#items: \[hdebm, hdebm-head\]#items: [$CLUSTER, $CLUSTER-head]#" -e "s#items: \[hdebm\]#items: [$CLUSTER]#" \
    -e "s#^cluster_name: hdebm#cluster_name: $CLUSTER#" -e "s#@0000000000000000000000000000000000000000#@${COMMIT:-0000000000000000000000000000000000000000}#" \
    "$here/hdebm-gpu.yaml" > "$out"
echo "network $net: Ray between instances tagged $CLUSTER, SSH to $CLUSTER-head from $SSH_CIDR"
echo "service accounts: $head, $worker (gs://$BUCKET/$PREFIX)"
[ -n "$COMMIT" ] || echo "not in a git checkout: put the commit to run in its setup_commands by hand"
echo "wrote $out: edit its other CHANGE lines (machine types, the commit to run), then"
echo "  ray up $out && HDEBM_STORAGE=gs://$BUCKET/$PREFIX ..."
