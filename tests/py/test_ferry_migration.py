"""Drive two real `ferry` processes with the real `qemu.qmp` client (PyPI).

Usage: test_ferry_migration.py SRC_SOCKET DST_SOCKET

The destination was started with `--incoming tcp:127.0.0.1:0`, the source with a running
dirtying guest. Follows MIGRATION events to `completed` on both sides, checks STOP/RESUME,
run states, refusals while migrating, then quits both. Prints OK on success; any failure
raises.
"""

import asyncio
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient

TIMEOUT = 30


def watch(qmp, name, pred=lambda data: True):
    """Start waiting for an event with its own listener (registered now, before the command
    that causes it), so concurrent waiters on one client never steal each other's events."""
    listener = EventListener((name,))
    qmp.register_listener(listener)

    async def inner():
        try:
            async for ev in listener:
                if pred(ev.get("data", {})):
                    return ev
        finally:
            qmp.remove_listener(listener)

    return asyncio.ensure_future(asyncio.wait_for(inner(), TIMEOUT))


async def main(src_path, dst_path):
    src, dst = QMPClient("src"), QMPClient("dst")
    await src.connect(src_path)
    await dst.connect(dst_path)
    assert src.greeting.QMP.version["package"].startswith("ferry"), src.greeting

    st = await src.execute("query-status")
    assert st["status"] == "running" and st["running"] is True, st
    st = await dst.execute("query-status")
    assert st["status"] == "inmigrate" and st["running"] is False, st

    for q in (src, dst):
        await q.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]})
        caps = await q.execute("query-migrate-capabilities")
        assert {"capability": "events", "state": True} in caps, caps
        assert {"capability": "auto-converge", "state": False} in caps, caps
    # Not a convergence test: on a loaded host a debug build can keep 300 ms out of reach for
    # all 30 default passes. Switch over once 3 s fits, after 10 passes at the latest.
    await src.execute("migrate-set-parameters", {
        "downtime-limit": 3000,
        "__org.ferry_max-iterations": 10,
        "__org.ferry_switchover-policy": "force",
    })
    params = await src.execute("query-migrate-parameters")
    assert params["downtime-limit"] == 3000 and params["max-bandwidth"] == 0, params
    assert params["__org.ferry_switchover-policy"] == "force", params

    # Hot-plug a CPU core and a PCI function into the running guest; unplug one again and
    # wait for its event, registering the listener before the command.
    await src.execute("device_add", {"driver": "ferry-cpu-core", "id": "core1", "core-id": 1})
    await src.execute("device_add", {"driver": "ferry-pci-fn", "id": "fn0", "addr": "00.0"})
    with src.listener(("DEVICE_DELETED",)) as listener:
        await src.execute("device_del", {"id": "fn0"})
        ev = await asyncio.wait_for(listener.get(), TIMEOUT)
        assert ev["data"] == {"device": "fn0", "path": "/machine/peripheral/fn0"}, ev
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}, ev
    try:
        await src.execute("device_del", {"id": "nope"})
        raise AssertionError("unknown device accepted")
    except ExecuteError as e:
        assert e.error_class == "DeviceNotFound", e
        assert str(e) == "Device 'nope' not found", str(e)
    conns = await src.execute("__org.ferry_query-connectors")
    core = [c for c in conns if c["device"] == "core1"]
    assert core and core[0]["kind"] == "cpu-core", conns
    # The destination mirrors the source's devices before the stream starts.
    await dst.execute("device_add", {"driver": "ferry-cpu-core", "id": "core1", "core-id": 1})

    info = await dst.execute("query-migrate")
    port = info["socket-address"][0]["port"]
    assert isinstance(port, str), info

    # Errors come back with QEMU's classes and texts.
    try:
        await src.execute("migrate", {"uri": "exec:cat"})
        raise AssertionError("bad uri accepted")
    except ExecuteError as e:
        assert e.error_class == "GenericError", e
    try:
        await dst.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        raise AssertionError("migrate on an incoming destination accepted")
    except ExecuteError as e:
        assert str(e) == "Guest is waiting for an incoming migration", str(e)

    src_done = watch(src, "MIGRATION", lambda d: d["status"] == "completed")
    dst_done = watch(dst, "MIGRATION", lambda d: d["status"] == "completed")
    src_stop = watch(src, "STOP")
    dst_resume = watch(dst, "RESUME")
    # libvirt sends detach: accepted and ignored.
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}", "detach": True})
    # Hotplug is refused on the source while the migration runs (it may already be over).
    try:
        await src.execute("device_add", {"driver": "ferry-cpu-core", "id": "core2", "core-id": 2})
        added_during = True
    except ExecuteError as e:
        assert str(e) == "device_add not allowed while migrating", str(e)
        added_during = False
    await asyncio.gather(src_done, dst_done, src_stop, dst_resume)
    assert not added_during or (await src.execute("query-status"))["status"] == "postmigrate"

    info = await src.execute("query-migrate")
    assert info["status"] == "completed", info
    assert info["ram"]["total"] > 0 and info["ram"]["transferred"] > 0, info
    assert "downtime" in info and info["downtime"] >= 0, info
    assert (await src.execute("query-status"))["status"] == "postmigrate"
    assert (await dst.execute("query-status"))["status"] == "running"
    # The source never runs again by itself, nor on request.
    try:
        await src.execute("cont")
        raise AssertionError("cont accepted on a migrated-away source")
    except ExecuteError as e:
        assert e.error_class == "GenericError", e

    g1 = (await dst.execute("__org.ferry_query-guest"))["pass"]
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        g2 = (await dst.execute("__org.ferry_query-guest"))["pass"]
        if g2 > g1:
            break
        assert asyncio.get_running_loop().time() < deadline, (
            f"guest made no progress on the destination in {TIMEOUT} s ({g1} -> {g2})")
        await asyncio.sleep(0.005)
    await dst.execute("stop")
    v = await dst.execute("__org.ferry_verify-guest")
    assert v["ok"] is True, v

    for q in (src, dst):
        await q.execute("quit")
        try:
            await q.disconnect()
        except EOFError:
            pass  # the server closes the socket after quit, as QEMU does
    print("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
