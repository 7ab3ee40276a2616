#!/bin/sh
# Installs the fleetrun agent on this Debian or Ubuntu host, enrolls it with a join token and
# starts it. Served by the fleetrun controller at /install.sh:
#
#   curl -fsSL https://CONTROLLER/install.sh | sudo sh -s -- --token TOKEN --ca-pin sha256:HEX
#
# Options:
#   --token TOKEN           the join token (`fleetrun tokens create`)
#   --ca-pin sha256:HEX     the SHA-256 of the controller's CA certificate; enrollment trusts
#                           only a controller whose certificate chains to that CA
#   --controller HOST:PORT  the agent gateway (several: comma-separated); default: @CONTROLLERS@
#   --cacert FILE           the CA that signs the controller's HTTPS certificate, for the
#                           package download (default: the system's trusted CAs)
#
# The package is checked against the SHA-256 this script carries before it is installed.
set -eu
# Character ranges below mean ASCII whatever the host's locale.
LC_ALL=C
export LC_ALL

url='@URL@'
controllers='@CONTROLLERS@'
config=/etc/fleetrun/agent.toml
token=''
pin=''
cacert=''

die() {
    echo "fleetrun install: $*" >&2
    exit 1
}

# Whether $1 has a character outside the set $2 (a bracket expression's content).
has_other() {
    case "$1" in
        *[!$2]*) return 0 ;;
        *) return 1 ;;
    esac
}

while [ $# -gt 0 ]; do
    case "$1" in
        --token | --ca-pin | --controller | --cacert)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --token) token=$2 ;;
                --ca-pin) pin=$2 ;;
                --controller) controllers=$2 ;;
                --cacert) cacert=$2 ;;
            esac
            shift 2
            ;;
        -h | --help)
            echo "usage: sh install.sh --token TOKEN --ca-pin sha256:HEX [--controller HOST:PORT[,...]] [--cacert FILE]"
            exit 0
            ;;
        *) die "unknown argument: $1 (the options are --token, --ca-pin, --controller, --cacert)" ;;
    esac
done

[ -n "$token" ] || die "--token is required: create one on the controller with 'fleetrun tokens create'"
if [ "${#token}" -gt 512 ] || has_other "$token" 'A-Za-z0-9._~+/=-'; then
    die "--token is not a join token: copy it whole from 'fleetrun tokens create'"
fi
case "$pin" in
    sha256:*) hex=${pin#sha256:} ;;
    '') die "--ca-pin sha256:HEX is required: 'fleetrun tokens create' prints it with the token" ;;
    *) die "--ca-pin must be sha256: and 64 hexadecimal digits, not $pin" ;;
esac
if [ "${#hex}" -ne 64 ] || has_other "$hex" '0-9a-fA-F'; then
    die "--ca-pin must be sha256: and 64 hexadecimal digits, not $pin"
fi
[ -n "$controllers" ] || die "--controller HOST:PORT is required: the address agents reach the controller at"
if [ "${#controllers}" -gt 2048 ] || has_other "$controllers" ']A-Za-z0-9.:,[_-'; then
    die "--controller must be HOST:PORT, or several joined by commas, not $controllers"
fi
if [ -n "$cacert" ] && [ ! -r "$cacert" ]; then
    die "--cacert $cacert is not a readable file"
fi

[ "$(id -u)" -eq 0 ] || die "run it as root: ... | sudo sh -s -- --token ..."
command -v dpkg >/dev/null 2>&1 || die "dpkg is missing: this installer is for Debian and Ubuntu hosts"
command -v curl >/dev/null 2>&1 || die "curl is missing"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum is missing"

arch=$(dpkg --print-architecture)
pkg=''
sum=''
case "$arch" in
@CASES@
    *) die "the controller at $url has no agent package for $arch" ;;
esac

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fleetrun install: downloading $pkg from $url"
if [ -n "$cacert" ]; then
    curl -fsSL --cacert "$cacert" -o "$tmp/$pkg" "$url/dist/$pkg"
else
    curl -fsSL -o "$tmp/$pkg" "$url/dist/$pkg"
fi
got=$(sha256sum "$tmp/$pkg" | cut -d ' ' -f 1)
[ "$got" = "$sum" ] || die "the downloaded $pkg has SHA-256 $got, not $sum as the controller said: not installed"

echo "fleetrun install: installing $pkg"
DEBIAN_FRONTEND=noninteractive dpkg -i "$tmp/$pkg"

echo "fleetrun install: enrolling with $controllers"
fleetrun-agent --config "$config" enroll --controller "$controllers" --token "$token" --ca-pin "$pin"

if [ -d /run/systemd/system ]; then
    systemctl enable fleetrun-agent.service
    systemctl restart fleetrun-agent.service
    echo "fleetrun install: the agent runs (systemctl status fleetrun-agent)"
else
    echo "fleetrun install: systemd is not running here: start the agent with" \
        "fleetrun-agent --config $config"
fi
