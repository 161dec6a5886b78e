#!/usr/bin/env bash
# Creates, once per account and region, what cluster/aws/hdebm-gpu.yaml runs with, and writes the config filled in:
#   REGION=us-west-2 VPC_ID=vpc-... HEAD_SUBNET=subnet-... WORKER_SUBNET=subnet-... BUCKET=my-runs SSH_CIDR=203.0.113.7/32 \
#     cluster/aws/setup.sh                      # then: ray up cluster/aws/hdebm-gpu.mine.yaml
#
#   - two security groups: <cluster>-nodes (every node; all traffic from members of the group only: Ray's ports are
#     open between the cluster's nodes and nowhere else) and <cluster>-head-ssh (the head only; SSH from SSH_CIDR,
#     the one address range you choose: `ray up` / `ray dashboard` reach the head through it). Given these, the
#     launcher creates no group of its own (its default group admits SSH from 0.0.0.0/0).
#   - two roles and instance profiles: <cluster>-worker may read and write s3://BUCKET/PREFIX/ and nothing else;
#     <cluster>-head the same plus what Ray's autoscaler needs (launch workers, tag, stop and terminate this
#     cluster's instances only, hand them the worker role only): iam/head-policy.json, iam/worker-policy.json.
#   - workers get no public IP: WORKER_SUBNET must be a subnet for this cluster's workers whose route table sends
#     0.0.0.0/0 to a NAT gateway (they pull the image and install the pinned packages at boot); setup.sh marks it
#     map-public-ip-on-launch, which Ray's launcher insists on, and the workers' interface overrides for them.
#     The head sits in HEAD_SUBNET with a public IP behind <cluster>-head-ssh.
#   - inside Ray the split is not a wall: any job or worker holding the cluster's token can place an actor on the
#     head and act with the head's identity. It keeps a GPU worker's own credentials (and a compromised library on
#     it) away from the autoscaler's rights; the token is what guards the rest.
# Run it once per cluster name: it creates named resources and stops at the first that exists.
# Env: REGION, VPC_ID, HEAD_SUBNET, WORKER_SUBNET, BUCKET, SSH_CIDR (required); PREFIX (hdebm: runs go to
# s3://BUCKET/PREFIX, the HDEBM_STORAGE to submit with; one folder name), CLUSTER (hdebm: cluster_name, the prefix of every name).
# Needs the AWS CLI v2 with rights to create security groups, roles and instance profiles.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for var in REGION VPC_ID HEAD_SUBNET WORKER_SUBNET BUCKET SSH_CIDR; do
  if [ -z "${!var:-}" ]; then echo "cluster/aws/setup.sh: set $var (see the top of this file)" >&2; exit 2; fi
done
case "$SSH_CIDR" in
  */0) echo "cluster/aws/setup.sh: SSH_CIDR=$SSH_CIDR opens SSH to the internet: give your own range" >&2; exit 2 ;;
esac
# the commit every node installs: COMMIT, or this checkout's (a branch name would let nodes differ)
COMMIT="${COMMIT:-$(git -C "$here" rev-parse HEAD 2>/dev/null || true)}"
if [ -n "$COMMIT" ] && ! [[ "$COMMIT" =~ ^[0-9a-f]{40}$ ]]; then
  echo "cluster/aws/setup.sh: COMMIT=$COMMIT: give a full 40-digit commit hash" >&2; exit 2
fi
PREFIX="${PREFIX:-hdebm}"; PREFIX="${PREFIX%/}"
case "$PREFIX" in  # pyarrow writes a marker object per folder level: one level keeps them all inside PREFIX/
  */*|"") echo "cluster/aws/setup.sh: PREFIX=$PREFIX: give one folder name (no /)" >&2; exit 2 ;;
esac
CLUSTER="${CLUSTER:-hdebm}"
ACCOUNT_ID="$(aws sts get-caller-identity --query Account --output text)"
render() {  # a policy document with this cluster's names filled in
  sed -e "s#\${BUCKET}#$BUCKET#g" -e "s#\${PREFIX}#$PREFIX#g" -e "s#\${REGION}#$REGION#g" \
      -e "s#\${ACCOUNT_ID}#$ACCOUNT_ID#g" -e "s#\${CLUSTER}#$CLUSTER#g" "$1"
}

nodes_sg="$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" --group-name "$CLUSTER-nodes" \
  --description "$CLUSTER: Ray between the cluster's nodes" --query GroupId --output text)"
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$nodes_sg" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$nodes_sg}]" > /dev/null
ssh_sg="$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" --group-name "$CLUSTER-head-ssh" \
  --description "$CLUSTER: SSH to the head from $SSH_CIDR" --query GroupId --output text)"
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$ssh_sg" \
  --protocol tcp --port 22 --cidr "$SSH_CIDR" > /dev/null

for who in worker head; do
  aws iam create-role --role-name "$CLUSTER-$who" \
    --assume-role-policy-document "file://$here/iam/trust-ec2.json" > /dev/null
  aws iam put-role-policy --role-name "$CLUSTER-$who" --policy-name "$CLUSTER-$who" \
    --policy-document "$(render "$here/iam/$who-policy.json")"
  aws iam create-instance-profile --instance-profile-name "$CLUSTER-$who" > /dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "$CLUSTER-$who" --role-name "$CLUSTER-$who"
done

# Ray 2.60's launcher keeps only subnets that map public IPs on launch (unless use_internal_ips, i.e. `ray up` from
# inside the VPC). The workers' interface asks for no public IP, which overrides the subnet's default; the subnet
# reaches the internet through its NAT gateway.
aws ec2 modify-subnet-attribute --region "$REGION" --subnet-id "$WORKER_SUBNET" --map-public-ip-on-launch

out="$here/hdebm-gpu.mine.yaml"
sed -e "s#HDEBM_NODES_SG#$nodes_sg#g" -e "s#HDEBM_HEAD_SSH_SG#$ssh_sg#g" \
    -e "s#HDEBM_HEAD_SUBNET#$HEAD_SUBNET#g" -e "s#HDEBM_WORKER_SUBNET#$WORKER_SUBNET#g" \
    -e "s#123456789012#$ACCOUNT_ID#g" -e "s#instance-profile/hdebm-#instance-profile/$CLUSTER-#g" \
    -e "s#^cluster_name: hdebm#cluster_name: $CLUSTER#" -e "s#^  region: us-west-2#  region: $REGION#" \
    -e "s#@0000000000000000000000000000000000000000#@${COMMIT:-0000000000000000000000000000000000000000}#" \
    "$here/hdebm-gpu.yaml" > "$out"
echo "security groups: $nodes_sg ($CLUSTER-nodes), $ssh_sg ($CLUSTER-head-ssh: SSH from $SSH_CIDR)"
echo "instance profiles: $CLUSTER-head, $CLUSTER-worker (s3://$BUCKET/$PREFIX)"
[ -n "$COMMIT" ] || echo "not in a git checkout: put the commit to run in its setup_commands by hand"
echo "wrote $out: edit its other CHANGE lines (instance types, the commit to run), then"
echo "  ray up $out && HDEBM_STORAGE=s3://$BUCKET/$PREFIX ..."
