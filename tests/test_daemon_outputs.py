"""`rome-guard run` with its alert outputs, end to end as root: an attack's
alerts reach a real rsyslog and a real HTTPS webhook once each, after the
journal has them; with the receiver down, records queue to the bound and
the rest are counted as dropped while the journal keeps everything."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rome_guard.respond.outputs import syslog
from tests.conftest import require_root
from tests.fixtures.daemon import by_pid, daemon
from tests.fixtures.network import free_port, listener, reverse_shell, wait_until
from tests.fixtures.receivers import rsyslog, webhook_receiver


def _journal_ids(path: str) -> set[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return {json.loads(line).get("id") for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def _status(d) -> dict:
    with open(os.path.join(d.run_dir, "status.json")) as f:
        return json.load(f)


def test_an_attack_reaches_rsyslog_and_the_webhook_once_each_after_the_journal(tmp_path: Path):
    require_root()
    token = tmp_path / "token"
    with rsyslog() as syslog_server, webhook_receiver(str(tmp_path)) as hook:
        token.write_text(hook.token + "\n")
        alerts_file = str(tmp_path / "alerts.jsonl")
        journal_first: list[bool] = []
        hook.on_payload = lambda p: journal_first.append(
            p["output_fields"].get("rome_guard.id") in _journal_ids(alerts_file)
        )
        config = (
            "rules: []\noutputs:\n"
            f"  - type: syslog\n    address: {syslog_server.tcp_address()}\n"
            f"  - type: webhook\n    url: {hook.url}\n"
            f"    ca_file: {hook.pki}/ca.crt\n    bearer_token_file: {token}\n"
        )
        with daemon(config_text=config, alerts_file=alerts_file) as d:
            # the attack: a miner, then a /dev/tcp reverse shell
            miner = d.caught_miner(str(tmp_path))
            mined = d.wait_alert(by_pid(miner, "miner-known-binary"))
            with listener("127.0.6.7", 0) as attacker, reverse_shell(attacker) as shell:
                launched = d.wait_alert(by_pid(shell.pid, "shell-dev-tcp-redirect"))
                stdio = d.wait_reverse_shell_alerts(shell.pid, "127.0.6.7")
            d.settle()
            # the attack's records: its alerts and what was filed against them
            opened = {mined["id"], launched["id"], stdio["id"]}
            attack = [
                r for r in d.records() if r.get("id") in opened or r.get("alert_id") in opened
            ]
            ids = [r["id"] for r in attack]
            wait_until(lambda: {p["output_fields"]["rome_guard.id"] for p in hook.payloads}
                       >= set(ids), timeout=30)  # fmt: skip
            wait_until(lambda: {m["sd"][syslog.SD_ID]["id"] for m in syslog_server.received()}
                       >= set(ids), timeout=30)  # fmt: skip
            d.settle(1.0)
            status = _status(d)
            metric_sent = d.metric("rome_guard_output_sent_total", output="webhook")
            syslog_ids = [m["sd"][syslog.SD_ID]["id"] for m in syslog_server.received()]
    assert len(opened) == 3  # the miner, the shell's command line, its socket stdio
    hook_ids = [p["output_fields"]["rome_guard.id"] for p in hook.payloads]
    for received in (hook_ids, syslog_ids):
        assert sorted(i for i in received if i in ids) == sorted(ids)  # each once
    assert journal_first and all(journal_first)  # the journal had every record first
    assert hook.refused == []
    outputs = {o["name"]: o for o in status["outputs"]}
    assert outputs["webhook"]["sent"] >= len(ids) and outputs["webhook"]["failed"] == 0
    assert outputs["syslog"]["up"] and outputs["syslog"]["dropped"] == 0
    assert metric_sent >= len(ids)


def test_with_the_receiver_down_records_queue_to_the_bound_and_the_rest_are_dropped(
    tmp_path: Path,
):
    require_root()
    port = free_port()  # nothing listens: the webhook is down
    config = (
        "rules: []\noutputs:\n"
        f"  - type: webhook\n    name: siem\n    url: http://127.0.0.1:{port}/\n"
        "    queue_size: 2\n    max_backoff: 1\n"
    )
    with daemon(config_text=config) as d:
        for _ in range(5):
            d.caught_miner(str(tmp_path))
        wait_until(lambda: d.metric("rome_guard_output_failed_total", output="siem") >= 2, 30)

        def settled():  # every journal record is either queued or counted as dropped
            (state,) = _status(d)["outputs"]
            journaled = len(d.records())
            return state["queued"] + state["dropped"] == journaled and (state, journaled)

        state, journaled = wait_until(settled, timeout=10)
        assert (state["queued"], state["sent"], state["up"]) == (2, 0, False)
        assert state["dropped"] == journaled - 2
        assert "Connection refused" in state["last_error"]
        assert d.metric("rome_guard_output_queue_depth", output="siem") == 2
        assert d.metric("rome_guard_output_dropped_total", output="siem") >= journaled - 2
        assert d.metric("rome_guard_output_up", output="siem") == 0
        assert "OUTPUT siem (webhook to http://127.0.0.1:" in d.log
    assert journaled >= 5  # the journal kept every alert
