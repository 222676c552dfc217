"""The alert outputs against real receivers: Debian's rsyslog (UDP, TCP
with octet counting, a unix socket), an HTTPS webhook with a bearer token
that takes what Falcosidekick takes, and systemd-journald itself (in a
private mount namespace). Records come from the real path: a hostile
process read from /proc, AlertSink, the journal, then the outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from rome_guard import procfs
from rome_guard.config import OutputConfig, load_config
from rome_guard.detect.rules import Rule
from rome_guard.findings import Finding
from rome_guard.respond.alerts import AlertSink
from rome_guard.respond.journal import Journal
from rome_guard.respond.metrics import GuardMetrics, NullMetrics
from rome_guard.respond.outputs import Outputs, build_output, journald, syslog, webhook
from rome_guard.respond.outputs.queue import Output
from rome_guard.yamlsrc import SourceError
from tests.conftest import require, require_root
from tests.fixtures.network import wait_until
from tests.fixtures.receivers import (
    falcosidekick_accepts,
    journald_available,
    rsyslog,
    webhook_receiver,
)
from tests.fixtures.receivers import journald as real_journald

RULE = Rule("miner-known-binary", "miner", "critical", "a known miner binary")
TUNNEL = Rule("tunnel-ssh-remote-forward", "reverse_tunnel", "high", "ssh -R")
# what a watched process can put in its argv: newlines to forge lines, the
# characters that end a syslog SD value, invalid UTF-8 and 100 KiB
HOSTILE_ARGS = [
    "x\nFAKE <13>1 - - - - - forged",
    'q"uote]brack\\et',
    os.fsdecode(b"bad\xff\xfeutf8"),
    "A" * 100_000,
]


@pytest.fixture
def hostile():
    """A live process with a hostile argv, as /proc shows it."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)", *HOSTILE_ARGS]
    proc = subprocess.Popen([os.fsencode(a) for a in argv])
    try:
        info = wait_until(lambda: _read_with_argv(proc.pid, len(argv)))
        yield info
    finally:
        proc.kill()
        proc.wait()


def _read_with_argv(pid: int, argc: int):
    info = procfs.read_process(pid)
    return info if info is not None and len(info.cmdline) == argc else None


def _sink(tmp_path, outputs: Outputs) -> AlertSink:
    journal = Journal(str(tmp_path / "alerts.jsonl"))
    journal.set_forward(outputs.publish)
    return AlertSink(journal, NullMetrics(), "monitor", "gpu-node-7")


def _journal(tmp_path) -> list[dict]:
    with open(tmp_path / "alerts.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _output(**kw) -> Output:
    config = OutputConfig(**kw)
    config.name = config.name or config.type
    return build_output(config)


# --- syslog -----------------------------------------------------------------------


def test_rsyslog_receives_each_alert_once_over_udp_tcp_and_unix(tmp_path, hostile):
    require_root()  # rsyslogd binds and writes as root here
    with rsyslog() as server:
        outputs = Outputs(
            [
                _output(type="syslog", name="udp", address=server.udp_address()),
                _output(type="syslog", name="tcp", address=server.tcp_address()),
                _output(type="syslog", name="unix", address=server.unix_address()),
            ]
        )
        sink = _sink(tmp_path, outputs)
        sink.raise_alerts([Finding(RULE, hostile, "exe named xmrig")])
        sink.raise_alerts([Finding(TUNNEL, hostile, "option -R")])  # a second category
        got = wait_until(lambda: len(server.received()) >= 6 and server.received(), timeout=20)
        outputs.close()
    journal = _journal(tmp_path)
    ids = [r["id"] for r in journal]
    assert len(ids) == 2
    by_input: dict[str, list[str]] = {}
    for message in got:
        by_input.setdefault(message["input"], []).append(message["sd"][syslog.SD_ID]["id"])
    # every alert once per transport, in order; TCP's two frames stayed two
    assert by_input == {"imudp": ids, "imtcp": ids, "imuxsock": ids}
    first = next(m for m in got if m["input"] == "imtcp")
    record = journal[0]
    assert first["version"] == "1"
    assert first["pri"] == str(10 * 8 + 2)  # authpriv.crit for a critical rule
    assert first["app"] == "rome-guard" and first["msgid"] == "alert"
    assert first["hostname"] == "gpu-node-7"
    assert first["msg"].lstrip("\ufeff") == record["summary"]
    sd = first["sd"][syslog.SD_ID]
    assert sd["rule"] == "miner-known-binary" and sd["severity"] == "critical"
    assert sd["process.pid"] == str(hostile.pid)
    assert sd["process.start_time"] == str(hostile.key.start_time)
    # hostile argv: rsyslog parsed the SD (the quote and bracket were escaped),
    # nothing forged a second message, invalid bytes are \xNN, 100 KiB was cut
    cmdline = sd["process.cmdline"]
    assert "x\\nFAKE <13>1" in cmdline and 'q"uote]brack' in cmdline
    assert "bad\\\\xff\\\\xfeutf8" in cmdline and "\n" not in cmdline
    assert all(len(json.dumps(m).encode()) < syslog.MAX_MESSAGE_BYTES + 4096 for m in got)
    assert all(o.state().sent == 2 and o.state().failed == 0 for o in outputs.outputs)


def test_a_tcp_receiver_that_restarts_gets_the_next_alert_on_a_new_connection(tmp_path, hostile):
    require_root()
    with rsyslog() as server:
        output = _output(type="syslog", address=server.tcp_address(), max_backoff=0.5)
        sink = _sink(tmp_path, Outputs([output]))
        sink.raise_alerts([Finding(RULE, hostile, "first")])
        first = wait_until(lambda: server.received(), timeout=20)
        port = server.port
    with rsyslog(port) as restarted:  # the old connection is dead: a new one
        sink.raise_alerts([Finding(TUNNEL, hostile, "second")])
        second = wait_until(lambda: restarted.received(), timeout=30)
        output.close()
    assert [m["sd"][syslog.SD_ID]["rule"] for m in first + second] == [
        "miner-known-binary",
        "tunnel-ssh-remote-forward",
    ]


# --- webhook ----------------------------------------------------------------------


def _webhook(receiver, tmp_path, token: str | None = None, **kw) -> Output:
    token_file = tmp_path / "token"
    token_file.write_text((token or receiver.token) + "\n")
    kw.setdefault("ca_file", os.path.join(receiver.pki, "ca.crt"))
    return _output(type="webhook", url=receiver.url, bearer_token_file=str(token_file), **kw)


def test_webhook_posts_falco_json_over_tls_with_a_bearer_token(tmp_path, hostile):
    with webhook_receiver(str(tmp_path)) as receiver:
        output = _webhook(receiver, tmp_path)
        sink = _sink(tmp_path, Outputs([output]))
        sink.raise_alerts([Finding(RULE, hostile, "exe named xmrig")])
        sink.events_lost({"process": 3}, {"process": 3})
        wait_until(lambda: len(receiver.payloads) == 2, timeout=20)
        output.close()
    alert, lost = receiver.payloads
    assert receiver.refused == []
    assert falcosidekick_accepts(alert) == "" and falcosidekick_accepts(lost) == ""
    record = _journal(tmp_path)[0]
    assert alert["rule"] == "miner-known-binary" and alert["priority"] == "Critical"
    assert alert["time"] == record["time"] and alert["hostname"] == "gpu-node-7"
    assert alert["source"] == "rome-guard" and "miner" in alert["tags"]
    assert alert["output"] == record["summary"]
    fields = alert["output_fields"]
    assert fields["proc.pid"] == hostile.pid and fields["rome_guard.id"] == record["id"]
    assert fields["proc.exepath"] == record["process"]["exe"]
    assert "\n" not in fields["proc.cmdline"] and "bad\\\\xff\\\\xfeutf8" in fields["proc.cmdline"]
    assert lost["rule"] == "rome-guard events_lost" and lost["priority"] == "Warning"
    assert output.state().sent == 2


def test_webhook_with_a_wrong_token_or_an_untrusted_ca_delivers_nothing(tmp_path, hostile):
    with webhook_receiver(str(tmp_path)) as receiver:
        wrong = _webhook(receiver, tmp_path, token="not-the-token")
        wrong.offer({"event": "alert", "rule": "r", "time": "2026-12-01T00:00:00.000Z", "id": "1"})
        wait_until(lambda: wrong.state().dropped == 1, timeout=20)
        assert (
            wrong.state().failed == 1 and "401" in wrong.state().last_error
        )  # refused: not retried
        wrong.close()
        untrusted = _webhook(receiver, tmp_path, ca_file="", max_backoff=0.5)
        untrusted.offer({"event": "alert", "rule": "r", "time": "2026-12-01T00:00:00.000Z"})
        wait_until(lambda: untrusted.state().failed >= 2, timeout=20)  # retried, not dropped
        state = untrusted.state()
        assert (
            not state.up and state.queued == 1 and "CERTIFICATE_VERIFY_FAILED" in state.last_error
        )
        untrusted.close()
    assert receiver.payloads == []


def test_receiver_down_queues_to_the_bound_counts_the_rest_and_delivers_in_order(tmp_path):
    with webhook_receiver(str(tmp_path)) as receiver:
        receiver.stop()
        output = _webhook(receiver, tmp_path, queue_size=5, max_backoff=0.5)
        metrics = GuardMetrics(process_collector=False)
        metrics.watch_outputs(Outputs([output]).states)
        records = [
            {"event": "alert", "rule": f"r{i}", "time": "2026-12-01T00:00:00.000Z", "id": str(i)}
            for i in range(8)
        ]
        accepted = [output.offer(r) for r in records]
        assert accepted == [True] * 5 + [False] * 3
        wait_until(lambda: output.state().failed >= 2, timeout=20)
        state = output.state()
        assert (state.queued, state.dropped, state.sent, state.up) == (5, 3, 0, False)
        body = metrics.exposition()[0].decode()
        assert 'rome_guard_output_dropped_total{output="webhook",type="webhook"} 3.0' in body
        assert 'rome_guard_output_queue_depth{output="webhook",type="webhook"} 5.0' in body
        assert 'rome_guard_output_up{output="webhook",type="webhook"} 0.0' in body
        receiver.start()
        wait_until(lambda: len(receiver.payloads) == 5, timeout=30)
        assert [p["rule"] for p in receiver.payloads] == ["r0", "r1", "r2", "r3", "r4"]
        assert output.state().up and output.state().queued == 0
        output.close()


class _Stuck:
    """A transport that never returns until released: a receiver that hangs."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, payload: bytes) -> None:
        self.entered.set()
        self.release.wait(30)

    def close(self) -> None:
        self.release.set()


def test_offer_returns_while_the_transport_hangs():
    stuck = _Stuck()
    output = Output("stuck", "webhook", "x", stuck, lambda r: b"x", queue_size=2)
    assert output.offer({"event": "alert"})
    stuck.entered.wait(10)
    # the thread is inside send(): the caller is never held; the record in
    # flight counts against the bound until it is delivered
    assert output.offer({"event": "alert"})
    assert not output.offer({"event": "alert"})
    assert output.state().dropped == 1
    stuck.release.set()
    output.close()


def test_min_severity_filters_low_alerts_but_never_other_records():
    output = Output("o", "syslog", "x", _Stuck(), lambda r: b"", min_severity="high")
    assert not output.offer({"event": "alert", "severity": "medium"})
    assert output.offer({"event": "alert", "severity": "critical"})
    assert output.offer({"event": "events_lost"})
    assert output.state().dropped == 0
    output.close(0)


# --- journald ---------------------------------------------------------------------


def test_real_journald_stores_each_alert_with_its_fields(tmp_path, hostile):
    require(journald_available(), "needs root, systemd-journald and unshare")
    with real_journald() as server:
        output = _output(type="journald", address=server.socket_path)
        sink = _sink(tmp_path, Outputs([output]))
        sink.raise_alerts([Finding(RULE, hostile, "exe named xmrig")])
        entries = wait_until(lambda: server.entries(MESSAGE_ID=journald.MESSAGE_ID), timeout=20)
        output.close()
    (entry,) = entries
    record = _journal(tmp_path)[0]
    assert entry["MESSAGE"] == record["summary"]
    assert entry["PRIORITY"] == "2" and entry["SYSLOG_IDENTIFIER"] == "rome-guard"
    assert entry["ROME_GUARD_RULE"] == "miner-known-binary"
    assert entry["ROME_GUARD_ID"] == record["id"]
    assert entry["ROME_GUARD_PROCESS_PID"] == str(hostile.pid)
    assert entry["ROME_GUARD_PROCESS_START_TIME"] == str(hostile.key.start_time)
    cmdline = entry["ROME_GUARD_PROCESS_CMDLINE"]
    assert isinstance(cmdline, str) and "\n" not in cmdline and "bad\\\\xff\\\\xfeutf8" in cmdline
    assert all(key.isupper() or key.startswith("_") for key in entry)


def test_journald_missing_socket_fails_counted_and_retries():
    output = _output(type="journald", address="/nonexistent/journal/socket", max_backoff=0.5)
    output.offer({"event": "alert", "severity": "high"})
    wait_until(lambda: output.state().failed >= 2, timeout=20)
    assert output.state().queued == 1 and not output.state().up
    output.close(0)


# --- formats and config --------------------------------------------------------------


def test_syslog_message_keeps_under_the_size_and_escapes_sd_values():
    record = {
        "event": "alert",
        "time": "2026-12-01T00:00:00.000Z",
        "host": "h o\nst",
        "rule": "r",
        "severity": "low",
        "summary": "s\nforged",
        "process": {"exe": 'a"]\\' + "B" * 50_000, "cmdline": ["x"] * 2000},
    }
    message = syslog.format_message(record, "local3", "rome-guard", pid=7)
    assert len(message) <= syslog.MAX_MESSAGE_BYTES
    text = message.decode()
    assert text.startswith(f"<{19 * 8 + 5}>1 2026-12-01T00:00:00.000Z host rome-guard 7 alert [")
    assert '\\"\\]\\\\\\\\' in text  # ", ] and the backslash (one_line doubled it) escaped
    assert "\n" not in text


def test_webhook_payload_of_every_record_kind_passes_falcosidekicks_check():
    base = {"time": "2026-12-01T00:00:00.000Z", "host": "h", "id": "1"}
    for record in (
        {**base, "event": "alert", "rule": "r", "severity": "medium", "summary": "s"},
        {**base, "event": "response", "rule": "r", "severity": "high", "action": "killed"},
        {**base, "event": "confirmed", "rule": "r", "alert_id": "2"},
        {**base, "event": "events_lost", "lost": {"process": 1}},
    ):
        assert falcosidekick_accepts(webhook.falco_payload(record)) == "", record


def test_outputs_config_errors_name_the_line(tmp_path):
    cases = {
        "outputs:\n  - type: kafka\n": ":2: outputs[0].type: must be one of",
        "outputs:\n  - type: syslog\n    address: 10.0.0.1:514\n": ":3: outputs[0].address",
        "outputs:\n  - type: syslog\n    address: udp://h\n": ":3: outputs[0].address: no port",
        "outputs:\n  - type: webhook\n    url: ftp://x\n": ":3: outputs[0].url",
        "outputs:\n  - {type: journald}\n  - {type: journald}\n": ":3: outputs[1]: a second",
        "outputs:\n  - type: journald\n    name: 'a b'\n": ":3: outputs[0].name",
        "outputs:\n  - type: journald\n    queue: 3\n": ":3: unknown key 'outputs[0].queue'",
        "outputs: {type: syslog}\n": ":1: outputs must be a list",
    }
    for text, expected in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(text)
        with pytest.raises(SourceError) as err:
            load_config(str(path))
        line, _, what = expected[1:].partition(": ")
        # file:line:column: what (the column where the loader knows it)
        assert re.search(f":{line}(:\\d+)?: {re.escape(what)}", str(err.value)), (text, err.value)
    path.write_text(
        "outputs:\n  - type: syslog\n    address: tcp://127.0.0.1:514\n    facility: local4\n"
        "  - type: journald\njournal:\n  rotate_bytes: 1000\n  keep: 2\n"
    )
    config = load_config(str(path))
    assert [(o.name, o.type) for o in config.outputs] == [
        ("syslog", "syslog"),
        ("journald", "journald"),
    ]
    assert config.outputs[1].address == "/run/systemd/journal/socket"
    assert (config.journal.rotate_bytes, config.journal.keep) == (1000, 2)


def test_an_output_that_cannot_be_built_is_left_out_and_said(tmp_path, caplog):
    missing = OutputConfig(type="webhook", name="hook", url="https://x", bearer_token_file="/nope")
    outputs = Outputs.from_config([missing])
    assert outputs.outputs == []
    assert "DEGRADED: output hook (webhook) not started" in caplog.text
