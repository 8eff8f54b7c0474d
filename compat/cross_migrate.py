"""Live migration between two different builds of `ferry`, both directions, every machine
type both offer (run by compat/cross-build.sh; needs qemu.qmp, e.g. the repo's .venv).

Per machine type and direction: the source runs the dirtying test guest (64 MiB, 4 MiB
working set), hot-plugs CPU core 1 and the multifunction PCI slot 01 (functions 1 then 0),
and leaves an unplug of core 1 pending (guest in slow mode); the destination (-S) adds the
same devices before start; migrate over loopback TCP; then on the destination: connector
states equal the source's, guest memory verifies, and after `cont` the guest runs and
answers the pending unplug with DEVICE_DELETED. Prints one line per migration; exit 1 on
any failure.
"""

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient

TIMEOUT = 30


def machines(binary):
    out = subprocess.run([binary, "machines"], capture_output=True, text=True, check=True).stdout
    return [m for m in re.findall(r"^(ferry-\d+\.\d+)\b", out, re.M)]


class Proc:
    def __init__(self, binary, name, d, args):
        self.name = name
        self.sock = os.path.join(d, name + ".qmp")
        self.logpath = os.path.join(d, name + ".log")
        self.log = open(self.logpath, "w")
        self.p = subprocess.Popen([binary, "run", *args, "--qmp", "unix:" + self.sock],
                                  stdout=subprocess.DEVNULL, stderr=self.log)
        self.q = QMPClient(name)

    async def connect(self):
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.sock):
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.logtext()}")
            await asyncio.sleep(0.01)
        await self.q.connect(self.sock)

    def logtext(self):
        self.log.flush()
        with open(self.logpath) as f:
            return f.read()[-3000:]

    async def x(self, cmd, args=None, retry_busy=True):
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                return await self.q.execute(cmd, args or {})
            except ExecuteError as e:
                # Spurious "not allowed while migrating" right after a migration or while
                # the hotplug thread holds the VM lock (see compat/README.md): retry, bounded.
                if retry_busy and "not allowed while migrating" in str(e) and time.monotonic() < deadline:
                    st = (await self.q.execute("query-migrate")).get("status")
                    if st not in ("setup", "active", "device"):
                        await asyncio.sleep(0.005)
                        continue
                raise RuntimeError(f"{self.name}: {cmd} {args}: {e}\n{self.logtext()}")

    async def until(self, what, fn):
        deadline = time.monotonic() + TIMEOUT
        while True:
            v = await fn()
            if v:
                return v
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {what} never happened\n{self.logtext()}")
            await asyncio.sleep(0.005)

    async def connectors(self):
        return await self.x("__org.ferry_query-connectors")

    async def conn(self, dev):
        return next((c for c in await self.connectors() if c["device"] == dev), None)

    async def close(self):
        try:
            await self.q.disconnect()
        except Exception:
            pass
        self.p.kill()
        self.p.wait()
        self.log.close()


CORE = {"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}
SLOT = [{"driver": "ferry-pci-fn", "id": "nic1", "addr": "01.1"},
        {"driver": "ferry-pci-fn", "id": "nic0", "addr": "01.0", "multifunction": True}]


def comparable(conns):
    return sorted(({k: v for k, v in c.items() if k != "remaining-ms"} for c in conns),
                  key=lambda c: c["index"])


async def one(src_bin, dst_bin, machine):
    with tempfile.TemporaryDirectory() as d:
        shape = ["--machine", machine, "--memory", "64M", "--guest", "dirty:4"]
        s = Proc(src_bin, "src", d, shape)
        t = Proc(dst_bin, "dst", d, shape + ["-S", "--incoming", "tcp:127.0.0.1:0"])
        try:
            await s.connect()
            await t.connect()
            await s.until("guest pass 1",
                          lambda: _pass_at_least(s, 1))
            devices = [CORE, *SLOT]
            for dev in devices:
                await s.x("device_add", dev)
            for dev in ("core1", "nic0", "nic1"):
                await s.until(f"configure {dev}", lambda dev=dev: _configured(s, dev))
            await s.x("__org.ferry_guest-hotplug", {"mode": "slow"})
            await s.x("device_del", {"id": "core1"})
            await s.until("unplug request", lambda: _pending(s, "core1"))
            for dev in devices:
                await t.x("device_add", dev)
            port = (await t.x("query-migrate"))["socket-address"][0]["port"]
            before = await s.connectors()
            await s.x("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await s.until("migration end", lambda: _migration_done(s))
            if info["status"] != "completed":
                raise RuntimeError(f"source: {info}\ndestination log:\n{t.logtext()}")
            dinfo = await t.until("incoming end", lambda: _migration_done(t))
            if dinfo["status"] != "completed":
                raise RuntimeError(f"destination: {dinfo}")
            # settle: wait until the destination takes hotplug-guarded commands again
            await t.x("__org.ferry_guest-hotplug", {})
            after = await t.connectors()
            if comparable(before) != comparable(after):
                raise RuntimeError(f"connector states differ:\n  source {comparable(before)}\n"
                                   f"  destination {comparable(after)}")
            v = await t.x("__org.ferry_verify-guest")
            if not v.get("ok"):
                raise RuntimeError(f"guest memory after migration: {v}")
            await t.x("cont")
            p = (await t.x("__org.ferry_query-guest"))["pass"]
            await t.until("guest progress", lambda: _pass_at_least(t, p + 2))
            with t.q.listener(("DEVICE_DELETED",)) as listener:
                await t.x("__org.ferry_guest-hotplug", {"answer": True})
                try:
                    ev = await asyncio.wait_for(listener.get(), TIMEOUT)
                except asyncio.TimeoutError:
                    raise RuntimeError(
                        f"no DEVICE_DELETED on the destination {TIMEOUT} s after the guest was told "
                        f"to answer the pending unplug; core1: {await t.conn('core1')}; guest: "
                        f"{await t.x('__org.ferry_query-guest')}") from None
                if ev["data"]["device"] != "core1":
                    raise RuntimeError(f"unexpected {ev}")
            await t.x("stop")
            v = await t.x("__org.ferry_verify-guest")
            if not v.get("ok"):
                raise RuntimeError(f"guest memory after running on: {v}")
            return info
        finally:
            await s.close()
            await t.close()


async def _pass_at_least(p, n):
    return (await p.x("__org.ferry_query-guest"))["pass"] >= n


async def _configured(p, dev):
    c = await p.conn(dev)
    return c is not None and c["state"].endswith("configured")


async def _pending(p, dev):
    c = await p.conn(dev)
    return c is not None and c["unplug-pending"]


async def _migration_done(p):
    i = await p.x("query-migrate")
    return i if i.get("status") in ("completed", "failed") else None


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--old-name", default="old")
    ap.add_argument("--new-name", default="new")
    a = ap.parse_args()
    old_m, new_m = machines(a.old), machines(a.new)
    both = [m for m in new_m if m in old_m]
    print(f"cross-build: {a.old_name} offers {old_m}; {a.new_name} offers {new_m}; checking {both}")
    failures = 0
    for m in both:
        for (src, sname), (dst, dname) in (((a.old, a.old_name), (a.new, a.new_name)),
                                            ((a.new, a.new_name), (a.old, a.old_name))):
            t0 = time.monotonic()
            try:
                info = await one(src, dst, m)
                print(f"ok      {m}: {sname} -> {dname} ({info.get('total-time')} ms, "
                      f"downtime {info.get('downtime')} ms; {time.monotonic() - t0:.1f} s)")
            except Exception as e:  # noqa: BLE001 - report every cell
                failures += 1
                print(f"FAILED  {m}: {sname} -> {dname}: {type(e).__name__}: {e}")
    if not both:
        print("cross-build: no machine type in common")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
