"""Drive Ferry's QMP server with the real `qemu.qmp` client (PyPI).

Usage: test_qmp_client.py SOCKET_PATH

The server must serve the demo backend (vmm/qmp/examples/qmp_demo.rs). The script
ends by sending `quit`, which stops the server. Prints OK and exits 0 on
success; any failure raises.
"""

import asyncio
import sys
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 10


def check_timestamp(event):
    ts = event["timestamp"]
    assert set(ts) == {"seconds", "microseconds"}, ts
    assert isinstance(ts["seconds"], int) and isinstance(ts["microseconds"], int), ts
    assert abs(ts["seconds"] - time.time()) < 60, ts
    assert 0 <= ts["microseconds"] < 1_000_000, ts


async def expect_error(qmp, cmd, args, error_class, desc):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as err:
        assert err.error_class == error_class, (cmd, err.error_class)
        assert str(err) == desc, (cmd, str(err))
    else:
        raise AssertionError(f"{cmd} did not fail")


async def next_event(qmp, name):
    event = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
    assert event["event"] == name, event
    check_timestamp(event)
    return event


async def async_part(path):
    qmp = QMPClient("ferry-test")
    await asyncio.wait_for(qmp.connect(path), TIMEOUT)

    version = qmp.greeting.QMP.version
    assert version["qemu"] == {"major": 0, "minor": 1, "micro": 0}, version
    assert version["package"] == "ferry 0.1.0", version
    assert qmp.greeting.QMP.capabilities == [], qmp.greeting

    status = await qmp.execute("query-status")
    assert status["running"] is True and status["status"] == "running", status
    assert await qmp.execute("query-version") == version
    names = {c["name"] for c in await qmp.execute("query-commands")}
    assert {"qmp_capabilities", "query-status", "stop", "cont"} <= names, names

    assert await qmp.execute("stop") == {}
    assert "data" not in await next_event(qmp, "STOP")
    status = await qmp.execute("query-status")
    assert status["running"] is False and status["status"] == "paused", status

    assert await qmp.execute("cont") == {}
    await next_event(qmp, "RESUME")

    await expect_error(qmp, "no-such-cmd", None, "CommandNotFound",
                       "The command no-such-cmd has not been found")
    await expect_error(qmp, "device_del", {"id": "nope"}, "DeviceNotFound",
                       "Device 'nope' not found")
    await expect_error(qmp, "device_del", {"id": 1}, "GenericError",
                       "Invalid parameter type for 'id', expected: string")
    await expect_error(qmp, "stop", {"bogus": True}, "GenericError",
                       "Parameter 'bogus' is unexpected")
    await expect_error(qmp, "qmp_capabilities", None, "CommandNotFound",
                       "Capabilities negotiation is already complete, command ignored")

    assert await qmp.execute("device_del", {"id": "dev0"}) == {}
    event = await next_event(qmp, "DEVICE_DELETED")
    assert event["data"] == {"device": "dev0", "path": "/machine/peripheral/dev0"}, event

    echoed = await qmp.execute("x-echo", {"s": "caf\u00e9 \U0001F600"})
    assert echoed == {"s": "caf\u00e9 \U0001F600"}, echoed

    # Still alive after all the errors.
    assert (await qmp.execute("query-status"))["running"] is True
    await qmp.disconnect()


def sync_part(path):
    mon = QEMUMonitorProtocol(path)
    greeting = mon.connect(negotiate=True)
    assert greeting["QMP"]["version"]["package"] == "ferry 0.1.0", greeting
    assert mon.cmd("query-status")["status"] == "running"
    reply = mon.cmd_raw("no-such-cmd", None)
    assert reply["error"]["class"] == "CommandNotFound", reply
    mon.cmd("stop")
    event = mon.pull_event(wait=TIMEOUT)
    assert event and event["event"] == "STOP", event
    mon.cmd("cont")
    mon.close()


async def quit_part(path):
    qmp = QMPClient("ferry-quit")
    await asyncio.wait_for(qmp.connect(path), TIMEOUT)
    assert await qmp.execute("quit") == {}
    event = await next_event(qmp, "SHUTDOWN")
    assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}, event
    # The server closes the socket after quit, as QEMU does; qemu.qmp
    # re-raises that EOF from disconnect().
    try:
        await qmp.disconnect()
    except EOFError:
        pass


def main():
    path = sys.argv[1]
    asyncio.run(asyncio.wait_for(async_part(path), 60))
    sync_part(path)
    asyncio.run(asyncio.wait_for(quit_part(path), 60))
    print("OK")


if __name__ == "__main__":
    main()
