#!/usr/bin/env bash
# Re-records tests/libvirt/probe.json: runs libvirt's capability probe (virsh domcapabilities,
# embedded driver in a temporary root) against `ferry qemu-compat` through a shim that logs
# its argv, and keeps the argv and every QMP command/reply pair from libvirt's monitor log.
# Usage: tests/libvirt/record-probe.sh [path/to/ferry]   (default target/debug/ferry)
set -euo pipefail
cd "$(dirname "$0")/../.."
ferry=$(realpath "${1:-target/debug/ferry}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/etc"
printf 'user = "root"\ngroup = "root"\n' >"$work/root/etc/qemu.conf"
cat >"$work/shim" <<SHIM
#!/bin/sh
printf '%s\n' "\$@" >"$work/argv"
exec "$ferry" qemu-compat "\$@"
SHIM
chmod +x "$work/shim"
LIBVIRT_LOG_FILTERS="1:qemu.qemu_monitor" LIBVIRT_LOG_OUTPUTS="1:file:$work/monitor.log" \
  virsh -c "qemu:///embed?root=$work/root" domcapabilities --emulatorbin "$work/shim" \
  --virttype kvm >/dev/null
python3 - "$work" >tests/libvirt/probe.json <<'PY'
import json, re, sys
work = sys.argv[1]
argv = open(f"{work}/argv").read().splitlines()
pairs, pending = [], {}
for line in open(f"{work}/monitor.log"):
    m = re.search(r"QEMU_MONITOR_SEND_MSG: mon=\S+ msg=(\{.*\})\s*$", line)
    if m:
        msg = json.loads(m.group(1))
        pending[msg["id"]] = msg
        continue
    m = re.search(r"QEMU_MONITOR_RECV_REPLY: mon=\S+ reply=(\{.*\})\s*$", line)
    if m:
        reply = json.loads(m.group(1))
        msg = pending.pop(reply.get("id"))
        entry = {"execute": msg["execute"]}
        if "arguments" in msg:
            entry["arguments"] = msg["arguments"]
        entry["reply"] = {k: v for k, v in reply.items() if k != "id"}
        pairs.append(entry)
note = ("Recorded by tests/libvirt/record-probe.sh: the argv and the QMP commands libvirt "
        "9.0 sends when probing `ferry qemu-compat` (virsh domcapabilities), with Ferry's replies.")
print(json.dumps({"note": note, "argv": argv, "exchanges": pairs}, indent=1))
PY
echo "recorded $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["exchanges"]))' tests/libvirt/probe.json) exchanges"
