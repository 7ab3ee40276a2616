#!/bin/sh
# Installs the fleetrun agent on this Debian or Ubuntu host, enrolls it with a join token and
# starts it. Served by the fleetrun controller at /install.sh, over https only:
#
#   export FLEETRUN_JOIN_TOKEN='TOKEN'
#   curl --proto '=https' --tlsv1.2 -fsSL [--cacert FILE] https://CONTROLLER/install.sh |
#       sudo --preserve-env=FLEETRUN_JOIN_TOKEN sh -s -- --controller HOST:PORT[,...] \
#       --ca-pin sha256:HEX [--cacert FILE]
#
# The join token (`fleetrun tokens create`) comes from the environment, FLEETRUN_JOIN_TOKEN,
# never from the command line, where every user of the host could read it; it reaches
# `fleetrun-agent enroll` the same way.
#
# Options:
#   --ca-pin sha256:HEX     the SHA-256 of the controller's CA certificate; enrollment trusts
#                           only a controller whose certificate chains to that CA
#   --controller HOST:PORT  the agent gateway (several: comma-separated); default: @CONTROLLERS@
#   --cacert FILE           the CA that signs the controller's HTTPS certificate, for the
#                           package download (default: the system's trusted CAs)
#
# The package is checked against the SHA-256 this script carries before it is installed.
# Everything is in main, run on the last line: a download cut short runs nothing.
set -eu

main() {
    # Character ranges below mean ASCII whatever the host's locale.
    LC_ALL=C
    export LC_ALL

    url='@URL@'
    controllers='@CONTROLLERS@'
    config=/etc/fleetrun/agent.toml
    pin=''
    cacert=''

    while [ $# -gt 0 ]; do
        case "$1" in
            --ca-pin | --controller | --cacert)
                [ $# -ge 2 ] || die "$1 needs a value"
                case "$1" in
                    --ca-pin) pin=$2 ;;
                    --controller) controllers=$2 ;;
                    --cacert) cacert=$2 ;;
                esac
                shift 2
                ;;
            --token | --token=*)
                die "the join token is not taken on the command line, where other users see it:" \
                    "export FLEETRUN_JOIN_TOKEN='TOKEN' and pass it on with" \
                    "sudo --preserve-env=FLEETRUN_JOIN_TOKEN"
                ;;
            -h | --help)
                echo "usage: FLEETRUN_JOIN_TOKEN=TOKEN sh install.sh --ca-pin sha256:HEX" \
                    "[--controller HOST:PORT[,...]] [--cacert FILE]"
                exit 0
                ;;
            *) die "unknown argument: $1 (the options are --ca-pin, --controller, --cacert)" ;;
        esac
    done

    token=${FLEETRUN_JOIN_TOKEN:-}
    [ -n "$token" ] || die "FLEETRUN_JOIN_TOKEN is not set: export the token" \
        "'fleetrun tokens create' printed, and run sudo with --preserve-env=FLEETRUN_JOIN_TOKEN"
    if [ "${#token}" -gt 512 ] || has_other "$token" 'A-Za-z0-9._~+/=-'; then
        die "FLEETRUN_JOIN_TOKEN is not a join token: copy it whole from 'fleetrun tokens create'"
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
    case "$url" in
        https://*) ;;
        *) die "the controller gave $url to download from: only https is used" ;;
    esac

    [ "$(id -u)" -eq 0 ] || die "run it as root: ... | sudo --preserve-env=FLEETRUN_JOIN_TOKEN sh -s -- ..."
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
        curl --proto '=https' --tlsv1.2 -fsSL --cacert "$cacert" -o "$tmp/$pkg" "$url/dist/$pkg"
    else
        curl --proto '=https' --tlsv1.2 -fsSL -o "$tmp/$pkg" "$url/dist/$pkg"
    fi
    got=$(sha256sum "$tmp/$pkg" | cut -d ' ' -f 1)
    [ "$got" = "$sum" ] || die "the downloaded $pkg has SHA-256 $got, not $sum as the controller said: not installed"

    echo "fleetrun install: installing $pkg"
    # The package's own scripts have no use for the token.
    env -u FLEETRUN_JOIN_TOKEN DEBIAN_FRONTEND=noninteractive dpkg -i "$tmp/$pkg"

    echo "fleetrun install: enrolling with $controllers"
    FLEETRUN_JOIN_TOKEN=$token
    export FLEETRUN_JOIN_TOKEN
    fleetrun-agent --config "$config" enroll --controller "$controllers" --ca-pin "$pin" \
        --dir /etc/fleetrun/agent --work-dir /var/lib/fleetrun-agent

    # /run/systemd/system exists only while systemd is the running init (sd_booted(3)).
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl enable fleetrun-agent.service
        systemctl restart fleetrun-agent.service
        echo "fleetrun install: the agent runs (systemctl status fleetrun-agent)"
    else
        echo "fleetrun install: the agent is installed and enrolled, but systemd is not running" \
            "here, so it was not started: start it as root, under this host's service manager," \
            "with: /usr/bin/fleetrun-agent --config $config"
    fi
}

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

main "$@"
